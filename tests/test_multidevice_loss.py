"""multibox_loss with axis_name under jax.shard_map over 8 simulated CPU devices.

Runs in a subprocess: XLA_FLAGS must be set before JAX starts, and other tests keep one device.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from ssd_jax import loss, matching, priors
    from tests.conftest import random_gt_batch

    assert jax.device_count() == 8, jax.devices()
    pri = priors.generate_priors(priors.SSD300_VOC)
    rng = np.random.default_rng(0)
    counts = [0, 3, 1, 9, 2, 0, 14, 5, 1, 1, 6, 0, 2, 8, 3, 4]  # uneven positives per shard
    boxes, labels = random_gt_batch(rng, counts, 16)
    logits = rng.normal(0, 2, (16, pri.shape[0], 21)).astype(np.float32)
    preds = rng.normal(0, 1, (16, pri.shape[0], 4)).astype(np.float32)
    cls_t, box_t = matching.match_batch(boxes, labels, pri)

    def f(lg, pr, ct, bt):
        return loss.multibox_loss(lg, pr, ct, bt)[0]

    ref_value, ref_grads = jax.value_and_grad(f, argnums=(0, 1))(logits, preds, cls_t, box_t)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    def per_device(lg, pr, ct, bt):
        return loss.multibox_loss(lg, pr, ct, bt, axis_name="data")[0]
    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P()))
    value = sharded(logits, preds, cls_t, box_t)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)

    # gradients w.r.t. the sharded inputs equal the single-device gradients of the global loss
    grads = jax.jit(jax.grad(lambda *a: sharded(*a), argnums=(0, 1)))(logits, preds, cls_t, box_t)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-9)
    print("OK", float(value), float(ref_value))
""")


def test_shard_map_loss_over_8_devices_equals_single_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
