"""A deployable model: ``python -m jobs.export --checkpoint X --out DIR [--opset N]``.

Writes the pose network and the frozen CLIP's image and text towers as ONNX files, with a ``model.json``
(the checkpoint's config and sha256, the preprocessing, the opset, the file names), into ``DIR``, after
onnxruntime (CPU) has given the outputs PyTorch gives on the same inputs (max |Δ| at most 1e-4 of each
output's max |value|). Prints one JSON line: the folder, the files and the max |Δ| per output. The logic is
:func:`capenext.export.export`; ``Predictor(checkpoint, runtime="onnx", onnx_dir=DIR)`` runs the folder.

A model the exporter cannot trace, an opset that cannot express an operator, or a difference over the
tolerance is one ``error:`` line and exit code 2; nothing is written to ``DIR`` then (the files go to a
temporary folder beside it, renamed at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from capenext.cli import UsageError, run_main
from jobs.runtime.checkpoints import CHECKPOINT_HELP
from capenext.options import add_config_option, add_tracking_uri

DEFAULT_OPSET = 17  # capenext.export.DEFAULT_OPSET, spelled here so --help needs no torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.export",
        description="Export a trained CapeNext checkpoint as ONNX (pose network, CLIP image tower, CLIP text "
                    "tower, model.json), verified against PyTorch with onnxruntime before anything is written.",
        epilog="examples:\n"
               "  python -m jobs.export --checkpoint final.pt --out capenext_onnx/\n"
               "  python -m jobs.predict --checkpoint final.pt --runtime onnx --onnx capenext_onnx/ --image cat.jpg "
               "--keypoints \"nose,left eye\" --class cat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write (new, empty, or an earlier export, which is replaced)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    add_config_option(p, "clip_checkpoint",
                      help="where the frozen CLIP's weights are on this machine (default: the training config's)")
    add_tracking_uri(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        from capenext.export import export
    except ImportError as err:
        raise UsageError(f"jobs.export needs onnx and onnxruntime ({err.name} is missing): "
                         "pip install 'capenext[onnx]'") from None
    with tempfile.TemporaryDirectory(prefix="capenext-export-") as tmp:
        ckpt = args.checkpoint
        if not Path(ckpt).is_file():
            from jobs.runtime.checkpoints import resolve_checkpoint
            from jobs.runtime.tracking import tracking_uri

            ckpt = resolve_checkpoint(ckpt, tracking_uri(args.tracking_uri), Path(tmp)).path
        record = export(ckpt, args.out, opset=args.opset, clip_checkpoint=args.clip_checkpoint,
                        log=lambda message: print(message, file=sys.stderr, flush=True))
    print(json.dumps({"out": str(args.out), "files": record["files"], "opset": record["opset"],
                      "checkpoint_sha256": record["checkpoint_sha256"], "max_abs_delta": record["max_abs_delta"],
                      "max_abs_value": record["max_abs_value"]}),
          flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
