"""A checkpoint as an MLflow model: ``python -m jobs.register RUN_OR_CHECKPOINT --name NAME [--alias champion]``.

MLflow 3's model objects, with the capenext checkpoint file itself as the model's artifact:

1. a **LoggedModel** in the training run's experiment (``source_run_id`` = the run, when the checkpoint
   came from one), its params the checkpoint's whole config and its tags the format, ablation, backbone,
   CLIP model and the file's sha256; its artifacts are ``checkpoint.pt`` (the file, byte for byte) and
   ``capenext.json`` (what it is and how to read it);
2. a **registered model version** of ``NAME`` pointing at that LoggedModel (``models:/<model_id>``);
3. optionally an **alias** (``champion``) on that version, moved from whichever version held it.

There is no pyfunc flavour and no pickled Python in the store: a reader fetches ``checkpoint.pt`` and loads
it with ``weights_only=True`` (:func:`capenext.checkpoint.read_checkpoint`). Every job that takes
``--checkpoint`` (predict, evaluate, serve) accepts ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``
through :func:`jobs.runtime.checkpoints.resolve_checkpoint`.

``RUN_OR_CHECKPOINT`` is a checkpoint file, ``runs:/<run_id>/<path>`` or a training run id (its
``checkpoints/final.pt``). The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
``./mlflow.db``. It prints one JSON line: ``{"name", "version", "alias", "uri", "tracking_uri"}``.
"""

from __future__ import annotations

import argparse
import json

from capenext.cli import run_main
from capenext.options import add_tracking_uri
from jobs.runtime.registry import register
from jobs.runtime.tracking import tracking_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.register",
        description="Register a capenext checkpoint as an MLflow model: a LoggedModel holding the checkpoint "
                    "file, a new version of a registered model and optionally an alias, so that "
                    "--checkpoint models:/NAME@ALIAS works in predict, evaluate and serve.",
        epilog="examples:\n"
               "  python -m jobs.register 0123456789abcdef0123456789abcdef --name capenext --alias champion\n"
               "  python -m jobs.register runs:/<run_id>/checkpoints/final.pt --name capenext\n"
               "  python -m jobs.register final.pt --name capenext-tiny --alias champion",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="checkpoint file, runs:/<run_id>/checkpoints/final.pt, or a training run id")
    p.add_argument("--name", required=True, help="registered model name (created when new)")
    p.add_argument("--alias", default=None, help="alias to point at the new version, e.g. champion")
    add_tracking_uri(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uri = tracking_uri(args.tracking_uri)
    version = register(args.source, args.name, args.alias, uri)
    record = {"name": args.name, "version": version, "alias": args.alias,
              "uri": f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{version}",
              "tracking_uri": uri}
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
