"""ssd_jax.export and experiments/export.py: each artifact, run where it will be served (a fresh
process that cannot import ssd_jax or flax for the jax one, one without jax for the SavedModel),
gives `experiments.predict`'s detections (the Predictor's jitted network + detect) on real-looking
images, at two batch sizes; on a tiny trained run and on a converted seeded torchvision SSD300."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ssd_jax import export, inference
from ssd_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prepended to a subprocess's script: `import` of these top-level packages fails there.
_BLOCK = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this process")
sys.meta_path.insert(0, _Blocked())
"""

# Runs the SavedModel with TensorFlow alone (its graph holds the program: no jax needed).
_SAVEDMODEL = """
import numpy as np, tensorflow as tf
model = tf.saved_model.load({path!r})
serve = model.signatures["serving_default"]
images = np.load({images!r})
out = {{}}
for n in {batches!r}:
    res = serve(images=tf.constant(images[:n]))
    out.update({{f"{{k}}_{{n}}": v.numpy() for k, v in res.items()}})
np.savez({result!r}, **out)
"""


# Runs the ONNX model with onnxruntime alone.
_ONNX = """
import numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model({path!r}, full_check=True)  # shapes and types consistent
session = ort.InferenceSession({path!r}, providers=["CPUExecutionProvider"])
names = [o.name for o in session.get_outputs()]
images = np.load({images!r})
out = {{}}
for n in {batches!r}:
    out.update({{f"{{k}}_{{n}}": v for k, v in zip(names, session.run(None, {{"images": images[:n]}}))}})
np.savez({result!r}, **out)
"""


def readme_loader() -> str:
    """The README's loader of the jax artifact (the ```python block after "<!-- jax loader -->")."""
    with open(os.path.join(ROOT, "README.md")) as f:
        m = re.search(r"<!-- jax loader -->\n```python\n(.*?)```", f.read(), flags=re.S)
    assert m, "README.md lost its jax loader block"
    return m.group(1)


def _run(script: str, blocked: tuple[str, ...], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
               # what is compared is the program's numbers, not its speed
               XLA_FLAGS="--xla_backend_optimization_level=0")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_BLOCK).format(blocked=blocked)
                           + textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _predict(predictor, images: np.ndarray) -> dict[str, np.ndarray]:
    """What experiments.predict computes (before scaling to pixels), in the artifact's layout."""
    import jax

    d = jax.device_get(predictor(images))
    cats = np.asarray((0,) + tuple(predictor.category_ids))
    return {"boxes": d.boxes, "scores": d.scores, "classes": cats[d.classes],
            "num_detections": d.num_detections}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], suffix: str) -> int:
    num = np.asarray(got["num_detections" + suffix])
    np.testing.assert_array_equal(num, want["num_detections"])
    for i, n in enumerate(num):
        np.testing.assert_array_equal(got["classes" + suffix][i, :n], want["classes"][i, :n])
        np.testing.assert_allclose(got["scores" + suffix][i, :n], want["scores"][i, :n], atol=1e-4)
        np.testing.assert_allclose(got["boxes" + suffix][i, :n], want["boxes"][i, :n], atol=1e-4)
    return int(num.sum())


def _images(size: int, n: int) -> np.ndarray:
    """Synthetic scenes (shapes on textured backgrounds) through predict's resize."""
    from ssd_jax import image as image_lib
    from ssd_jax.data import synthetic

    return np.stack([image_lib.resize(synthetic.generate_example(7, "val", i, image_size=160)
                                      ["image"], size) for i in range(n)])


def _check_artifacts(predictor, out: str, tmp_path, batches: tuple[int, ...]) -> None:
    images = _images(predictor.image_size, max(batches))
    np.save(tmp_path / "images.npy", images)
    want = {n: _predict(predictor, images[:n]) for n in batches}
    meta = json.load(open(os.path.join(out, export.METADATA)))
    assert meta["input"]["shape"][1:] == [predictor.image_size, predictor.image_size, 3]
    assert [c["id"] for c in meta["categories"]] == list(predictor.category_ids)
    assert meta["checkpoint_step"] == predictor.step
    assert meta["outputs"]["K"] == want[batches[0]]["scores"].shape[1]

    # jax: the README's loader, in a process where ssd_jax and flax cannot be imported
    loader = readme_loader().replace('"ssd.jax"', repr(os.path.join(out, "ssd.jax"))).replace(
        '"export.json"', repr(os.path.join(out, "export.json")))
    _run(f"""
        import numpy as np
        {textwrap.indent(textwrap.dedent(loader), '        ').strip()}
        images = np.load({str(tmp_path / 'images.npy')!r})
        out = {{}}
        for n in {batches!r}:
            res = detector.call(images[:n])
            out.update({{f"{{k}}_{{n}}": np.asarray(v) for k, v in res.items()}})
        np.savez({str(tmp_path / 'jax.npz')!r}, **out)
        """, blocked=("ssd_jax", "flax", "tensorflow"), cwd=str(tmp_path))
    got = np.load(tmp_path / "jax.npz")
    detections = sum(_assert_same(got, want[n], f"_{n}") for n in batches)
    assert detections > 0  # something was compared

    # savedmodel: TensorFlow only
    _run(_SAVEDMODEL.format(path=os.path.join(out, "saved_model"), images=str(tmp_path / "images.npy"),
                            batches=batches, result=str(tmp_path / "tf.npz")),
         blocked=("ssd_jax", "flax", "jax", "jaxlib"), cwd=str(tmp_path))
    got = np.load(tmp_path / "tf.npz")
    for n in batches:
        _assert_same(got, want[n], f"_{n}")

    # onnx: onnxruntime only
    proc = _run(_ONNX.format(path=os.path.join(out, "ssd.onnx"),
                             images=str(tmp_path / "images.npy"), batches=batches,
                             result=str(tmp_path / "onnx.npz")),
                blocked=("ssd_jax", "flax", "jax", "jaxlib", "tensorflow"), cwd=str(tmp_path))
    # onnxruntime loads it without a word (jax2onnx's file drew 623 shape-merge warnings)
    assert "onnxruntime" not in proc.stderr, proc.stderr[:2000]
    got = np.load(tmp_path / "onnx.npz")
    for n in batches:
        _assert_same(got, want[n], f"_{n}")


@pytest.fixture(scope="module")
def trained_predictor(tmp_path_factory):
    from ssd_jax import train
    from tests.test_predict_evaluate import tiny_config

    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    config.dtype = "float32"
    train.train_and_evaluate(config, workdir)
    return workdir, inference.load_predictor(workdir=workdir)


def test_exports_of_a_trained_run_equal_predict(trained_predictor, tmp_path):
    workdir, predictor = trained_predictor
    # a dataset whose category ids are not the labels (a COCO-JSON file's own ids)
    predictor = dataclasses.replace(predictor, category_ids=tuple(
        100 + 7 * i for i in range(len(predictor.category_ids))))
    out = str(tmp_path / "export")
    paths = export.export(predictor, out, formats=("jax", "savedmodel", "onnx"))
    assert set(paths) == {"jax", "savedmodel", "onnx", "metadata"}
    _check_artifacts(predictor, out, tmp_path, batches=(3, 1))


@pytest.mark.long  # ~70-90 s (SSD300 through jax2onnx and TF); the export machinery: the test above
def test_exports_of_a_converted_torchvision_ssd300_equal_predict(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.test_predict_evaluate import trained_like_torchvision_ssd300

    pth = tmp_path / "ssd300.pth"
    torch.save(trained_like_torchvision_ssd300().state_dict(), pth)
    predictor = inference.load_predictor(torchvision_checkpoint=str(pth))
    out = str(tmp_path / "export")
    export.export(predictor, out, formats="jax,savedmodel,onnx")
    assert json.load(open(os.path.join(out, export.METADATA)))["categories"][0] == {
        "id": 1, "name": "person"}
    _check_artifacts(predictor, out, tmp_path, batches=(2, 1))


def test_export_refuses_what_it_cannot_do(trained_predictor, tmp_path):
    _, predictor = trained_predictor
    with pytest.raises(UserError, match=r"formats=jax,tflite: unknown format 'tflite'; choose"):
        export.parse_formats(["jax,tflite"])
    with pytest.raises(UserError, match=r"platforms=cpu,gpu: choose from cpu, cuda"):
        export.export(predictor, str(tmp_path), ("jax",), platforms=("cpu", "gpu"))
    (tmp_path / "ssd.jax").write_bytes(b"an earlier export")
    with pytest.raises(UserError, match=r"already holds ssd.jax"):
        export.export(predictor, str(tmp_path), ("savedmodel", "jax"))
    assert (tmp_path / "ssd.jax").read_bytes() == b"an earlier export"
    assert not (tmp_path / "saved_model").exists()


def test_a_failed_export_leaves_nothing_behind(trained_predictor, tmp_path, monkeypatch):
    _, predictor = trained_predictor

    def broken(predictor, path):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise RuntimeError("the converter failed")

    monkeypatch.setattr(export, "save_onnx", broken)
    with pytest.raises(RuntimeError, match="the converter failed"):
        export.export(predictor, str(tmp_path / "out"), ("jax", "onnx"))
    assert os.listdir(tmp_path / "out") == []  # the finished ssd.jax went too: no partial export


def test_a_missing_converter_is_one_line_before_anything_is_written(trained_predictor, tmp_path,
                                                                    monkeypatch):
    _, predictor = trained_predictor
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"formats=onnx needs onnxruntime \(not installed\): "
                                        r"pip install"):
        export.export(predictor, str(tmp_path), ("jax", "onnx"))
    assert os.listdir(tmp_path) == []


def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_export_command_writes_the_artifacts_and_explains_mistakes(trained_predictor, tmp_path):
    workdir, _ = trained_predictor
    out = tmp_path / "out"
    proc = _cli(f"--workdir={workdir}", f"--out={out}", "--format=jax", "--platforms=cpu,cuda",
                cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ssd.jax" in proc.stdout and "export.json" in proc.stdout
    assert json.load(open(out / "export.json"))["platforms"] == ["cpu", "cuda"]
    for args, message in [
        ((f"--workdir={workdir}", f"--out={tmp_path / 'x'}", "--format=tflite"),
         "error: --format=tflite: unknown format 'tflite'; choose one or more of jax, savedmodel, "
         "onnx"),
        ((f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}", "--format=jax"),
         f"error: --workdir={tmp_path} is not a training workdir"),
        ((f"--workdir={workdir}", f"--out={out}", "--format=jax"),
         f"error: --out={out} already holds ssd.jax"),
        ((f"--workdir={workdir}", "--format=jax"), "error: --out and --format are required"),
    ]:
        proc = _cli(*args, cwd=str(tmp_path))
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
