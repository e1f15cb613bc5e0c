"""The README's Python example runs as written and its shape comments hold."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_api_example_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        # (the loader of an exported model has its own test: tests/test_export.py)
        blocks = re.findall(r"(?<!<!-- jax loader -->\n)```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example; update this test with it"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["pri"].shape == (8732, 4)
    assert scope["cls_t"].shape == (1, 8732) and scope["box_t"].shape == (1, 8732, 4)
    assert int(np.sum(np.asarray(scope["cls_t"]) == 12)) >= 1  # the one object has positives
    assert scope["cls_logits"].shape == (1, 8732, 21) and scope["box_preds"].shape == (1, 8732, 4)
    assert np.isfinite(float(scope["value"])) and float(scope["aux"]["num_pos"]) >= 1
    dets = scope["dets"]
    assert dets.boxes.shape == (1, 200, 4) and dets.scores.shape == (1, 200)
    assert dets.classes.shape == (1, 200) and dets.num_detections.shape == (1,)
    # the training loop with the reusable step
    assert len(scope["losses"]) == 3 and np.isfinite(scope["losses"]).all()
    assert int(scope["state"].step) == 3 and int(scope["metrics"]["positives_per_image"]) >= 1
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 350, "the README is a guide: measurements go to RESULTS.md"
