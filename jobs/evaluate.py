"""Test protocol and noisy-prompt robustness: ``python -m jobs.evaluate --checkpoint X --shards DIR``.

Evaluates a trained checkpoint on a split's unseen test categories with the training run's own test
protocol, the one function :func:`capenext.protocol.run_protocol` (per category ``--episodes``
(``data.test_episodes``) episodes × ``--queries`` (``data.queries``) queries, episode seed
``optim.seed + 2``, the same crops and PCK code as ``jobs.train``), so ``--noise none`` reproduces the
training run's logged ``test/pck_*`` exactly. With noise (paper Tables 4 and 5; the noise
is defined once in :mod:`capenext.noise` and seeded by ``--noise-seed``):

* ``class``: each query's class prompt becomes another name of a list, drawn per (query, support) pair as
  the reference's Table 4 run (:func:`capenext.noise.query_class`; the list: ``--class-names CHECKOUT``, the
  reference's own, else the annotations' categories); ``class_per_category``: one wrong name per category;
* ``typo``: each keypoint text gets typos at ``--typo-rate`` (default 0.1);
* ``template``: keypoint texts are rewritten by each word map of ``--template-map`` (default: the paper's
  five Table 5 maps), one result row per map;
* ``reference:VARIANT``: the reference's own texts of that variant (``typo``, ``synonyms``, ``translate``,
  ``no_position``, ``manual*``; from the ``--descriptions`` file of ``python -m pipelines.descriptions``).

Keypoint texts: the training config's (``data.descriptions``, ``data.text_variant``), or
``--descriptions FILE [--text-variant V]``. A checkpoint converted from the published weights
(``jobs.convert``) reads the reference's regular texts: evaluating it without them (no descriptions, a
name → texts map, another variant) is refused in one line, since its numbers would mean nothing.

Episodes: ours by default (seeded); ``--sampler reference`` draws the reference's own (support, query)
annotations from the split's test annotation file under ``--data-root`` (mmpose's
``make_paired_samples``, :func:`capenext.protocol.reference_pairs`).

Embeddings: with ``--embeddings`` the precomputed tables of ``pipelines.embed`` are used (clean, and the
noisy variants they hold: ``typo@R`` for the rates and seed they were made with, ``template:NAME`` for
the same map); a variant the tables do not hold, and everything without ``--embeddings``, is encoded here
with the model's own frozen CLIP, the same texts through the same encoder, so the results agree either
way (:class:`capenext.data.embeddings.EmbeddingSource`). Image embeddings of a ``precomputed`` model are then taken from the un-augmented test crop, as the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capenext.cli import UsageError, run_main
from capenext.config import RunCfg
from capenext.data.mp100 import TEXT_VARIANTS
from capenext.metrics import THRESHOLDS, episode_seed, metric_keys
from capenext.noise import DEFAULT_TYPO_RATE, Variant, get_noise, noise_kinds, wrong_class
from capenext.recipe import JobFacts, departures
from jobs.runtime.checkpoints import CHECKPOINT_HELP, Source, resolve_checkpoint
from capenext.options import (add_clip_precision, add_config_option, add_device, add_noise_seed,
                                       add_recipe, add_tracking_uri, positive)
from jobs.runtime.tracking import ensure_experiment, find_run, open_client, tracking_uri

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
               "--typo-rate 0.2\n"
               "  python -m jobs.evaluate --checkpoint final.pt --split 1 --shards shards --noise template\n"
               "  python -m jobs.evaluate --checkpoint capenext_split1.pt --split 1 --shards shards --embeddings emb "
               "--descriptions descriptions.json --sampler reference --data-root MP100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--split", type=int, default=None,
                   help="MP-100 split 1-5 (default: the training run's split tag)")
    p.add_argument("--shards", type=Path, required=True, help="shard folder (pipelines.shard)")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="embedding folder (pipelines.embed) with the clean and noisy keypoint tables; without "
                        "it every embedding is encoded here with the model's CLIP")
    add_config_option(p, "descriptions", help="keypoint texts from this descriptions file (python -m "
                      "pipelines.descriptions) instead of the training config's")
    add_config_option(p, "text_variant", choices=TEXT_VARIANTS, metavar="VARIANT",
                      help=f"which of the reference's texts the descriptions file gives: {', '.join(TEXT_VARIANTS)} "
                           "(default: the config's, regular)")
    g = p.add_argument_group("noise (paper Tables 4 and 5)")
    g.add_argument("--noise", default="none", metavar="KIND",
                   help="; ".join(f"{k + (':VARIANT' if 'variant' in get_noise(k).options else '')}: "
                                  f"{get_noise(k).help}" for k in noise_kinds()) + " (default none)")
    g.add_argument("--typo-rate", type=float, default=None,
                   help=f"typo rate per letter, in [0, 1] (--noise typo; default {DEFAULT_TYPO_RATE})")
    g.add_argument("--template-map", default=None,
                   help="JSON word map {\"word\": \"replacement\"} or {\"name\": {...}, ...} (--noise template; "
                        "default: each of the paper's Table 5 maps, one result row each)")
    add_noise_seed(g)
    g.add_argument("--class-names", type=Path, default=None, metavar="CHECKOUT",
                   help="--noise class draws each query's wrong name from the reference's own list of MP-100's 100 "
                        "category names, read (never run) from this checkout of the official code at a commit up to "
                        "4e08e71; default: the category names of the shards' annotation files")
    g = p.add_argument_group("protocol")
    add_recipe(g)
    add_config_option(g, "precision", help="the pose model's precision: fp32 (the reference's, and the default) or "
                                           "bf16 autocast (CUDA only)")
    for name in ("episodes", "queries"):
        add_config_option(g, name, help=f"{'test episodes per category' if name == 'episodes' else 'queries per episode'}"
                                        " (default: the training config's)")
    add_config_option(g, "sampler", help="ours (the seeded sampler, default) or reference: the reference's own "
                      "episodes (its sampler on the split's test annotation file; needs --data-root)")
    g.add_argument("--data-root", type=Path, default=None,
                   help="the MP-100 copy the shards were made from (--sampler reference reads its test annotation file)")
    g.add_argument("--episode-seed", type=int, default=None,
                   help="seed of our episodes (default: the training run's, optim.seed + 2)")
    g.add_argument("--eval-batch-size", type=int, default=None,
                   help="queries per forward (default: the config's optim.batch_size)")
    add_device(g)
    g.add_argument("--clip-checkpoint", default=None,
                   help="where the frozen CLIP's weights are on this machine (default: the config's path)")
    add_clip_precision(g)
    g.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--pictures", type=int, default=2,
                   help="best and worst queries per category drawn for each row (default 2; 0: none)")
    g.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="folder for the pictures (default ./evaluation)")
    add_tracking_uri(g)
    g.add_argument("--experiment", default="capenext",
                   help="MLflow experiment when the training run is not in the tracking store (default capenext)")
    g.add_argument("--no-mlflow", action="store_true", help="print the results only, log nothing")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


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
    given = {"rate": args.typo_rate, "template_map": args.template_map}
    flags = {"rate": "--typo-rate", "template_map": "--template-map"}
    for option, value in given.items():
        if value is not None and option not in kind.options:
            users = [k for k in noise_kinds() if option in get_noise(k).options]
            raise UsageError(f"{flags[option]} applies to --noise {', '.join(users)}, not --noise {args.noise}")
    try:
        return kind.variants(rate=args.typo_rate, template_map=args.template_map, seed=args.noise_seed, variant=variant,
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



# --- output ------------------------------------------------------------------------------------------


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


def table(rows: list[dict[str, Any]]) -> str:
    heads = [f"PCK@{t:g}" for t in THRESHOLDS] + ["mPCK"]
    keys = metric_keys("test")
    width = max([len("noise variant")] + [len(r["noise_variant"]) for r in rows]) + 2
    lines = [f"{'noise variant':<{width}}" + "".join(f"{h:>9}" for h in heads) + "  embeddings"]
    for r in rows:
        lines.append(f"{r['noise_variant']:<{width}}" + "".join(f"{r[k]:>9.4f}" for k in keys)
                     + f"  {r['embeddings']}")
    return "\n".join(lines)


# --- driver ------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What every result row of one ``jobs.evaluate`` call shares: the model, its config, the split's test
    categories and their episodes, the embedding source, and where rows are logged."""

    source: Source
    model: torch.nn.Module
    cfg: RunCfg
    device: torch.device
    split: int
    index: Any  # ShardIndex
    subset: Any  # the split's test Subset
    pairs: np.ndarray  # (P, 2) query, support indices into subset.samples
    sampler: str
    ep_seed: int | None  # None: the reference's episodes
    embeddings: Any  # EmbeddingSource
    label: str
    training_id: str | None
    batch_size: int


def check_args(args: argparse.Namespace) -> None:
    """Usage errors that need nothing loaded, before anything slow."""
    parse_noise(args.noise)
    for flag, value in (("--episodes", args.episodes), ("--queries", args.queries),
                        ("--eval-batch-size", args.eval_batch_size)):
        positive(flag, value)
    if args.data_root is not None and not args.data_root.is_dir():
        raise UsageError(f"--data-root {args.data_root}: no such folder")
    if args.clip_precision == "fp16" and args.device != "cuda":
        raise UsageError("--clip-precision fp16 runs on a CUDA device only (the reference's GPU setting): add "
                         "--device cuda, or use fp32")
    if args.pictures < 0:
        raise UsageError(f"--pictures must be 0 or more, got {args.pictures}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")


def load(args: argparse.Namespace, uri: str) -> tuple[Source, torch.nn.Module, RunCfg, dict[str, Any]]:
    """The checkpoint, its model on the device and its config with this command's text and CLIP options."""
    from capenext.checkpoint import load_model
    from capenext.data.mp100 import check_texts
    from capenext.predict import set_clip_precision

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="capenext-eval-") as tmp:
        source = resolve_checkpoint(args.checkpoint, uri, Path(tmp))
        try:
            model, cfg, meta = load_model(source.path, args.clip_checkpoint, device)  # weights_only=True
        except KeyError as err:  # unregistered ablation / backbone / CLIP in the config
            raise ValueError(f"{source.spec}: checkpoint of an unknown config ({err.args[0] if err.args else err})"
                             ) from None
    if args.recipe == "paper":  # the reference's test: its episodes, the model in fp32, CLIP fp16 on a GPU
        from capenext.recipe import paper_settings

        paper = paper_settings(cfg.model.backbone, device.type)
        cfg.data.episodes, cfg.data.test_episodes, cfg.data.queries = (
            paper["data.episodes"], paper["data.test_episodes"], paper["data.queries"])
        cfg.model.precision, cfg.model.clip_precision = paper["model.precision"], paper["model.clip_precision"]
    for field_, value in (("descriptions", args.descriptions), ("text_variant", args.text_variant),
                          ("test_episodes", args.episodes), ("queries", args.queries), ("episodes", args.sampler)):
        if value is not None:
            setattr(cfg.data, field_, value)
    if args.precision is not None:
        cfg.model.precision = args.precision
    if cfg.model.precision == "bf16" and device.type != "cuda":
        raise UsageError("--precision bf16 is autocast on CUDA: add --device cuda, or use fp32")
    check_texts(cfg.data)
    check_converted_texts(source.spec, meta, cfg)
    if args.clip_precision is not None:
        cfg.model.clip_precision = args.clip_precision
    set_clip_precision(model, cfg, device)
    return source, model, cfg, meta


def split_of(args: argparse.Namespace, train_tags: dict[str, str], training_id: str | None, uri: str) -> int:
    """``--split``, else the training run's split tag; a note when they differ."""
    from capenext.data.mp100 import check_split

    split = args.split if args.split is not None else (int(train_tags["split"]) if "split" in train_tags else None)
    if split is None:
        raise UsageError(f"pass --split K: the checkpoint's training run ({training_id or 'unknown'}) is not in "
                         f"{uri}, so its split is unknown")
    check_split(split)
    if "split" in train_tags and int(train_tags["split"]) != split:
        print(f"note: the model was trained on split {train_tags['split']}; split {split}'s test categories "
              "may be among its training categories", file=sys.stderr)
    return split


def prepare(args: argparse.Namespace, uri: str) -> tuple[Evaluation, Any]:
    """Everything the rows share, every input checked; and the training run (``None`` when not in the store)."""
    from capenext.data.embeddings import EmbeddingSource, check_tables, needs_image_table
    from capenext.data.shards import ShardIndex
    from capenext.protocol import our_pairs, reference_pairs

    source, model, cfg, meta = load(args, uri)
    if cfg.data.episodes == "reference" and args.data_root is None:
        raise UsageError("--sampler reference draws from the split's test annotation file: pass --data-root ROOT "
                         "(the MP-100 copy the shards were made from)")
    if cfg.data.episodes == "reference" and args.episode_seed is not None:
        raise UsageError("--episode-seed seeds our episodes; the reference's are drawn with its own seed")
    training_id = source.run_id or meta.get("run_id")
    train_run = find_run(open_client(uri, create=False), training_id)  # read only: no store is made here
    train_tags = train_run.data.tags if train_run is not None else {}
    split = split_of(args, train_tags, training_id, uri)
    index = ShardIndex(args.shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    subset = index.subset(split, "test")
    if not subset.samples:
        raise UsageError(f"split {split} has no test samples in {args.shards}")
    n, q = cfg.data.test_episodes, cfg.data.queries
    ep_seed = None
    if cfg.data.episodes == "reference":
        pairs = reference_pairs(args.data_root, split, index, subset, n, q)
    else:
        ep_seed = episode_seed(cfg.optim.seed, "test") if args.episode_seed is None else args.episode_seed
        pairs = our_pairs(subset, n, q, ep_seed)
    images = needs_image_table(cfg)
    tables = None
    if args.embeddings is not None:
        tables = check_tables(args.embeddings, cfg, index.digest, images=images,
                              remake=f"python -m pipelines.embed --shards {args.shards} --out "
                                     f"{args.embeddings} and the training run's --config/--set")
    emb = EmbeddingSource(model, index, args.embeddings, tables, args.noise_seed, images)
    label = train_tags.get("capenext.run_name") or source.path.stem
    return Evaluation(source, model, cfg, torch.device(args.device), split, index, subset, pairs, cfg.data.episodes,
                      ep_seed, emb, label, training_id, args.eval_batch_size or cfg.optim.batch_size), train_run


def class_names(ev: Evaluation, args: argparse.Namespace) -> tuple[list[str], str]:
    """The list per-query class noise draws from, and where it came from (recorded on the run)."""
    from capenext.noise import reference_class_names

    if args.class_names is not None:
        names = reference_class_names(args.class_names)
        return names, f"reference ({len(names)} names, {args.class_names})"
    names = [c.name for c in sorted(ev.index.categories.values(), key=lambda c: c.id)]
    return names, f"annotations ({len(names)} categories)"


def pair_classes(ev: Evaluation, args: argparse.Namespace):
    """Per-query class noise as the reference's Table 4 run: each (query, support) pair's class prompt is
    another name of the list (:func:`capenext.noise.query_class`); returns the pairs' classes and the share
    of pairs whose name changed, and where the list came from."""
    from capenext.noise import query_class
    from capenext.protocol import PairClasses

    names, source = class_names(ev, args)
    true = {s.ann_id: ev.subset.categories[s.category_id].name for s in ev.subset.samples}
    unique = sorted(set(names))
    table = ev.embeddings.classes(dict(enumerate(unique)))  # index → (C,)
    embeddings = {name: table[i] for i, name in enumerate(unique)}

    def name(query_ann: int, support_ann: int) -> str:
        return query_class(true[query_ann], names, args.noise_seed, query_ann, support_ann)

    anns = [(ev.subset.samples[q].ann_id, ev.subset.samples[s].ann_id) for q, s in ev.pairs.tolist()]
    changed = float(np.mean([name(a, s) != true[a] for a, s in anns])) if anns else 0.0
    return PairClasses(name, embeddings), changed, source


def measure(ev: Evaluation, v: Variant, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict]]:
    """One result row: the variant's embeddings, the protocol, the share of prompts the noise changed."""
    from capenext.data.embeddings import needs_image_table
    from capenext.protocol import run_protocol

    categories = sorted(ev.subset.categories.values(), key=lambda c: c.id)
    names = {c.id: c.name for c in categories}
    classes, source = None, ""
    if v.per_query:
        classes, share, source = pair_classes(ev, args)
        changed = [share]
    elif v.wrong_class:
        all_names = [c.name for c in ev.index.categories.values()]
        names = {c.id: wrong_class(c.name, all_names, args.noise_seed) for c in categories}
        changed = [names[c.id] != c.name for c in categories]
    else:
        changed = [new != old for c in categories for new, old in zip(ev.embeddings.texts(v, c), c.keypoints)]
    bank, where = ev.embeddings.bank(v, categories, names)
    online = needs_image_table(ev.cfg) and ev.embeddings.base is None
    metrics, records = run_protocol(ev.model, ev.subset, ev.pairs, ev.cfg.data, ev.device,
                                    load_image=ev.index.read_bytes, batch_size=ev.batch_size, bank=bank,
                                    online_images=online, loader_workers=args.loader_workers, records=True,
                                    progress=None if args.quiet else v.name, classes=classes)
    row = {"noise": v.noise, "noise_variant": v.name,
           "embeddings": where if not online else f"{where} (images in-process)",
           **{f"test/{k}": val for k, val in metrics.items() if k != "count"},
           "test/queries": metrics["count"], "noise/changed_fraction": float(np.mean(changed))}
    if source:
        row["class_names"] = source  # where per-query class noise drew its names
    return row, records


def row_params(ev: Evaluation, v: Variant, row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What an evaluation run records as params: the settings that change its numbers."""
    return {"checkpoint": ev.source.spec, "noise": v.noise, "noise_variant": v.name, "noise_seed": args.noise_seed,
            "typo_rate": v.rate if v.rate is not None else "",
            "template_map": json.dumps(v.word_map) if v.word_map else "", "episodes": ev.cfg.data.test_episodes,
            "queries": ev.cfg.data.queries, "episode_seed": ev.ep_seed if ev.ep_seed is not None else "",
            "sampler": ev.sampler, "eval_batch_size": ev.batch_size,
            "keypoint_texts": ev.cfg.data.descriptions or "annotations", "text_variant": ev.cfg.data.text_variant,
            "clip_precision": ev.cfg.model.clip_precision, "precision": ev.cfg.model.precision,
            "embeddings": row["embeddings"], "split": ev.split, "device": str(ev.device), "recipe": args.recipe,
            "class_names": row.get("class_names", "")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    # usage errors before anything slow (the reference's texts may come from the checkpoint's config)
    rows_spec = None if parse_noise(args.noise)[0] == "reference" and args.descriptions is None else variants(
        args, args.descriptions)
    uri = tracking_uri(args.tracking_uri)
    ev, train_run = prepare(args, uri)
    rows_spec = rows_spec or variants(args, ev.cfg.data.descriptions)
    print(f"evaluating {ev.source.spec} ({ev.cfg.model.ablation}, {ev.cfg.model.backbone}) on split {ev.split}: "
          f"{len(ev.subset.categories)} test categories x {ev.cfg.data.test_episodes} episodes x "
          f"{ev.cfg.data.queries} queries, "
          + (f"episode seed {ev.ep_seed}" if ev.ep_seed is not None else "the reference's episodes")
          + f", noise {args.noise} (seed {args.noise_seed})", file=sys.stderr, flush=True)
    client = experiment_id = None
    if not args.no_mlflow:  # the store is made only now, so a job that fails on its input leaves none behind
        client = open_client(uri)
        experiment_id = train_run.info.experiment_id if train_run is not None else ensure_experiment(
            client, args.experiment, uri)
        if train_run is None:
            print(f"note: training run {ev.training_id or '(unknown)'} is not in {uri}; logging to experiment "
                  f"{args.experiment!r}", file=sys.stderr)
    results = []
    for v in rows_spec:
        t0 = time.time()
        row, records = measure(ev, v, args)
        pics = []
        if args.pictures > 0 and records:
            title = (f"{ev.label} · split {ev.split} · {v.name} · test PCK@0.2 {row['test/pck_0.2']:.3f} · best and "
                     f"worst queries by PCK@{PICTURE_THRESHOLD:g}")
            pics.append(picture(records, ev.subset, ev.index, ev.cfg, args.pictures, title,
                                args.out / _safe(ev.label) / f"{_safe(v.name)}.png"))
            row["picture"] = str(pics[0])
        if experiment_id is not None:
            tags = {"capenext.kind": "evaluation", "training_run_id": ev.training_id or "", "noise": v.noise,
                    "noise_variant": v.name, "split": str(ev.split), "ablation": ev.cfg.model.ablation,
                    "backbone": ev.cfg.model.backbone, "mlflow.runName": f"{ev.label}-eval-{v.name}",
                    "training_run_name": ev.label, "recipe": args.recipe,
                    "paper_departures": "; ".join(departures(ev.cfg, JobFacts(device=ev.device.type))) or "none"}
            mkeys = [k for k in row if k.startswith(("test/", "noise/"))]
            row["run_id"] = log_row(client, experiment_id, tags, row_params(ev, v, row, args),
                                    {k: row[k] for k in mkeys}, pics)
        results.append(row)
        print(f"{v.name}: PCK@0.2 {row['test/pck_0.2']:.4f}, mPCK {row['test/pck_mean']:.4f} "
              f"({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    print(table(results))
    print(json.dumps({"checkpoint": ev.source.spec, "training_run_id": ev.training_id, "split": ev.split,
                      "rows": results}))
    return 0


if __name__ == "__main__":
    run_main(main)
