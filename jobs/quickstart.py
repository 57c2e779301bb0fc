"""The main job on the embedded default: ``python -m jobs.quickstart``.

Runs the flow of DESIGN.md on the bundled synthetic mini MP-100, on CPU, in a few minutes. Stages so far:

1. generate the synthetic set (skipped when ``--data-root`` names an existing MP-100 copy, or when the
   work directory already holds the same set: a second run reuses what the first made);
2. read split ``--split`` back through the data layer and print per subset the categories, images,
   annotations and keypoints, with what cleaning dropped.

Later stages (shards, embeddings, training, PCK, MLflow, report) are added as their pieces land.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capenext.cli import run_main
from capenext.data import SUBSETS, load_split


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.quickstart",
        description="Run the capenext flow on the bundled synthetic mini MP-100 (CPU, a few minutes).",
    )
    p.add_argument("--workdir", type=Path, default=Path("quickstart_out"),
                   help="where generated data and results go (default: ./quickstart_out)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="use this MP-100-layout copy instead of generating the synthetic set")
    p.add_argument("--split", type=int, default=1, help="MP-100 split to use, 1-5 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set (default 0)")
    return p.parse_args(argv)


def synthetic_data(workdir: Path, seed: int) -> Path:
    """The synthetic set under ``workdir/data``, generated once per seed and reused after."""
    from pipelines.synthetic import generate

    root = workdir / "data"
    stamp = root / ".quickstart.json"
    want = {"seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"[1/2] synthetic MP-100: reusing {root}")
        return root
    print(f"[1/2] synthetic MP-100: generating into {root} (seed {seed})")
    generate(root, seed=seed)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(want))
    tmp.replace(stamp)
    return root


def summarize(root: Path, split: int) -> list[dict]:
    print(f"[2/2] reading split {split} back from {root}")
    rows = []
    for subset in SUBSETS:
        data = load_split(root, split, subset)
        row = {"subset": subset, **data.summary(), "dropped": sum(data.dropped.values())}
        rows.append(row)
    header = f"{'subset':<8}{'categories':>12}{'images':>9}{'annotations':>13}{'keypoints':>11}{'dropped':>9}"
    print(header)
    for r in rows:
        print(f"{r['subset']:<8}{r['categories']:>12}{r['images']:>9}{r['annotations']:>13}"
              f"{r['keypoints']:>11}{r['dropped']:>9}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.data_root if args.data_root is not None else synthetic_data(args.workdir, args.seed)
    summarize(root, args.split)
    print("done. Next: the training stages join this quickstart as they land (see README).")
    return 0


if __name__ == "__main__":
    run_main(main)
