"""One training run: ``python -m jobs.train --split K --ablation NAME --shards DIR --embeddings DIR``.

Ray Train V2: a ``TorchTrainer`` runs :func:`train_loop` on ``--num-workers`` DDP workers (gloo on CPU,
NCCL on GPU); ``--local`` runs the *same* function in this process (Ray Train's local mode,
``ScalingConfig(num_workers=0)``), where breakpoints work. The run:

* reads the shards and the precomputed CLIP embeddings (an ablation without an image stream reads no
  image table; ``--image-embedding online`` computes it from the augmented crop inside the forward);
* draws class-balanced pairs every epoch from ``(seed, epoch)``; each worker takes an equal, strided
  share (the remainder is dropped, so every worker runs the same number of steps and nothing hangs) and
  the global batch stays ``--batch-size`` whatever the number of workers;
* follows the reference's schedule: Adam, lr 1e-5, no weight decay, no clipping, linear warm-up over
  1000 iterations from 0.001×, lr ÷10 at 80 % and 90 % of the epochs; the model in fp32 (``--precision bf16``:
  autocast on CUDA, an opt-in for speed); seeded;
* every ``--val-every`` epochs measures PCK@0.2 on the split's val categories (100 × 15 episodes), and
  at the end PCK@0.05-0.25 and their mean on the test categories (``--episodes`` × ``--queries``, 200 × 15)
  with the one test protocol of :mod:`capenext.protocol`;
* reports a checkpoint every epoch (``CheckpointConfig`` keeps the ``--keep-checkpoints`` best by val
  PCK@0.2, and Ray keeps the latest too); re-running with the same ``--run-name`` and
  ``--storage-path`` resumes from the latest (``ray.train.get_checkpoint()``), in the same MLflow run;
  ``FailureConfig(max_failures)`` restarts the run after a worker dies;
* logs to MLflow from rank 0 only: the whole config as params, tags split/ablation/backbone, per-epoch
  metrics (``train/loss`` and each term, ``val/pck_0.2``, ``test/pck_0.05`` ... ``test/pck_mean``, the
  mean-position floor's ``floor/pck_*``), the final and best checkpoints as artifacts. The driver creates
  the run; its id travels in the checkpoint.

This module parses the command line into a :class:`~jobs.training.spec.TrainRun` and calls the driver
(:mod:`jobs.training.driver`: pre-flight, MLflow run, ``TorchTrainer``, ``fit``); the loop is
:mod:`jobs.training.loop`, the run's folder format :mod:`capenext.checkpoint`.

Every bad input (unknown split, ablation or backbone, missing shards or embeddings, embeddings from
another CLIP, a checkpoint of another config, a cluster too small) is one line before any worker starts.
"""

from __future__ import annotations

import argparse
import json

from capenext.checkpoint import artifacts_dir
from capenext.cli import UsageError, run_main
from jobs.training import driver
from jobs.training.spec import add_arguments, default_run_name, from_args, resolve_config
from jobs.runtime.registry import register
from jobs.runtime.tracking import tracking_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train CapeNext on one MP-100 split and ablation with Ray Train (DDP), evaluate PCK on "
                    "the split's unseen test categories and record everything in MLflow.",
    )
    p.add_argument("--split", type=int, required=True, help="MP-100 split, 1-5")
    add_arguments(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, float | str]:
    """The run the parsed command line describes, trained and tested: ``{"run_name", test and floor metrics}``."""
    cfg = resolve_config(args)
    spec = from_args(args, cfg, args.split, args.run_name or default_run_name(args.split, cfg), args.parent_run_id)
    return {"run_name": spec.run_name, **driver.run(spec)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.register_alias and not args.register:
        raise UsageError("--register-alias needs --register NAME")
    result = run(args)
    print(json.dumps(result))
    if args.register:
        final = artifacts_dir(args.storage_path.resolve(), result["run_name"]) / "final.pt"
        uri = tracking_uri(args.tracking_uri)
        version = register(str(final), args.register, args.register_alias, uri)
        alias = f"@{args.register_alias}" if args.register_alias else f"/{version}"
        print(json.dumps({"name": args.register, "version": version, "alias": args.register_alias,
                          "uri": f"models:/{args.register}{alias}", "tracking_uri": uri}), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
