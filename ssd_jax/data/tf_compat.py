"""TensorFlow for host-side data work, with every GPU hidden from it (done once, on import).

Modules of `ssd_jax.data` import `tf` from here, so TensorFlow never grabs accelerator memory
that JAX needs. The import itself is quiet: TensorFlow's C++ start-up banners (oneDNN notices
written before its logging is initialized, which TF_CPP_MIN_LOG_LEVEL does not silence) are
dropped unless SSD_JAX_DEBUG is set; if the import fails, what it printed is shown.
"""

from __future__ import annotations

import os
import sys


def _import_tensorflow():
    if "tensorflow" in sys.modules or os.environ.get("SSD_JAX_DEBUG", "") not in ("", "0"):
        import tensorflow

        return tensorflow
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
        except BaseException:  # the import failed: what it printed is the explanation
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tensorflow


tf = _import_tensorflow()

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialized: nothing left to hide
    pass

__all__ = ["tf"]
