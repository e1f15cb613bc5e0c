"""The notebooks of experiments/notebooks execute end to end on the CPU (SMOKE mode).

A cell tagged `injected-parameters` is inserted after the one tagged `parameters` (as papermill
does) with SMOKE = True and temporary paths, then the notebook runs with nbclient in a fresh
kernel from the repository root: tiny synthetic data, a few steps, no downloads, no TPU. The
committed .ipynb must also equal what make_notebooks.py generates.
"""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")


def inject_parameters(nb, params: dict) -> None:
    """Insert a cell assigning `params` right after the cell tagged `parameters`."""
    index = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.get("metadata", {}).get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def execute(name: str, params: dict, timeout: int = 600):
    """Run notebook `name` with `params` injected; returns the executed notebook."""
    with open(os.path.join(NOTEBOOKS, name)) as f:
        nb = nbformat.read(f, as_version=4)
    inject_parameters(nb, params)
    env_before = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"  # the kernel inherits the environment
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": ROOT}})
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = env_before
    return nb


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _cell_shows_image(nb, marker: str) -> bool:
    """The code cell whose source contains `marker` displayed a PNG (one cell must match)."""
    cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"{len(cells)} cells contain {marker!r}"
    return any("image/png" in o.get("data", {}) for o in cells[0].get("outputs", []))


@pytest.mark.parametrize("name", ["ssd_colab_tpu.ipynb", "ssd_inference.ipynb"])
def test_notebook_has_a_parameters_cell_with_smoke(name):
    with open(os.path.join(NOTEBOOKS, name)) as f:
        nb = nbformat.read(f, as_version=4)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "SMOKE = False" in params[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean


def test_committed_notebooks_match_the_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  os.path.join(NOTEBOOKS, "make_notebooks.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, build in (("ssd_colab_tpu.ipynb", gen.colab_tpu),
                        ("ssd_inference.ipynb", gen.inference)):
        with open(os.path.join(NOTEBOOKS, name)) as f:
            committed = nbformat.read(f, as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in build().cells], name


def test_colab_tpu_notebook_smoke(tmp_path):
    nb = execute("ssd_colab_tpu.ipynb", {"SMOKE": True, "WORKDIR": str(tmp_path / "run"),
                                         "DATA_DIR": str(tmp_path / "tfds"), "NUM_SHOW": 4})
    text = _text_outputs(nb)
    assert "VGG16 layers" in text and "fc6" in text
    assert "mAP" in text and "#gt" in text
    assert os.path.exists(tmp_path / "run" / "eval" / "metrics.json")
    assert _cell_shows_image(nb, "run_eval.write_eval_report(")  # the PR curves
    assert _cell_shows_image(nb, "visualize.draw_detections(")  # validation detections


def test_inference_notebook_smoke(tmp_path):
    nb = execute("ssd_inference.ipynb", {"SMOKE": True, "OUT_DIR": str(tmp_path / "out")})
    text = _text_outputs(nb)
    assert "VGG16SSDBackbone at 300 px, 91 classes, 8732 priors" in text
    assert "matched priors" in text and "d loss / d logits" in text
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".png")]) == 3
    assert os.path.exists(tmp_path / "out" / "detections.json")
    assert _cell_shows_image(nb, "inference.predict_files(")  # the PNGs it wrote
    assert _cell_shows_image(nb, "predictor.predict(")  # in-memory detections drawn
