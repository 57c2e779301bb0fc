"""Test protocol and noisy-prompt robustness: ``python -m jobs.evaluate --checkpoint X --shards DIR``.

Evaluates a trained checkpoint on a split's unseen test categories with the training run's own test
protocol (per category ``data.test_episodes`` episodes × ``data.queries`` queries, episode seed
``optim.seed + 2``, the same crops, batches and PCK code as ``jobs.train``), so ``--noise none``
reproduces the training run's logged ``test/pck_*`` exactly. With noise (paper Tables 4 and 5; the noise
is defined once in :mod:`capenext.noise` and seeded by ``--seed``):

* ``class``: each query's class prompt becomes ``wrong_class(true name, every category name, seed)``;
* ``typo``: each keypoint text gets typos at ``--noise-rate`` (default 0.1);
* ``template``: keypoint texts are rewritten by each word map of ``--template-map`` (default: the paper's
  five Table 5 maps), one result row per map;
* ``reference:VARIANT``: the reference's own texts of that variant (``typo``, ``synonyms``, ``translate``,
  ``no_position``, ``manual*``; from the ``--descriptions`` file of ``python -m pipelines.descriptions``).

Keypoint texts: the training config's (``data.descriptions``, ``data.text_variant``), or
``--descriptions FILE [--text-variant V]``. A checkpoint converted from the published weights
(``jobs.convert``) reads the reference's regular texts: evaluating it without them (no descriptions, a
name → texts map, another variant) is refused in one line, since its numbers would mean nothing.

Episodes: ours by default (seeded); ``--episodes reference`` draws the reference's own (support, query)
annotations from the split's test annotation file under ``--data-root`` (mmpose's
``make_paired_samples``, :func:`capenext.data.episodes.reference_episodes`).

Embeddings: with ``--embeddings`` the precomputed tables of ``pipelines.embed`` are used (clean, and the
noisy variants they hold: ``typo@R`` for the rates and seed they were made with, ``template:NAME`` for
the same map); a variant the tables do not hold, and everything without ``--embeddings``, is encoded here
with the model's own frozen CLIP, the same texts through the same encoder, so the results agree either
way. Image embeddings of a ``precomputed`` model are then taken from the un-augmented test crop, as the
embedding job takes them.

Each result row is one MLflow run in the training run's experiment, tagged ``capenext.kind=evaluation``,
``training_run_id`` (and ``training_run_name``), ``noise``, ``noise_variant``, ``split``, ``ablation``,
``backbone`` (never ``capenext.run_name``, which names training runs), with metrics
``test/pck_0.05`` … ``test/pck_0.25``, ``test/pck_mean`` and a picture of each test category's best and
worst queries (``pictures/``). ``jobs.report`` turns these runs into Tables 4 and 5.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capenext.cli import UsageError, run_main
from capenext.config import RunCfg
from capenext.data.mp100 import TEXT_VARIANTS
from capenext.metrics import THRESHOLDS, episode_seed, metric_keys
from capenext.noise import DEFAULT_TYPO_RATE, Variant, get_noise, noise_kinds, wrong_class
from jobs.common import CHECKPOINT_HELP, collate, resolve_checkpoint
from jobs.runs import check_texts, needs_image_table
from jobs.tracking import ensure_experiment, find_run, open_client, tracking_uri

PICTURE_THRESHOLD = 0.2  # the threshold that ranks the best and worst queries in the pictures


# --- command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Evaluate a trained CapeNext checkpoint on a split's unseen test categories with the "
                    "training run's test protocol (PCK@0.05-0.25 and their mean), optionally with noisy "
                    "prompts (paper Tables 4 and 5), and log each result row as an MLflow run linked to the "
                    "training run.",
        epilog="examples:\n"
               "  python -m jobs.evaluate --checkpoint runs:/<run_id>/checkpoints/final.pt --shards shards "
               "--embeddings emb\n"
               "  python -m jobs.evaluate --checkpoint <run_id> --shards shards --embeddings emb --noise typo "
               "--noise-rate 0.2\n"
               "  python -m jobs.evaluate --checkpoint final.pt --split 1 --shards shards --noise template\n"
               "  python -m jobs.evaluate --checkpoint capenext_split1.pt --split 1 --shards shards --embeddings emb "
               "--descriptions descriptions.json --episodes reference --data-root MP100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--split", type=int, default=None,
                   help="MP-100 split 1-5 (default: the training run's split tag)")
    p.add_argument("--shards", type=Path, required=True, help="shard folder (pipelines.shard)")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="embedding folder (pipelines.embed) with the clean and noisy keypoint tables; without "
                        "it every embedding is encoded here with the model's CLIP")
    p.add_argument("--descriptions", default=None,
                   help="keypoint texts from this descriptions file (python -m pipelines.descriptions) instead of the "
                        "training config's")
    p.add_argument("--text-variant", default=None, choices=TEXT_VARIANTS, metavar="VARIANT",
                   help="which of the reference's texts the descriptions file gives: "
                        f"{', '.join(TEXT_VARIANTS)} (default: the config's, regular)")
    g = p.add_argument_group("noise (paper Tables 4 and 5)")
    g.add_argument("--noise", default="none", metavar="KIND",
                   help="; ".join(f"{k + (':VARIANT' if 'variant' in get_noise(k).options else '')}: "
                                  f"{get_noise(k).help}" for k in noise_kinds()) + " (default none)")
    g.add_argument("--noise-rate", type=float, default=None,
                   help=f"typo rate per letter, in [0, 1] (--noise typo; default {DEFAULT_TYPO_RATE})")
    g.add_argument("--template-map", default=None,
                   help="JSON word map {\"word\": \"replacement\"} or {\"name\": {...}, ...} (--noise template; "
                        "default: each of the paper's Table 5 maps, one result row each)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0, as pipelines.embed)")
    g = p.add_argument_group("protocol")
    g.add_argument("--episodes", type=_episodes_arg, default=None, metavar="N|reference|ours",
                   help="episodes per test category (default: the training config's, 200), or 'reference': the "
                        "reference's own episodes (its sampler on the split's test annotation file; needs "
                        "--data-root), 'ours' (the seeded sampler, default)")
    g.add_argument("--data-root", type=Path, default=None,
                   help="the MP-100 copy the shards were made from (--episodes reference reads its test annotation file)")
    g.add_argument("--queries", type=int, default=None, help="queries per episode (default: the config's, 15)")
    g.add_argument("--episode-seed", type=int, default=None,
                   help="seed of the episodes (default: the training run's, optim.seed + 2)")
    g.add_argument("--batch-size", type=int, default=None, help="queries per forward (default: the config's)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--clip-checkpoint", default=None,
                   help="where the frozen CLIP's weights are on this machine (default: the config's path)")
    g.add_argument("--clip-precision", choices=("fp32", "fp16"), default=None,
                   help="CLIP's precision (default: the config's, fp32); fp16 as the reference on a GPU, CUDA only")
    g.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--pictures", type=int, default=2,
                   help="best and worst queries per category drawn for each row (default 2; 0: none)")
    g.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="folder for the pictures (default ./evaluation)")
    g.add_argument("--experiment", default="capenext",
                   help="MLflow experiment when the training run is not in the tracking store (default capenext)")
    g.add_argument("--no-mlflow", action="store_true", help="print the results only, log nothing")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _episodes_arg(text: str) -> int | str:
    if text in ("ours", "reference"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of episodes, 'reference' or 'ours', got {text!r}") from None


# --- noise variants ---------------------------------------------------------------------------------


def parse_noise(text: str) -> tuple[str, str | None]:
    """``--noise KIND`` or ``--noise KIND:ARG`` (``reference:typo``) → ``(kind, arg)``; one line when unknown."""
    kind, sep, arg = text.partition(":")
    if kind not in noise_kinds():
        raise UsageError(f"--noise {text}: unknown kind {kind!r}; available: {noise_kinds()}")
    takes = "variant" in get_noise(kind).options
    if sep and not takes:
        raise UsageError(f"--noise {text}: {kind} takes no ':{arg}'")
    if takes and sep and arg not in TEXT_VARIANTS:
        raise UsageError(f"--noise {text}: unknown variant {arg!r}; valid: {list(TEXT_VARIANTS)}")
    if takes and not sep:
        raise UsageError(f"--noise {kind} needs a variant: --noise {kind}:VARIANT, one of {list(TEXT_VARIANTS)}")
    return kind, (arg if sep else None)


def variants(args: argparse.Namespace, descriptions: str | None = None) -> list[Variant]:
    """The result rows of ``--noise`` with its options; another kind's option is one line."""
    name, variant = parse_noise(args.noise)
    kind = get_noise(name)
    given = {"rate": args.noise_rate, "template_map": args.template_map}
    flags = {"rate": "--noise-rate", "template_map": "--template-map"}
    for option, value in given.items():
        if value is not None and option not in kind.options:
            users = [k for k in noise_kinds() if option in get_noise(k).options]
            raise UsageError(f"{flags[option]} applies to --noise {', '.join(users)}, not --noise {args.noise}")
    try:
        return kind.variants(rate=args.noise_rate, template_map=args.template_map, seed=args.seed, variant=variant,
                             descriptions=descriptions)
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_converted_texts(spec: str, meta: dict[str, Any], cfg: RunCfg) -> None:
    """A checkpoint converted from the published weights reads the reference's regular texts; refuse others."""
    from capenext.data.mp100 import load_descriptions

    want = meta.get("keypoint_texts") or ("reference:regular" if meta.get("converted_from") == "official" else None)
    if want is None:
        return
    variant = want.split(":", 1)[1]
    desc = load_descriptions(cfg.data.descriptions, cfg.data.text_variant) if cfg.data.descriptions else None
    if desc is None or desc.variant != variant:
        have = ("the annotations' names" if desc is None else
                "a name → texts map" if desc.variant is None else f"the reference's {desc.variant!r} texts")
        raise UsageError(f"{spec} is converted from the published weights, which read the reference's {variant} "
                         f"keypoint texts, not {have}: pass --descriptions FILE (python -m pipelines.descriptions "
                         f"--reference CHECKOUT --out FILE) with --text-variant {variant}; other texts: --noise")


class Embeddings:
    """Keypoint, class and image embeddings for a variant: from the tables when they hold it, else
    encoded with the model's CLIP (the same texts, the same encoder)."""

    def __init__(self, model, index, tables: Path | None, meta: dict[str, Any] | None, seed: int,
                 image_table: bool):
        from capenext.data.embeddings import load_bank

        self.model, self.index, self.tables, self.meta, self.seed = model, index, tables, meta or {}, seed
        self.base = load_bank(tables, "clean", images=image_table) if tables is not None else None
        self.class_ids = {c.name: c.id for c in index.categories.values()}

    def in_tables(self, v: Variant) -> bool:
        return self.tables is not None and get_noise(v.noise).in_tables(v, self.meta, self.seed)

    def texts(self, v: Variant, cat) -> list[str]:
        """The variant's keypoint texts of a category (whole-category kinds start from its annotation names)."""
        return v.texts_of(cat, self.index.annotation_categories.get(cat.id))

    def keypoints(self, v: Variant, categories) -> tuple[dict[int, torch.Tensor], str]:
        """category id → (K, C) keypoint embeddings of the variant; and where they came from."""
        from capenext.data.embeddings import load_bank

        if self.in_tables(v):
            table = self.base.keypoints if get_noise(v.noise).changes != "keypoints" else load_bank(
                self.tables, v.name, images=False).keypoints
            return {c.id: table[c.id] for c in categories}, "tables"
        texts = [(c.id, self.texts(v, c)) for c in categories]
        flat = [t for _, ts in texts for t in ts]
        emb = self.model.clip.encode_text(flat).cpu()  # (sum K, C)
        out, i = {}, 0
        for cid, ts in texts:
            out[cid] = emb[i: i + len(ts)]
            i += len(ts)
        return out, "in-process"

    def classes(self, names: dict[int, str]) -> dict[int, torch.Tensor]:
        """category id → (C,) embedding of ``a photo of {names[id]}`` (the table's row of the category of
        that name when there are tables)."""
        out = {}
        for cid, name in names.items():
            known = self.class_ids.get(name)
            if self.base is not None and known in self.base.classes:
                out[cid] = self.base.classes[known]
            else:
                out[cid] = self.model.clip.encode_class([name])[0].cpu()
        return out


# --- the protocol -----------------------------------------------------------------------------------


def reference_test_pairs(data_root: Path, split: int, index, subset, num_episodes: int, queries: int
                         ) -> np.ndarray:
    """The reference's test episodes of the split as (query, support) indices into ``subset.samples``."""
    from capenext.data.episodes import reference_pairs
    from capenext.data.mp100 import annotation_path
    from capenext.data.source import source_digest

    path = annotation_path(data_root, split, "test")
    if not path.is_file():
        raise FileNotFoundError(f"--episodes reference: {path} not found (--data-root)")
    recorded = index.manifest.get("source", {}).get("digest")
    if recorded is not None and source_digest(data_root) != recorded:
        raise ValueError(f"--data-root {data_root}: its annotation files are not the ones the shards in "
                         f"{index.root} were made from (the manifest's source digest differs)")
    data = json.loads(path.read_bytes())
    in_file = {c["id"] for c in data.get("categories", [])}
    if in_file != set(subset.categories):
        raise ValueError(f"{path}: categories {sorted(in_file)} are not the shards' split {split} test categories "
                         f"{sorted(subset.categories)}")
    ann_index = {s.ann_id: i for i, s in enumerate(subset.samples)}
    return reference_pairs(data, ann_index, num_episodes, queries, where=str(path))


def run_protocol(model, cfg: RunCfg, index, subset, bank, online_images: bool, device: torch.device,
                 episodes_n: int, queries: int, episode_seed: int, batch_size: int, loader_workers: int,
                 desc: str, progress: bool, pairs: np.ndarray | None = None) -> tuple[dict[str, float], list[dict]]:
    """``jobs.train``'s test evaluation: returns (metrics, per-query records with ``visible`` (K,)).
    ``pairs`` ((P, 2) query, support indices) replaces our seeded episodes (the reference's)."""
    from tqdm import tqdm

    from capenext.data import PairDataset, episodes
    from capenext.engine import evaluate

    if pairs is None:
        pairs = episodes(subset.by_category(), episodes_n, queries, episode_seed)
    ds = PairDataset(subset, pairs, cfg.data, load_image=index.read_bytes)  # decoded by make_item, as in training
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=loader_workers)
    visible: list[torch.Tensor] = []
    image_table = model.needs_image_embedding and not online_images and model.image_embedding == "precomputed"

    def prepare(batch: dict) -> dict:
        batch = bank.fill(batch, cfg.data.max_keypoints, image_table, model.needs_class_embedding)
        if online_images and model.needs_image_embedding and model.image_embedding == "precomputed":
            batch["img_emb"] = model.clip.encode_image(batch["img"].to(device)).cpu()  # (B, C), as pipelines.embed
        visible.append(batch["visible"])
        return batch

    records: list[dict] = []
    batches = tqdm(loader, desc=desc, unit="batch", disable=not progress, file=sys.stderr, leave=False)
    metrics = evaluate(model, batches, device, prepare, cfg.data.image_size, thresholds=THRESHOLDS, keep=records)
    for r, vis in zip(records, torch.cat(visible) if visible else []):
        r["visible"] = vis
    return metrics, records


def picture(records: list[dict], subset, index, cfg: RunCfg, n: int, title: str, path: Path) -> Path:
    """The best and worst ``n`` queries of each category, predictions against ground truth."""
    from capenext.data.transforms import box_center_scale
    from capenext.viz import Panel, best_and_worst, prediction_grid, save_figure

    by_ann = {s.ann_id: s for s in subset.samples}
    t = THRESHOLDS.index(PICTURE_THRESHOLD)
    rows = []
    for cid, (best, worst) in best_and_worst(records, n, t).items():
        cat = subset.categories[cid]
        panels: list[Panel | None] = []
        for chosen in (best, worst):
            for i in list(chosen) + [None] * (n - len(chosen)):
                if i is None:
                    panels.append(None)
                    continue
                r = records[i]
                s = by_ann[r["ann_id"]]
                k = cat.num_keypoints
                center, side = box_center_scale(s.bbox, cfg.data.bbox_scale)
                panels.append(Panel(
                    image=index.load_image(s), pred=r["pred"][:k].numpy(), gt=s.keypoints[:k, :2],
                    visible=r["visible"][:k].numpy(), skeleton=cat.skeleton,
                    box=(center[0] - side / 2, center[1] - side / 2, side, side),
                    title=f"#{r['ann_id']}  PCK@{PICTURE_THRESHOLD:g} {r['pck'][t]:.2f}"))
        rows.append((cat.name, panels))
    columns = [f"best {i + 1}" for i in range(n)] + [f"worst {i + 1}" for i in range(n)]
    fig = prediction_grid(rows, columns, title=title)
    return save_figure(fig, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --- MLflow ------------------------------------------------------------------------------------------


def log_row(client, experiment_id: str, tags: dict[str, str], params: dict[str, Any], metrics: dict[str, float],
            pictures: list[Path]) -> str:
    """One evaluation run: tags, params, ``test/*`` metrics, pictures; returns its id."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=tags.get("mlflow.runName"), tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        for path in pictures:
            client.log_artifact(run_id, str(path), "pictures")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# --- driver ------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    heads = [f"PCK@{t:g}" for t in THRESHOLDS] + ["mPCK"]
    keys = metric_keys("test")
    width = max([len("noise variant")] + [len(r["noise_variant"]) for r in rows]) + 2
    lines = [f"{'noise variant':<{width}}" + "".join(f"{h:>9}" for h in heads) + "  embeddings"]
    for r in rows:
        lines.append(f"{r['noise_variant']:<{width}}" + "".join(f"{r[k]:>9.4f}" for k in keys)
                     + f"  {r['embeddings']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from capenext.checkpoint import load_model
    from capenext.data.mp100 import check_split
    from capenext.data.shards import ShardIndex
    from capenext.data.embeddings import EmbeddingBank, check_tables

    args = parse_args(argv)
    noise_kind, _ = parse_noise(args.noise)
    # usage errors before anything slow (the reference's texts may come from the checkpoint's config)
    rows_spec = None if noise_kind == "reference" and args.descriptions is None else variants(args, args.descriptions)
    sampler = args.episodes if isinstance(args.episodes, str) else None
    count = args.episodes if isinstance(args.episodes, int) else None
    for name, value in (("episodes", count), ("queries", args.queries), ("batch_size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.data_root is not None and not args.data_root.is_dir():
        raise UsageError(f"--data-root {args.data_root}: no such folder")
    if args.clip_precision == "fp16" and args.device != "cuda":
        raise UsageError("--clip-precision fp16 runs on a CUDA device only (the reference's GPU setting): add "
                         "--device cuda, or use fp32")
    if args.pictures < 0:
        raise UsageError(f"--pictures must be 0 or more, got {args.pictures}")
    uri = tracking_uri()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")

    with tempfile.TemporaryDirectory(prefix="capenext-eval-") as tmp:
        source = resolve_checkpoint(args.checkpoint, uri, Path(tmp))
        try:
            model, cfg, meta = load_model(source.path, args.clip_checkpoint, device)  # weights_only=True
        except KeyError as err:  # unregistered ablation / backbone / CLIP in the config
            raise ValueError(f"{source.spec}: checkpoint of an unknown config ({err.args[0] if err.args else err})"
                             ) from None
    client = open_client(uri, create=False)  # read only: None when there is no store yet
    if args.descriptions is not None:
        cfg.data.descriptions = args.descriptions
    if args.text_variant is not None:
        cfg.data.text_variant = args.text_variant
    if args.clip_precision is not None:
        cfg.model.clip_precision = args.clip_precision
    check_texts(cfg)
    check_converted_texts(source.spec, meta, cfg)
    sampler = sampler or cfg.data.episodes
    if sampler == "reference" and args.data_root is None:
        raise UsageError("--episodes reference draws from the split's test annotation file: pass --data-root ROOT "
                         "(the MP-100 copy the shards were made from)")
    if rows_spec is None:
        rows_spec = variants(args, cfg.data.descriptions)
    if cfg.model.clip_precision != model.clip.precision:
        from capenext.models.clip import FrozenCLIP

        if cfg.model.clip_precision == "fp16" and device.type != "cuda":
            raise UsageError("model.clip_precision=fp16 runs on a CUDA device only: add --device cuda, or pass "
                             "--clip-precision fp32")
        model.clip = FrozenCLIP.from_cfg(cfg.model).to(device)
    training_id = source.run_id or meta.get("run_id")
    train_run = find_run(client, training_id)
    train_tags = train_run.data.tags if train_run is not None else {}
    split = args.split if args.split is not None else (int(train_tags["split"]) if "split" in train_tags else None)
    if split is None:
        raise UsageError(f"pass --split K: the checkpoint's training run ({training_id or 'unknown'}) is not in "
                         f"{uri}, so its split is unknown")
    check_split(split)
    if "split" in train_tags and int(train_tags["split"]) != split:
        print(f"note: the model was trained on split {train_tags['split']}; split {split}'s test categories "
              "may be among its training categories", file=sys.stderr)

    index = ShardIndex(args.shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    subset = index.subset(split, "test")
    if not subset.samples:
        raise UsageError(f"split {split} has no test samples in {args.shards}")
    pairs = None
    if sampler == "reference":
        pairs = reference_test_pairs(args.data_root, split, index, subset, count or cfg.data.test_episodes,
                                     args.queries or cfg.data.queries)
    meta_tables = None
    image_table = needs_image_table(cfg)
    if args.embeddings is not None:
        meta_tables = check_tables(args.embeddings, cfg, index.digest, images=image_table,
                                   remake=f"python -m pipelines.embed --shards {args.shards} --out "
                                          f"{args.embeddings} and the training run's --config/--set")
    emb = Embeddings(model, index, args.embeddings, meta_tables, args.seed, image_table)

    episodes_n = count or cfg.data.test_episodes
    queries = args.queries or cfg.data.queries
    ep_seed = episode_seed(cfg.optim.seed, "test") if args.episode_seed is None else args.episode_seed
    if pairs is not None and args.episode_seed is not None:
        raise UsageError("--episode-seed seeds our episodes; the reference's are drawn with its own seed")
    batch_size = args.batch_size or cfg.optim.batch_size
    label = train_tags.get("capenext.run_name") or source.path.stem
    categories = sorted(subset.categories.values(), key=lambda c: c.id)
    all_names = [c.name for c in index.categories.values()]
    print(f"evaluating {source.spec} ({cfg.model.ablation}, {cfg.model.backbone}) on split {split}: "
          f"{len(categories)} test categories x {episodes_n} episodes x {queries} queries, "
          + (f"episode seed {ep_seed}" if pairs is None else "the reference's episodes")
          + f", noise {args.noise} (seed {args.seed})", file=sys.stderr, flush=True)

    experiment_id = None
    if not args.no_mlflow:  # the store is made only now, so a job that fails on its input leaves none behind
        client = client if client is not None else open_client(uri)
        experiment_id = train_run.info.experiment_id if train_run is not None else ensure_experiment(
            client, args.experiment, uri)
        if train_run is None:
            print(f"note: training run {training_id or '(unknown)'} is not in {uri}; logging to experiment "
                  f"{args.experiment!r}", file=sys.stderr)

    results = []
    for v in rows_spec:
        t0 = time.time()
        kp, source_kind = emb.keypoints(v, categories)
        names = {c.id: c.name for c in categories}
        if v.wrong_class:
            names = {c.id: wrong_class(c.name, all_names, args.seed) for c in categories}
            changed = [names[c.id] != c.name for c in categories]
        else:
            changed = [new != old for c in categories for new, old in zip(emb.texts(v, c), c.keypoints)]
        bank = EmbeddingBank(keypoints=kp, classes=emb.classes(names),
                             images=emb.base.images if emb.base is not None else {})
        online = image_table and emb.base is None
        metrics, records = run_protocol(model, cfg, index, subset, bank, online, device, episodes_n, queries,
                                        ep_seed, batch_size, args.loader_workers, v.name, not args.quiet, pairs)
        row = {"noise": v.noise, "noise_variant": v.name, "embeddings": source_kind if not online else
               f"{source_kind} (images in-process)",
               **{f"test/{k}": val for k, val in metrics.items() if k != "count"},
               "test/queries": metrics["count"], "noise/changed_fraction": float(np.mean(changed))}
        pics = []
        if args.pictures > 0 and records:
            title = (f"{label} · split {split} · {v.name} · test PCK@0.2 {metrics['pck_0.2']:.3f} · best and "
                     f"worst queries by PCK@{PICTURE_THRESHOLD:g}")
            pics.append(picture(records, subset, index, cfg, args.pictures, title,
                                args.out / _safe(label) / f"{_safe(v.name)}.png"))
            row["picture"] = str(pics[0])
        if experiment_id is not None:
            tags = {"capenext.kind": "evaluation", "training_run_id": training_id or "", "noise": v.noise,
                    "noise_variant": v.name, "split": str(split), "ablation": cfg.model.ablation,
                    "backbone": cfg.model.backbone, "mlflow.runName": f"{label}-eval-{v.name}",
                    "training_run_name": label}
            params = {"checkpoint": source.spec, "noise": v.noise, "noise_variant": v.name,
                      "noise_seed": args.seed, "noise_rate": v.rate if v.rate is not None else "",
                      "template_map": json.dumps(v.word_map) if v.word_map else "", "episodes": episodes_n,
                      "queries": queries, "episode_seed": ep_seed if pairs is None else "",
                      "episodes_sampler": sampler, "batch_size": batch_size,
                      "keypoint_texts": cfg.data.descriptions or "annotations", "text_variant": cfg.data.text_variant,
                      "clip_precision": cfg.model.clip_precision, "embeddings": row["embeddings"], "split": split}
            mkeys = [k for k in row if k.startswith(("test/", "noise/"))]
            row["run_id"] = log_row(client, experiment_id, tags, params, {k: row[k] for k in mkeys}, pics)
        results.append(row)
        print(f"{v.name}: PCK@0.2 {row['test/pck_0.2']:.4f}, mPCK {row['test/pck_mean']:.4f} "
              f"({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)

    print(table(results))
    print(json.dumps({"checkpoint": source.spec, "training_run_id": training_id, "split": split, "rows": results}))
    return 0


if __name__ == "__main__":
    run_main(main)
