r"""Convert torchvision weights to an ssd_jax orbax checkpoint.

    python -m experiments.convert_torchvision --kind=ssd300 --input=ssd300_vgg16_coco-b556d3b4.pth \
        --output=/tmp/ssd300_tv
    python -m experiments.convert_torchvision --input=ssdlite320_mobilenet_v3_large_coco-a79551df.pth \
        --output=/tmp/ssdlite_tv
    python -m experiments.convert_torchvision --kind=vgg16 --input=vgg16-397923af.pth \
        --output=/tmp/vgg16_backbone [--nofc]
    python -m experiments.convert_torchvision --kind=resnet50 --input=resnet50-0676ba61.pth \
        --output=/tmp/resnet50_backbone
    python -m experiments.convert_torchvision --kind=mobilenet_v3 \
        --input=mobilenet_v3_large-8738ca79.pth --output=/tmp/mobilenet_v3_backbone

--kind=ssd300: a torchvision ssd300_vgg16 state dict -> the full variables of
  `ssd300_vgg16(num_classes, SSD300_TORCHVISION, image_mean=TORCHVISION_MEAN)`.
--kind=ssdlite320: a torchvision ssdlite320_mobilenet_v3_large state dict -> the full variables
  (params and BatchNorm statistics) of `ssdlite320_mobilenet_v3(num_classes)`.
Without --kind, a detector state dict (ssd300 or ssdlite320) is recognized from its keys. A
detector's checkpoint carries its model name and class names (ssd_jax_checkpoint.json): COCO's
91-slot layout for torchvision's COCO weights, --class_names for a detector trained on other
classes; fine-tuning maps its heads to a dataset's classes by these names (ssd_jax.finetune).
--kind=vgg16: torchvision ImageNet vgg16 weights -> {"params": {"backbone": ...}} with reduced
  fc6/fc7 (or without them, --nofc, for features-only weights); use as `config.init_checkpoint`,
  merged into freshly initialized variables with `ssd_jax.convert.merge_params`.
--kind=resnet50: torchvision ImageNet resnet50 weights -> {"params": {"backbone": ...},
  "batch_stats": {"backbone": ...}} (conv1..layer3, BatchNorm statistics included) of
  `ssd300_resnet50`; use as `config.init_checkpoint` (experiments/configs/ssd300_resnet50_coco.py),
  where both collections are merged into the fresh variables.
--kind=mobilenet_v3: torchvision ImageNet mobilenet_v3_large weights -> the backbone (params and
  BatchNorm statistics) of `ssdlite320_mobilenet_v3` with config.model.reduced_tail=False, as
  torchvision's SSDLite starts from them.
The input is a .pth/.pt (torch.load with weights_only=True) or a .safetensors file. An existing
checkpoint at --output is replaced; a folder there that holds something else is refused.

From Python: `main(["--kind=ssd300", "--input=X.pth", "--output=DIR"])` parses those flags (into
its own FlagValues, leaving absl's global FLAGS alone) and returns the checkpoint's absolute path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from ssd_jax import cli
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS
KINDS = ("ssd300", "ssdlite320", "vgg16", "resnet50", "mobilenet_v3")
#: --kind of each torchvision detector (ssd_jax.convert.TORCHVISION_DETECTORS).
DETECTOR_KINDS = {"ssd300_vgg16": "ssd300", "ssdlite320_mobilenet_v3": "ssdlite320"}
#: Files of the checkpoint folder that orbax's StandardCheckpointer writes: a folder holding one of
#: them may be replaced by --output, any other non-empty folder is refused (save removes it).
CHECKPOINT_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv`."""
    if "kind" in fv:
        return
    flags.DEFINE_enum("kind", None, KINDS, "ssd300: a torchvision ssd300_vgg16 state dict; "
                      "ssdlite320: ssdlite320_mobilenet_v3_large; vgg16: torchvision ImageNet "
                      "vgg16 weights (the backbone only); resnet50: torchvision ImageNet resnet50 "
                      "weights (the backbone of ssd300_resnet50: conv1..layer3 with BatchNorm "
                      "statistics); mobilenet_v3: torchvision ImageNet mobilenet_v3_large "
                      "weights (the backbone of ssdlite320_mobilenet_v3 with reduced_tail=False). "
                      "Default: the detector recognized from the state dict's keys.",
                      flag_values=fv)
    flags.DEFINE_string("input", None, "The .pth/.pt or .safetensors state dict. Required.",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "The checkpoint folder to write (an existing checkpoint "
                        "there is replaced). Required.", flag_values=fv)
    flags.DEFINE_list("class_names", None, "A detector's class names in label order, background "
                      "excluded (comma-separated), saved with the checkpoint. Default: COCO's "
                      "91-slot layout for a 91-class detector (torchvision's COCO weights).",
                      flag_values=fv)
    flags.DEFINE_boolean("fc", True, "vgg16: convert fc6/fc7 too (--nofc for weights without a "
                         "valid classifier).", flag_values=fv)


def convert_file(kind: str | None, input_path: str, output: str, fc: bool = True,
                 class_names: Sequence[str] | None = None) -> str:
    """Convert the state dict at `input_path` (`kind` one of KINDS; None: the detector its keys
    show) and save it as an orbax checkpoint at `output`, a detector's with its `class_names`
    (default: COCO's for 91 classes); returns the checkpoint's absolute path.
    Mistakes (a missing or unreadable input, an input of another kind, an output that is a file)
    raise UserError or FileNotFoundError."""
    import jax
    import numpy as np

    from ssd_jax import convert

    output = os.path.abspath(output)
    _check_output(output)
    try:
        state_dict = convert.load_state_dict(input_path)
    except FileNotFoundError as e:
        raise UserError(f"--input={input_path}: no such file") from e
    except convert.StateDictError as e:
        raise UserError(f"--input={input_path}: {e}") from e
    detector = convert.torchvision_detector_name(state_dict)
    if kind is None:
        if detector is None:
            backbones = ", ".join(k for k in KINDS if k not in DETECTOR_KINDS.values())
            raise UserError(f"--input={input_path} is not a torchvision ssd300_vgg16 or "
                            f"ssdlite320_mobilenet_v3_large state dict; for backbone weights "
                            f"give --kind ({backbones})")
        kind = DETECTOR_KINDS[detector]
    elif kind in DETECTOR_KINDS.values() and detector and DETECTOR_KINDS[detector] != kind:
        raise UserError(f"--input={input_path} is a torchvision {detector} state dict, not "
                        f"--kind={kind}; use --kind={DETECTOR_KINDS[detector]} (or leave --kind out)")
    try:
        if kind == "ssd300":
            model, variables = convert.from_torchvision_ssd(state_dict)
        elif kind == "ssdlite320":
            model, variables = convert.from_torchvision_ssdlite(state_dict)
        elif kind == "resnet50":
            variables = convert.resnet50_backbone_from_torchvision(state_dict)
        elif kind == "mobilenet_v3":
            variables = convert.mobilenet_v3_backbone_from_torchvision(state_dict)
        else:
            variables = convert.vgg16_backbone_from_torchvision(state_dict, include_fc=fc)
    except convert.StateDictError as e:
        hint = " (or --nofc for features-only weights)" if kind == "vgg16" and fc else ""
        raise UserError(f"--input={input_path} is not a torchvision {kind} state dict: {e}; "
                        f"check --kind{hint}") from e
    if kind == "ssd300":
        print(f"ssd300_vgg16: num_classes={model.num_classes}, priors=SSD300_TORCHVISION "
              f"({model.prior_spec.num_priors}), image_mean={model.image_mean}")
    elif kind == "ssdlite320":
        print(f"ssdlite320_mobilenet_v3: num_classes={model.num_classes}, priors=SSDLITE320 "
              f"({model.prior_spec.num_priors}), config.model.name=ssdlite320_mobilenet_v3")
    elif kind == "mobilenet_v3":
        print("mobilenet_v3_large backbone (ssdlite320_mobilenet_v3, config.model.reduced_tail="
              "False): stem, 15 blocks, last conv; params and batch_stats")
    elif kind == "resnet50":
        blocks = [b for b in variables["params"]["backbone"] if b != "stem"]
        print(f"resnet50 backbone (ssd300_resnet50): stem + {len(blocks)} bottleneck blocks "
              f"(layer1..layer3; layer4 and fc dropped), params and batch_stats")
    else:
        layers = sorted(variables["params"]["backbone"])
        print(f"vgg16 backbone: {len(layers)} layers ({', '.join(layers)})")
    names, model_name = None, None
    if kind in DETECTOR_KINDS.values():
        names = _class_names(class_names, model.num_classes, input_path)
        model_name = next(k for k, v in DETECTOR_KINDS.items() if v == kind)
        if names:
            print(f"classes: {len(names)} ({', '.join(n for n in names[:5] if n != 'N/A')}, ...)")
    elif class_names:
        raise UserError(f"--class_names: --kind={kind} is backbone weights, which have no classes")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    convert.save_checkpoint(output, variables, model=model_name, class_names=names)
    print(f"wrote {n:,} parameters to {output}")
    return output


def _class_names(given: Sequence[str] | None, num_classes: int, input_path: str
                 ) -> tuple[str, ...] | None:
    """A detector's class names: `given` (checked against its heads), COCO's 91-slot layout for
    a 91-class detector, else None (unknown: fine-tuning then needs the same class count)."""
    from ssd_jax.coco import COCO_CATEGORIES_91

    if given:
        names = tuple(n.strip() for n in given)
        if len(names) != num_classes - 1:
            raise UserError(f"--class_names: {len(names)} names, but the detector in "
                            f"{input_path} has {num_classes - 1} classes (+ background)")
        return names
    if num_classes == len(COCO_CATEGORIES_91):
        return COCO_CATEGORIES_91[1:]
    print(f"note: the class names of these {num_classes - 1} classes are unknown; give them in "
          f"label order with --class_names=a,b,... to fine-tune on other classes by name")
    return None


def _check_output(output: str) -> None:
    """UserError when the checkpoint cannot (or must not) be written at `output`."""
    if os.path.isfile(output):
        raise UserError(f"--output={output} is a file; give a folder for the checkpoint")
    if os.path.isdir(output) and os.listdir(output) and not any(
            os.path.exists(os.path.join(output, m)) for m in CHECKPOINT_MARKERS):
        raise UserError(f"--output={output} is a folder that holds something other than a "
                        f"checkpoint (saving would replace it); give a new or empty folder")
    parent = os.path.dirname(output)  # the nearest existing folder above must be a folder
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UserError(f"--output={output}: {parent} is a file, not a folder")


def _convert_flags(fv: flags.FlagValues) -> str:
    missing = [f"--{name}" for name in ("input", "output") if fv[name].value is None]
    if missing:
        raise UserError(f"{', '.join(missing)} required (--help lists the flags)")
    return convert_file(fv.kind, fv.input, fv.output, fc=fv.fc, class_names=fv.class_names)


def main(argv: Sequence[str]) -> str:
    """Convert from Python: `argv` are command-line flags (no program name), e.g.
    ``["--kind=ssd300", "--input=X.pth", "--output=DIR"]``, parsed into a FlagValues of their
    own (a bad flag raises UserError). Returns the checkpoint's absolute path."""
    fv = flags.FlagValues()
    define_flags(fv)
    cli.parse_flags(fv, "convert_torchvision", argv)
    return _convert_flags(fv)


def run(argv: Sequence[str] | None = None) -> None:
    """The `ssd-convert-torchvision` console script (`argv`: the full command line, default
    sys.argv)."""
    define_flags(FLAGS)

    def absl_main(args: list[str]) -> None:
        if len(args) > 1:
            raise UserError(f"unexpected arguments: {' '.join(args[1:])}")
        _convert_flags(FLAGS)

    cli.run(absl_main, argv=argv)


if __name__ == "__main__":
    run()
