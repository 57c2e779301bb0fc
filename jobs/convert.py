"""Published CapeNext / CapeX weights → our checkpoint: ``python -m jobs.convert --official PATH --out PATH``.

Reads the official ``.pth`` (an mmcv checkpoint: ``state_dict`` + ``meta``; the optimizer state is
ignored) with ``torch.load(weights_only=True)``, maps every tensor onto our model with
:func:`capenext.convert.convert_state_dict` (a strict check: any unmapped, missing or mis-shaped tensor
stops it, one line per problem naming both keys, and nothing is written) and writes our ordinary
checkpoint (state_dict + config, ``meta`` with the source file's sha256 and kind) through a temporary
file and a rename. The result works with ``jobs.evaluate``, ``jobs.predict`` and ``Predictor``.
``capex`` is CapeX trained with CLIP ViT-B/32; CapeX's own published weights use the GTE text encoder
(768 wide) and are refused in one line.

CLIP: our checkpoints leave the frozen CLIP out and name its weights file in the config. With
``--clip-checkpoint PATH`` (the OpenAI ViT-B-32 file that ``pipelines.embed`` used, so the embedding
tables match) the config names that file; when the official file holds CLIP too (the reference keeps
it as ``text_backbone``), both are compared and a difference is reported. Without
``--clip-checkpoint``, the official file's own CLIP is written beside the output (``OUT.clip.pt``,
open_clip layout) and the config names it.

Sizes: our config is the ``--backbone`` preset (Swin V2-T, d 256, CLIP ViT-B-32: the published files).
``--set KEY=VALUE`` changes its fields for a file of other sizes (the test suite's reduced official model,
``jobs.conversion.fixture``); the backbone must stay a Swin V2, and the fields the conversion sets itself
(the ablation from the kind, the online image embedding, its normalisation, the CLIP file) cannot be set.

Keypoint texts: the published weights were trained and tested with the reference's regular texts (its
``regular_descriptions``); the output's meta says so (``keypoint_texts: reference:regular``), and
``jobs.evaluate`` refuses the checkpoint without them (``--descriptions`` from
``python -m pipelines.descriptions``).

Loading: ``weights_only=True`` first. If the file's ``meta`` holds numpy values, it is loaded again
with a fixed list of numpy's array/scalar/dtype globals allowed (still weights_only; said on stdout):
the names mmcv's numpy scalars and arrays pickle to, in numpy 1's and numpy 2's spelling, resolved from
modules this file imports itself, never from a name in the file. Anything else (another numpy function
such as ``numpy.load``, any other module's) is refused with one line naming it, before anything of the
file is run: a checkpoint is never unpickled in full (that would run code from the file).
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from capenext.cli import UsageError, one_line, run_main
from capenext.files import file_sha256, not_a_checkpoint

SUPPORTED_BACKBONES = ("swinv2_t",)  # the published weights are Swin V2-T
MAX_PROBLEM_LINES = 100
META_KEYS = ("mmcv_version", "mmpose_version", "epoch", "iter", "time", "seed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.convert",
        description="Convert a published CapeNext checkpoint (or a CapeX one trained with CLIP ViT-B/32; CapeX's own "
                    "published weights use the GTE text encoder and cannot be converted) from mmpose/mmcv .pth into "
                    "our checkpoint format, checking that every tensor maps (nothing is written otherwise).",
        epilog="examples:\n"
               "  python -m jobs.convert --official capenext_split1.pth --kind capenext "
               "--clip-checkpoint ViT-B-32.pt --out capenext_split1.pt\n"
               "  python -m jobs.evaluate --checkpoint capenext_split1.pt --split 1 --shards shards "
               "--embeddings emb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--official", type=Path, required=True, help="the official .pth file (mmcv checkpoint)")
    p.add_argument("--kind", choices=("capenext", "capex"), default=None,
                   help="what the file is: capenext (HCMI + DSFR, our 'full' preset) or capex (CapeX with "
                        "CLIP ViT-B/32, no fusion module, our 'baseline'); default: detected from the file, "
                        "and checked when given")
    p.add_argument("--backbone", default="swinv2_t",
                   help=f"our backbone preset (default swinv2_t; supported: {', '.join(SUPPORTED_BACKBONES)})")
    p.add_argument("--clip-checkpoint", default=None, metavar="PATH|random",
                   help="CLIP weights the converted model names in its config (the OpenAI ViT-B-32 file used by "
                        "pipelines.embed); default: the official file's own CLIP, written to --clip-out")
    p.add_argument("--clip-out", type=Path, default=None,
                   help="where the official file's CLIP goes when --clip-checkpoint is not given "
                        "(default: OUT with suffix .clip.pt)")
    p.add_argument("--out", type=Path, required=True, help="our checkpoint to write (.pt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of our config (repeatable), for a file of other sizes than the published "
                        "ones, e.g. the test fixture's (jobs.conversion.fixture): --set model.dim=32; the backbone "
                        "must stay a Swin V2, and the fields the conversion sets itself cannot be overridden")
    return p.parse_args(argv)


# set by the conversion from the file (kind) and from how the reference ran; --set cannot change them
CONVERSION_FIELDS = ("model.ablation", "model.image_embedding", "model.clip_image_norm", "model.backbone_checkpoint",
                     "model.clip_checkpoint")


def our_config(args: argparse.Namespace):
    """Our config: the ``--backbone`` preset, the ``--set`` items, then the settings the published weights were
    trained with (the ablation follows the file's kind, set by :func:`main`)."""
    from capenext.config import load_preset, override, parse_sets

    cfg = load_preset(args.backbone)
    sets = parse_sets(args.overrides)
    fixed = [k for k in sets if k in CONVERSION_FIELDS]
    if fixed:
        raise UsageError(f"--set {fixed[0]}: set by the conversion itself (the kind, and how the reference ran); "
                         f"--set cannot change {list(CONVERSION_FIELDS)}")
    cfg = override(cfg, sets)
    # as the reference trained them: CLIP's image embedding inside the forward, from the ImageNet-normalised crop
    cfg.model.image_embedding = "online"
    cfg.model.clip_image_norm = "imagenet"
    cfg.model.backbone_checkpoint = None
    cfg.model.clip_checkpoint = args.clip_checkpoint or "random"  # the file's own CLIP is loaded by main
    return cfg


def check_swin(model, backbone: str) -> None:
    """One line when ``--set model.backbone`` named a backbone whose trunk is not timm's Swin V2."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    if not isinstance(getattr(model.backbone, "trunk", None), SwinTransformerV2):
        raise UsageError(f"--set model.backbone={backbone!r}: not a Swin V2 backbone; the official weights are Swin "
                         f"V2 (e.g. {SUPPORTED_BACKBONES[0]})")


# The numpy globals a real mmcv/mmpose checkpoint's ``meta`` needs (numpy scalars such as ``best_score``,
# small arrays), in numpy 1's spelling (``numpy.core``: the published files) and numpy 2's (``numpy._core``).
# A FIXED list, resolved from modules this file imports itself: a name read from the file is never imported.
# Everything else numpy has (``numpy.load``, ``numpy.testing``'s helpers, object arrays) is refused: the
# weights_only unpickler calls whatever it is allowed to, so one wrong name there runs code from the file.
NUMPY_ARRAY_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                       "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                       "numpy.ndarray", "numpy.dtype")
# the dtypes whose instances the unpickler BUILDs (numpy's own dtype classes, ``numpy.dtypes.Float64DType`` …):
# booleans, integers, floats, complex, bytes, str, datetime/timedelta; no object ('O') or void ('V') dtype
NUMPY_DTYPE_CODES = "?bBhHiIlLqQefdgFDGSUMm"


def numpy_safe_globals() -> list[tuple[Any, str]]:
    """``(object, name)`` pairs for ``torch.serialization.safe_globals``: exactly the names above."""
    import numpy as np

    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    objects = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar, "ndarray": np.ndarray,
               "dtype": np.dtype}
    pairs: list[tuple[Any, str]] = [(objects[name.rpartition(".")[2]], name) for name in NUMPY_ARRAY_GLOBALS]
    for code in NUMPY_DTYPE_CODES:
        cls = type(np.dtype(code))
        pairs.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return pairs


def _blocked_globals(path: Path) -> list[str]:
    """The globals a zip checkpoint names outside torch's own allowlist (read without unpickling anything)."""
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: cannot list them
        return []


def _named_in(err: BaseException) -> list[str]:
    """The globals or classes torch's weights_only unpickler names in its refusal."""
    return list(dict.fromkeys(re.findall(r"(?:GLOBAL |<class ')([\w.]+)", str(err))))


def _said(err: BaseException) -> str:
    line = one_line(err, 160)
    return line if line.startswith(type(err).__name__) else f"{type(err).__name__}: {line}"


def _refuse(path: Path, names: list[str]) -> ValueError:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return ValueError(f"--official {path}: cannot be read with weights_only=True, it holds {shown} (outside torch's "
                      "tensor globals and numpy's array/scalar/dtype ones); nothing unpickled from it was run and "
                      "nothing written: re-save its state_dict and meta as plain tensors, numbers and strings")


def read_official(path: Path) -> tuple[Any, list[str]]:
    """The unpickled file and notes on how it was read; one-line errors for missing, unreadable or unsafe files.

    ``weights_only=True`` first; if that refuses a global, the globals the file names are listed (without
    unpickling) and anything outside :data:`NUMPY_ARRAY_GLOBALS` is refused by name; otherwise the file is
    read again, still weights_only, with only those numpy names (and the dtype classes) allowed.
    """
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"--official {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError:
        pass
    except Exception as err:  # noqa: BLE001 - truncated zips, foreign files: torch raises several types
        raise ValueError(f"--official {path}: {not_a_checkpoint(path)}; torch.load said {_said(err)}") from None
    allowed = numpy_safe_globals()
    names = {name for _, name in allowed}
    foreign = [g for g in sorted(_blocked_globals(path)) if g not in names]
    if foreign:  # refused before anything of the file is unpickled
        raise _refuse(path, foreign)
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _named_in(err)
        if refused:  # a global or class outside the list (a legacy file, or an object dtype)
            raise _refuse(path, refused) from None
        raise ValueError(f"--official {path}: {not_a_checkpoint(path)}; torch.load said {_said(err)}") from None
    except Exception as err:  # noqa: BLE001 - as above
        raise ValueError(f"--official {path}: {not_a_checkpoint(path)}; torch.load said {_said(err)}") from None
    return obj, [(f"{path.name} holds numpy values: read with weights_only=True and only numpy's array, scalar "
                  "and dtype globals allowed")]


def split_checkpoint(obj: Any, path: Path) -> tuple[dict, dict, list[str]]:
    """``(state_dict, meta, notes)`` from an mmcv checkpoint (or a bare state_dict, said in a note)."""
    import torch

    notes: list[str] = []
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
        notes.append(f"{path.name} is a bare state_dict (no mmcv 'state_dict'/'meta')")
    else:
        what = f"top-level keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"--official {path}: not an mmcv checkpoint (no 'state_dict'; {what})")
    if state and all(k.startswith("module.") for k in state):
        state = OrderedDict((k[len("module."):], v) for k, v in state.items())
    if not isinstance(meta, dict):
        meta = {}
    return state, meta, notes


def source_meta(meta: dict) -> dict[str, Any]:
    """The official meta's plain fields (numbers become Python numbers, the rest strings)."""
    out: dict[str, Any] = {}
    for key in META_KEYS:
        if key in meta:
            v = meta[key]
            if hasattr(v, "item") and getattr(v, "shape", None) == ():  # a numpy scalar: its Python number
                v = v.item()
            out[key] = v if isinstance(v, (str, int, float, bool)) else (float(v) if hasattr(v, "__float__")
                                                                          else str(v))
    return out


def official_split(meta: dict) -> int | None:
    """The MP-100 split the official run trained on, read from the config text in its meta."""
    m = re.search(r"mp100_split(\d)_", str(meta.get("config", "")))
    return int(m[1]) if m else None


def compare_clip(conv_clip: dict, model) -> tuple[int, int]:
    """(tensors that differ, tensors compared) between the file's CLIP and the model's."""
    import torch

    mine = model.clip.model.state_dict()
    differ = sum(not torch.allclose(v.float(), mine[k].float(), rtol=1e-3, atol=1e-3) for k, v in conv_clip.items())
    return differ, len(conv_clip)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backbone not in SUPPORTED_BACKBONES:
        raise UsageError(f"--backbone {args.backbone!r}: only {list(SUPPORTED_BACKBONES)} can be converted (the "
                         "published CapeNext/CapeX weights are Swin V2-T)")
    official, out = args.official, args.out
    if out.resolve() == official.resolve():
        raise UsageError("--out must differ from --official")
    if args.clip_checkpoint not in (None, "random") and not Path(args.clip_checkpoint).is_file():
        raise FileNotFoundError(f"--clip-checkpoint {args.clip_checkpoint}: no such file (or use 'random')")
    clip_out = args.clip_out or out.with_name(out.stem + ".clip.pt")
    if args.clip_checkpoint is None and clip_out.resolve() in (out.resolve(), official.resolve()):
        raise UsageError(f"--clip-out {clip_out} must differ from --out and --official")

    from capenext.checkpoint import atomic_save, load_weights, save_checkpoint
    from capenext.convert import KINDS, ConversionError, convert_state_dict
    from capenext.models import build_model

    cfg = our_config(args)  # a bad --set is one line before the file is read

    print(f"reading {official} ...", flush=True)
    obj, notes = read_official(official)
    state, meta, more = split_checkpoint(obj, official)
    for note in notes + more:
        print(f"note: {note}", flush=True)
    has_clip = any(k.startswith("text_backbone.") for k in state)
    if args.clip_checkpoint is None and not has_clip:
        raise UsageError(f"{official} holds no CLIP weights (no text_backbone.* keys): pass --clip-checkpoint PATH "
                         "(OpenAI's ViT-B-32, as the reference) or --clip-checkpoint random")

    kind = args.kind or ("capenext" if any(k.startswith("additional_module.") for k in state) else "capex")
    cfg.model.ablation = KINDS[kind]
    model = build_model(cfg.model)
    check_swin(model, cfg.model.backbone)
    print(f"mapping {len(state)} tensors onto our {kind} model ({cfg.model.ablation}, {cfg.model.backbone}) ...",
          flush=True)
    try:
        conv = convert_state_dict(state, model, args.kind)
    except ConversionError as err:
        problems = err.problems
        if len(problems) == 1:
            raise ValueError(f"{official}: {problems[0]}; nothing written") from None
        for line in problems[:MAX_PROBLEM_LINES]:
            print(f"problem: {line}", file=sys.stderr)
        if len(problems) > MAX_PROBLEM_LINES:
            print(f"problem: ... and {len(problems) - MAX_PROBLEM_LINES} more", file=sys.stderr)
        raise ValueError(f"{official}: {len(problems)} tensors do not map onto our {kind} model (listed above); "
                         "nothing written") from None

    load_weights(model, conv.state, str(official))  # strict for everything but the CLIP
    if conv.clip is not None:
        if args.clip_checkpoint is not None:
            differ, total = compare_clip(conv.clip, model)
            if differ:
                print(f"note: the CLIP in {official.name} differs from --clip-checkpoint {args.clip_checkpoint} in "
                      f"{differ} of {total} tensors; the converted model uses --clip-checkpoint", flush=True)
            else:
                print(f"CLIP: the file's CLIP equals --clip-checkpoint {args.clip_checkpoint}", flush=True)
        else:
            model.clip.model.load_state_dict(conv.clip, strict=True)

    sha = file_sha256(official)
    split = official_split(meta)
    out_meta = {
        "kind": kind,
        "converted_from": "official",
        "source_file": official.name,
        "source_sha256": sha,
        "source_split": split,
        "source_meta": source_meta(meta),
        "dropped": len(conv.dropped),
        "clip": "--clip-checkpoint" if args.clip_checkpoint is not None else "official text_backbone",
        # the texts the published weights were trained and tested with (the reference's regular_descriptions)
        "keypoint_texts": "reference:regular",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.clip_checkpoint is None:
        clip_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(OrderedDict(conv.clip), clip_out)  # open_clip layout: create_model(pretrained=this)
        cfg.model.clip_checkpoint = str(clip_out.resolve())
        print(f"CLIP: the file's own ({len(conv.clip)} tensors) → {clip_out}", flush=True)
    save_checkpoint(out, model, cfg, out_meta)  # temp file + rename
    n = len(conv.state) + (len(conv.clip) if conv.clip else 0)
    print(f"converted {official.name} ({kind}, {cfg.model.backbone}, sha256 {sha[:12]}): {n} tensors mapped, "
          f"{len(conv.dropped)} left out (recomputed Swin buffers, unused classifier/FFN) → {out}", flush=True)
    split_arg = f"--split {split}" if split else "--split K"
    print("texts: the published weights read the reference's regular keypoint texts: make them with python -m "
          "pipelines.descriptions --reference CAPENEXT_CHECKOUT --out DESCRIPTIONS, and embed and evaluate with "
          "--descriptions DESCRIPTIONS", flush=True)
    print(f"evaluate: python -m jobs.evaluate --checkpoint {out} {split_arg} --shards SHARDS --embeddings EMB "
          "--descriptions DESCRIPTIONS", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
