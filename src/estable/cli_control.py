"""ControlNet on the command line: ``estable control-image`` and the ``--control`` / ``--controlnet`` flags of
``generate``, ``img2img`` and ``inpaint``.

``--control TYPE:IMAGE[:WEIGHT]`` (repeatable) names a control image and how to make it from IMAGE (canny,
scribble, lines, seg, or none for an image that already is a control map); ``--controlnet FILE`` (repeatable) names
the ControlNet for each ``--control``, matched in order (``default``: the built-in model's Canny-edges ControlNet,
shipped with it). Everything that can be checked before the model loads is checked first (types, files, counts,
ranges).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .control.units import ControlSpec, resolve_controlnet
from .errors import EstableError

__all__ = ["ControlSpec", "add_control_commands", "add_control_flags", "control_specs", "control_units"]

_TYPES = ("canny", "scribble", "lines", "seg", "none")


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """The ControlNet flags of the generation commands."""
    p.add_argument("--control", action="append", metavar="TYPE:IMAGE[:WEIGHT]",
                   help=f"steer the image with a ControlNet: TYPE is how the control image is made from IMAGE "
                   f"({', '.join(_TYPES)}; none = IMAGE already is one), WEIGHT its strength (default 1); "
                   "repeatable, one --controlnet per --control")
    p.add_argument("--controlnet", action="append", metavar="FILE",
                   help="ControlNet file or folder (SD single file with control_model. keys, diffusers folder or "
                   "Estable file) for each --control, in the same order; 'default' is the built-in model's "
                   "Canny-edges ControlNet")
    p.add_argument("--control-start", type=float, metavar="F",
                   help="fraction of the schedule where control starts (default 0)")
    p.add_argument("--control-end", type=float, metavar="F", help="fraction where it ends (default 1)")
    p.add_argument("--guess-mode", action="store_true", default=None,
                   help="ControlNet guess mode: the control image carries the structure even without a prompt "
                   "(try --cfg 3 to 5)")


def parse_control(text: str) -> tuple[str, str, float]:
    """``TYPE:IMAGE[:WEIGHT]`` → (type, image path, weight). EstableError for anything else."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest or kind not in _TYPES:
        raise EstableError(f"--control must be TYPE:IMAGE[:WEIGHT] with TYPE one of {', '.join(_TYPES)}, "
                           f"not {text!r}")
    path, scale = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a colon that belongs to the path
    return kind, path, scale


def control_specs(args: argparse.Namespace, record: dict[str, Any] | None = None) -> list[ControlSpec]:
    """The checked --control/--controlnet pairs; without them, the units of ``record`` (an image's Estable record,
    for --from-png); empty when there are none."""
    controls = getattr(args, "control", None) or []
    nets = getattr(args, "controlnet", None) or []
    if not controls and not nets:
        for flag in ("control_start", "control_end", "guess_mode"):
            if getattr(args, flag, None) is not None:
                raise EstableError(f"--{flag.replace('_', '-')} needs --control and --controlnet")
        return specs_from_record(record) if record is not None else []
    if len(controls) != len(nets):
        raise EstableError(f"{len(controls)} --control but {len(nets)} --controlnet: give one ControlNet per control "
                           "image, in the same order")
    out = []
    for text, net in zip(controls, nets):
        kind, image, scale = parse_control(text)
        if not Path(image).is_file():
            raise EstableError(f"control image not found: {image}")
        net_path = resolve_controlnet(net)
        if not net_path.exists():
            raise EstableError(f"ControlNet not found: {net}")
        if not 0.0 <= scale <= 10.0:
            raise EstableError(f"control weight must be between 0 and 10, not {scale:g}")
        out.append(ControlSpec(kind, Path(image), scale, net_path))
    start = 0.0 if args.control_start is None else args.control_start
    end = 1.0 if args.control_end is None else args.control_end
    if not 0.0 <= start < end <= 1.0:
        raise EstableError(f"--control-start/--control-end must satisfy 0 ≤ start < end ≤ 1, got {start:g}, {end:g}")
    return [ControlSpec(s.kind, s.image, s.scale, s.controlnet, start, end, bool(args.guess_mode)) for s in out]


def specs_from_record(record: dict[str, Any]) -> list[ControlSpec]:
    """The ControlNet units an Estable record lists (its ``control`` entry), their files checked."""
    units = record.get("control") or []
    out = []
    for k, u in enumerate(units):
        try:
            spec = ControlSpec(str(u["type"]), Path(u["image"]), float(u["scale"]), Path(u["model"]["source"]),
                               float(u["start"]), float(u["end"]), bool(u["guess_mode"]))
        except (KeyError, TypeError, ValueError):
            raise EstableError(f"the record's ControlNet unit {k} is incomplete; pass --control and --controlnet") \
                from None
        if spec.kind not in _TYPES:
            raise EstableError(f"the record's ControlNet unit {k} has an unknown type {spec.kind!r}")
        for what, path in (("control image", spec.image), ("ControlNet", spec.controlnet)):
            if not path.exists():
                raise EstableError(f"the image was made with the {what} {path}, which is not there; pass --control "
                                   "and --controlnet")
        out.append(spec)
    return out


def control_units(specs: list[ControlSpec], args: argparse.Namespace, pipe: Any) -> list[Any]:
    """Load each ControlNet for ``pipe``'s U-Net (its dtype and device) and make each control image."""
    from .control.units import load_control_units

    return load_control_units(specs, pipe, allow_pickle=bool(getattr(args, "allow_pickle", False)))


# ------------------------------------------------------------------------------------------- control-image


def add_control_commands(sub: argparse._SubParsersAction) -> None:
    from .control.preprocess import CONTROL_TYPES

    p = sub.add_parser(
        "control-image", help="make a ControlNet control image (Canny edges, scribble, lines, segmentation)",
        description="Make the control image that --control TYPE:IMAGE would use, to preview it. Types: "
        + "; ".join(f"{k}: {v}" for k, v in CONTROL_TYPES.items()) + ".",
    )
    p.add_argument("type", metavar="TYPE", choices=list(CONTROL_TYPES), help=", ".join(CONTROL_TYPES))
    p.add_argument("image", metavar="IMAGE", help="the input picture")
    p.add_argument("out", metavar="OUT", help="the control image to write (.png)")
    p.add_argument("--low", type=float, metavar="F", help="Canny low threshold, 0..2040 (canny 100, scribble 40)")
    p.add_argument("--high", type=float, metavar="F", help="Canny high threshold (canny 200, scribble 80)")
    p.add_argument("--sigma", type=float, metavar="F",
                   help="Gaussian smoothing before Canny, 0..50 (canny 0, scribble 2)")
    p.add_argument("--thickness", type=int, metavar="N", help="stroke width in pixels, 1..64 (scribble 3, lines 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (the input image is never replaced)")
    p.set_defaults(func=_cmd_control_image)


def _cmd_control_image(args: argparse.Namespace) -> int:
    from .control.preprocess import MAX_SIGMA, MAX_THICKNESS, make_control_image
    from .images import load_image
    from .outputs import check_new_file, same_file

    allowed = {"canny": ("low", "high", "sigma"), "scribble": ("low", "high", "sigma", "thickness"),
               "lines": ("thickness",), "seg": (), "none": ()}[args.type]
    options: dict[str, Any] = {}
    for name in ("low", "high", "sigma", "thickness"):
        value = getattr(args, name)
        if value is not None:
            if name not in allowed:
                raise EstableError(f"--{name} does not apply to control type {args.type}")
            options[name] = value
    if args.thickness is not None and not 1 <= args.thickness <= MAX_THICKNESS:
        raise EstableError(f"--thickness must be from 1 to {MAX_THICKNESS} pixels, not {args.thickness}")
    if args.sigma is not None and not (math.isfinite(args.sigma) and 0 <= args.sigma <= MAX_SIGMA):
        raise EstableError(f"--sigma must be a number from 0 to {MAX_SIGMA:g}, not {args.sigma:g}")
    picture = load_image(args.image)  # a missing or unreadable input is reported first
    out = Path(args.out)
    if same_file(out, args.image):
        raise EstableError(f"OUT {out} is the input image {args.image}; choose another output name "
                           "(an input is never written over)")
    if str(out.parent) and not out.parent.is_dir():
        raise EstableError(f"cannot write {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise EstableError(f"OUT {out} is a folder; name the .png file to write")
    check_new_file(out, overwrite=args.overwrite, inputs=[args.image])
    image = make_control_image(args.type, picture, **options)
    try:
        image.save(out)
    except (OSError, ValueError) as exc:
        raise EstableError(f"cannot write {out}: {exc}") from None
    print(out)
    return 0
