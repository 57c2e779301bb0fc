"""The main job on the embedded default: ``python -m jobs.quickstart``.

Runs the whole flow on the bundled synthetic mini MP-100, on CPU, in a few minutes:

1. generate the synthetic set (or use ``--data-root``) and summarise split ``--split``;
2. shard it into webdataset tars (Ray tasks);
3. precompute CLIP embeddings with the *tiny CLIP at random weights* (Ray Data): no pretrained weights
   can be downloaded here, so the text embeddings only tell names apart; they carry no language prior;
4. train ``full`` on the split with the tiny backbone, through Ray Train (one worker);
5. test PCK on the split's unseen categories, next to the per-name mean-position floor;
6. everything is in MLflow: it prints the ``mlflow ui`` command.

With ``--data-root`` (your MP-100 copy), ``--descriptions FILE`` gives the embeddings and the training
run the regular texts of a descriptions file (``python -m pipelines.descriptions``, or a CapeX-style map).

A second run reuses what the first made: the data, shards and embeddings are kept, and the training
run resumes from its last checkpoint (a finished run goes straight to the test).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from capenext.checkpoint import artifacts_dir
from capenext.cli import UsageError, run_main
from capenext.config import override, resolve
from capenext.recipe import apply_recipe
from capenext.data import SUBSETS, load_split
from capenext.metrics import FLOOR
from capenext.models.text_prior import TEXT_ENCODERS
from jobs.training import driver
from jobs.training.spec import TrainRun
from capenext.options import add_recipe, add_tracking_uri
from jobs.runtime.tracking import tracking_uri

STAGES = 6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.quickstart",
        description="Run the capenext flow on the bundled synthetic mini MP-100 (CPU, a few minutes): "
                    "data → shards → CLIP embeddings → Ray Train → PCK → MLflow.",
    )
    p.add_argument("--workdir", type=Path, default=Path("quickstart_out"),
                   help="where data, shards, embeddings, checkpoints and mlflow.db go (default ./quickstart_out)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="use this MP-100-layout copy instead of generating the synthetic set")
    p.add_argument("--descriptions", type=Path, default=None,
                   help="with --data-root: keypoint texts from this descriptions file (python -m pipelines.descriptions)")
    p.add_argument("--split", type=int, default=1, help="MP-100 split to use, 1-5 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set and the run (default 0)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPUs the quickstart takes: its Ray's, and the torch threads of its training worker "
                        "(default: all of this machine's). Give fewer on a machine that other work is using: "
                        "a worker's threads that outnumber the CPUs it really gets wait on each other at every "
                        "operation (measured on 2 cores beside one busy process of another login session: "
                        "4.5 s an epoch alone, about 290 s with 2 threads, 5.5 s with --cpus 1)")
    p.add_argument("--text-encoder", choices=TEXT_ENCODERS, default="clip",
                   help="keypoint texts and class prompts: clip (the tiny CLIP's text tower, random weights; default) "
                        "or a packaged language prior (wordllama, e5; docs/model.md). Why clip stays the default: "
                        "docs/results.md")
    add_recipe(p)
    add_tracking_uri(p, "MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db, the quickstart's own store")
    args = p.parse_args(argv)
    args.cpus = cpus(args.cpus)  # a bad --cpus: one line, before anything runs
    return args


def stage(i: int, text: str) -> None:
    print(f"\n[{i}/{STAGES}] {text}", flush=True)


def synthetic_data(workdir: Path, seed: int) -> Path:
    """The synthetic set under ``workdir/data``, generated once per seed and reused after."""
    from pipelines.synthetic import generate

    root = workdir / "data"
    stamp = root / ".quickstart.json"
    want = {"seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"synthetic MP-100: reusing {root}")
        return root
    print(f"synthetic MP-100: generating into {root} (seed {seed})")
    generate(root, seed=seed)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(want))
    tmp.replace(stamp)
    return root


def summarize(root: Path, split: int, descriptions: Path | None = None, variant: str = "regular") -> list[dict]:
    print(f"split {split} of {root}:")
    rows = []
    for subset in SUBSETS:
        data = load_split(root, split, subset, descriptions, text_variant=variant)
        rows.append({"subset": subset, **data.summary(), "dropped": sum(data.dropped.values())})
    print(f"  {'subset':<8}{'categories':>12}{'images':>9}{'annotations':>13}{'keypoints':>11}{'dropped':>9}")
    for r in rows:
        print(f"  {r['subset']:<8}{r['categories']:>12}{r['images']:>9}{r['annotations']:>13}"
              f"{r['keypoints']:>11}{r['dropped']:>9}")
    return rows


def results_table(metrics: dict[str, float]) -> str:
    thresholds = ("0.05", "0.1", "0.15", "0.2", "0.25", "mean")
    lines = ["  " + f"{'':<28}" + "".join(f"{('PCK@' + t) if t != 'mean' else 'mPCK':>10}" for t in thresholds)]
    for label, prefix in (("CapeNext full (tiny)", "test"), ("mean-position baseline", FLOOR)):
        lines.append("  " + f"{label:<28}" + "".join(f"{metrics[f'{prefix}/pck_{t}']:>10.3f}" for t in thresholds))
    return "\n".join(lines)


def cpus(asked: int | None) -> int:
    """The CPUs the quickstart takes: ``--cpus``, else all of this machine's."""
    have = max(1, os.cpu_count() or 1)
    if asked is not None and not 1 <= asked <= have:
        raise UsageError(f"--cpus {asked}: this machine has {have} CPU{'s' if have > 1 else ''}; pass 1 to {have}")
    return have if asked is None else asked


def training_run(args: argparse.Namespace, work: Path, cfg_texts: dict[str, str], uri: str) -> TrainRun:
    """The quickstart's training run: ``full`` with the tiny backbone and random tiny CLIP, one Ray Train
    worker holding the quickstart's CPUs, validation every 4 epochs on 20 episodes, the test on 40. With
    ``--recipe paper`` (an MP-100 copy and its descriptions) the reference's texts, image stream, schedule and
    test episodes, the rest tiny: the run's ``paper_departures`` tag lists what still differs."""
    tiny = {"model.ablation": "full", "model.backbone": "tiny", "model.clip_model": "tiny",
            "model.clip_checkpoint": "random", "optim.epochs": args.epochs, "optim.seed": args.seed,
            "data.val_episodes": 20, "data.test_episodes": 40, "model.text_encoder": args.text_encoder, **cfg_texts}
    cfg = apply_recipe(resolve("tiny", {}, []), args.recipe, "cpu")
    cfg = override(cfg, {k: str(v) for k, v in tiny.items()})
    prior = "" if args.text_encoder == "clip" else f"-{args.text_encoder}"  # CLIP's keep their folder and name
    return TrainRun(cfg=cfg, split=args.split, shards=work / "shards", embeddings=work / f"embeddings{prior}",
                    run_name=f"quickstart-split{args.split}-full-tiny{prior}", storage=work / "runs",
                    experiment="quickstart", tracking_uri=uri, val_every=4,
                    cpus_per_worker=float(args.cpus), recipe=args.recipe,
                    data_root=args.data_root.resolve() if args.data_root is not None else None)


def next_steps(run: TrainRun, root: Path, uri: str) -> str:
    """The commands that look at, evaluate and predict with the run just made."""
    test = load_split(root, run.split, "test")
    final = artifacts_dir(run.storage, run.run_name) / "final.pt"
    sample = test.samples[0]
    cat = test.categories[sample.category_id]
    return (f"runs are in {uri} (experiment 'quickstart'); look at them with:\n"
            f"  mlflow ui --backend-store-uri {uri}\n"
            f"the run's checkpoint: {final} (also logged to MLflow as checkpoints/final.pt)\n"
            f"evaluate it again (its own store, shards and tables):\n"
            f"  python -m jobs.evaluate --checkpoint {final} --split {run.split} --shards {run.shards} "
            f"--embeddings {run.embeddings} --episodes {run.cfg.data.test_episodes} --tracking-uri {uri}\n"
            f"predict on one image of an unseen category:\n"
            f"  python -m jobs.predict --checkpoint {final} --image {test.image_path(sample)} "
            f"--keypoints \"{','.join(cat.keypoints)}\" --class {cat.name} --out {run.storage.parent / 'prediction.png'}")


def main(argv: list[str] | None = None) -> int:
    import ray

    from pipelines import embed, shard

    args = parse_args(argv)
    if args.descriptions is not None and args.data_root is None:
        raise UsageError("--descriptions applies to --data-root (an MP-100 copy); the synthetic set's names are its own")
    if args.recipe == "paper" and (args.data_root is None or args.descriptions is None):
        raise UsageError("--recipe paper runs on your MP-100 copy with the reference's texts: pass --data-root ROOT "
                         "and --descriptions FILE (python -m pipelines.descriptions --reference CHECKOUT --out FILE)")
    variant = "regular"  # the texts training reads
    cfg_texts = {}
    if args.descriptions is not None:
        from capenext.data.mp100 import load_descriptions

        load_descriptions(args.descriptions, variant)  # a bad file or variant: one line, before anything runs
        cfg_texts = {"data.descriptions": str(args.descriptions.resolve()), "data.text_variant": variant}
    start = time.time()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}")

    stage(1, "data")
    root = args.data_root if args.data_root is not None else synthetic_data(work, args.seed)
    summarize(root, args.split, args.descriptions, variant)

    # Ray's token-auth notice, and Ray Data's periodic progress blocks, would bury the stage lines
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(num_cpus=args.cpus, log_to_driver=True, logging_level="WARNING")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    stage(2, "shards (Ray tasks → webdataset tars)")
    manifest = shard.run(root, work / "shards")
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards → {work / 'shards'}")

    texts = "" if args.text_encoder == "clip" else f"texts from the packaged prior {args.text_encoder}, "
    stage(3, f"CLIP embeddings (Ray Data actor pool; {texts}tiny CLIP with RANDOM weights, declared: no download)")
    run = training_run(args, work, cfg_texts, uri)
    meta = embed.run(work / "shards", run.embeddings, run.cfg)
    print(f"embeddings → {run.embeddings}: {meta['counts']}")

    stage(4, f"training 'full' on split {args.split} with the tiny backbone (Ray Train, 1 worker)")
    metrics = driver.run(run)

    stage(5, f"test PCK on the {len(load_split(root, args.split, 'test').categories)} unseen test categories")
    print(results_table(metrics))

    stage(6, "MLflow, and what to run next")
    print(next_steps(run, root, uri))
    print(f"\ndone in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
