"""The embedded default: the compact SSD trained from scratch on the synthetic shapes dataset.

Runs on a 2-core CPU in minutes: `python -m experiments.train --workdir=DIR`. Its fields, each
with its default and what it does, are the library's config schema, `ssd_jax.config.get_config`
(`--print_config` lists them); every other config here starts from it and changes a few fields.
"""

import ml_collections

from ssd_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    return config_lib.get_config()
