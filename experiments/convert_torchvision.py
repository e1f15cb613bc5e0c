"""Convert torchvision weights to an ssd_jax orbax checkpoint.

    python -m experiments.convert_torchvision --kind ssd300 --input ssd300_vgg16_coco-b556d3b4.pth \
        --output /tmp/ssd300_tv
    python -m experiments.convert_torchvision --kind vgg16 --input vgg16-397923af.pth \
        --output /tmp/vgg16_backbone [--no-fc]

--kind ssd300: a torchvision ssd300_vgg16 state dict -> the full variables of
  `ssd300_vgg16(num_classes, SSD300_TORCHVISION, image_mean=TORCHVISION_MEAN)`.
--kind vgg16: torchvision ImageNet vgg16 weights -> {"params": {"backbone": ...}} with reduced
  fc6/fc7 (or without them, --no-fc, for features-only weights); use as `config.init_checkpoint`,
  merged into freshly initialized variables with `ssd_jax.convert.merge_params`.
The input is a .pth/.pt (torch.load with weights_only=True) or a .safetensors file.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from ssd_jax import convert


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("ssd300", "vgg16"), required=True)
    parser.add_argument("--input", required=True, help=".pth/.pt or .safetensors state dict")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--no-fc", action="store_true",
                        help="vgg16: skip fc6/fc7 (weights without a valid classifier)")
    args = parser.parse_args(argv)

    state_dict = convert.load_state_dict(args.input)
    if args.kind == "ssd300":
        model, variables = convert.from_torchvision_ssd(state_dict)
        print(f"ssd300_vgg16: num_classes={model.num_classes}, priors=SSD300_TORCHVISION "
              f"({model.prior_spec.num_priors}), image_mean={model.image_mean}")
    else:
        variables = convert.vgg16_backbone_from_torchvision(state_dict, include_fc=not args.no_fc)
        layers = sorted(variables["params"]["backbone"])
        print(f"vgg16 backbone: {len(layers)} layers ({', '.join(layers)})")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    output = os.path.abspath(args.output)
    convert.save_checkpoint(output, variables)
    print(f"wrote {n:,} parameters to {output}")
    return output


if __name__ == "__main__":
    main()
