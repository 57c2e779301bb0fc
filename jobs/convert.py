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

Keypoint texts: the published weights were trained and tested with the reference's regular texts (its
``regular_descriptions``); the output's meta says so (``keypoint_texts: reference:regular``), and
``jobs.evaluate`` refuses the checkpoint without them (``--descriptions`` from
``python -m pipelines.descriptions``).

Loading: ``weights_only=True`` first. If the file's ``meta`` holds numpy values, it is loaded again
with only numpy's scalar/dtype/array globals allowed (still weights_only; said on stdout). Anything
else outside torch's allowlist is refused with one line naming the objects: a checkpoint is never
unpickled in full (that would run code from the file).
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from capenext.checkpoint import not_a_checkpoint
from capenext.cli import UsageError, run_main
from capenext.files import file_sha256

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
    return p.parse_args(argv)


def _blocked_globals(path: Path) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint: cannot list them
        return []


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit]


def read_official(path: Path) -> tuple[Any, list[str]]:
    """The unpickled file and notes on how it was read; one-line errors for missing or unreadable files."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"--official {path}: no such file")
    notes: list[str] = []
    try:
        return torch.load(path, map_location="cpu", weights_only=True), notes
    except pickle.UnpicklingError as err:
        blocked = _blocked_globals(path)
        if not blocked:  # not a global outside the allowlist: the file itself is broken
            raise ValueError(f"--official {path}: {not_a_checkpoint(path)}; torch.load said UnpicklingError: "
                             f"{_one_line(err, 160)}") from None
    except Exception as err:  # truncated zips, foreign files: torch raises several types
        raise ValueError(f"--official {path}: {not_a_checkpoint(path)}; torch.load said {type(err).__name__}: "
                         f"{_one_line(err, 160)}") from None
    if all(name.startswith("numpy.") for name in blocked):
        allowed = list(blocked)
        for _ in range(8):  # numpy's dtype classes show up one unpickling attempt at a time
            try:
                with torch.serialization.safe_globals([_resolve(n) for n in allowed]):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
                notes.append(f"{path.name} holds numpy values: read with weights_only=True and only numpy's "
                             f"{', '.join(sorted(allowed))} allowed")
                return obj, notes
            except pickle.UnpicklingError as err:
                more = re.findall(r"(?:GLOBAL |<class ')(numpy\.[\w.]+)", str(err))
                if not more or set(more) <= set(allowed):
                    found = re.findall(r"(?:GLOBAL |<class ')([\w.]+)", str(err))
                    blocked = allowed + [m for m in found if m not in allowed]
                    break
                allowed += [m for m in more if m not in allowed]
            except Exception as err:
                raise ValueError(f"--official {path}: {not_a_checkpoint(path)}; torch.load said "
                                 f"{type(err).__name__}: {_one_line(err, 160)}") from None
    raise ValueError(f"--official {path}: cannot be read with weights_only=True, it holds {blocked[:5]}; "
                     "re-save its state_dict and meta as plain tensors and strings")


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
    from capenext.config import load_preset
    from capenext.convert import KINDS, ConversionError, convert_state_dict
    from capenext.models import build_model

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
    cfg = load_preset(args.backbone)
    cfg.model.ablation = KINDS[kind]
    # as the reference trained them: CLIP's image embedding inside the forward, from the ImageNet-normalised crop
    cfg.model.image_embedding = "online"
    cfg.model.clip_image_norm = "imagenet"
    cfg.model.backbone_checkpoint = None
    cfg.model.clip_checkpoint = args.clip_checkpoint or "random"  # the file's own CLIP is loaded below
    model = build_model(cfg.model)
    print(f"mapping {len(state)} tensors onto our {kind} model ({cfg.model.ablation}, {args.backbone}) ...",
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
    print(f"converted {official.name} ({kind}, {args.backbone}, sha256 {sha[:12]}): {n} tensors mapped, "
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
