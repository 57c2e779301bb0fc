"""Evaluation benchmark: ``python -m jobs.benchmark evaluate``.

Pairs per second of the MP-100 test protocol (per test category ``--episodes`` × ``--queries`` (query,
support) pairs, 200 × 15 by default, our seeded episodes of the split), three ways, in the same run, on
the same model and the same episodes:

* ``reference_style``: what the reference's test does per pair, written from its behaviour: its
  ``test.py`` builds the test loader with ``samples_per_gpu=1`` (no config of ``configs/`` overrides it
  with a ``test_dataloader``), and its ``predict`` encodes, in every forward, the support-visible keypoint
  texts and the class prompt with CLIP's text tower and the query crop with CLIP's image tower, then runs
  the backbone and the head. Here: the pair's item (decode and crop of the query), those CLIP encodings
  with the model's own frozen CLIP, one whole forward, one pair at a time. (The reference also decodes and
  warps the support image, which this loop does not: the loop is, if anything, faster than the reference.)
* ``per_pair``: our per-pair loop, ``run_protocol(..., dedupe=False)``: the embeddings from the tables,
  ``--batch-size`` pairs per forward.
* ``ours``: :func:`capenext.protocol.run_protocol`: each query's crop decoded and its image part run
  once, the head once per (query, support mask), ``--batch-size`` per forward.

``ours`` runs the whole protocol; the two per-pair loops run on a fixed sample of the same pairs
(``--sample`` pairs evenly spaced over the protocol's pair list, so every category is in it) and their
pairs/s is what that sample measured. Each loop is warmed up (one untimed batch) first. ``pck_equal``:
over the sampled pairs, ``ours``' per-pair PCK averaged equals the per-pair loop's at every threshold
within 1e-9; ``max_abs_pred_diff_px``: the largest difference of a prediction at a keypoint visible in
query and support. ``projected_five_splits``: the full five-split protocol (5 splits × 20 test categories
× 200 × 15 = 300,000 pairs) at each measured pairs/s; ``ours`` on MP-100 does more work per pair than on a
small set (more instances per category: more unique queries and masks), so its projection holds for a
set with this one's share of unique queries and units (``ours.queries``, ``ours.units``).

``--checkpoint`` is optional: without it a random-init model of ``--preset`` (random CLIP) is measured,
its tables made by ``python -m pipelines.embed --config PRESET --clip-checkpoint random``; weights do not
change the timing. ``--quick``: 10 episodes × 5 queries and 8 sampled pairs (a smoke test).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from capenext.cli import UsageError
from capenext.config import THRESHOLDS, RunCfg, load_preset
from capenext.data import PairDataset, collate
from capenext.engine import autocast, precision_of, score, to_device, to_image_pixels
from capenext.metrics import PCKAccumulator, episode_seed, pck_key
from capenext.protocol import our_pairs, run_protocol
from jobs.benchmarks import machine
from capenext.options import positive

FIVE_SPLIT_PAIRS = 5 * 20 * 200 * 15  # the paper's protocol: 5 splits x 20 test categories x 200 x 15
REFERENCE_TEST_BATCH = 1  # the reference's test.py: samples_per_gpu=1, no test_dataloader override in configs/
QUICK = {"episodes": 10, "queries": 5, "sample": 8}
PCK_TOLERANCE = 1e-9


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``evaluate`` subcommand's options."""
    p.add_argument("--shards", type=Path, required=True, help="shard folder written by pipelines.shard")
    p.add_argument("--embeddings", type=Path, required=True,
                   help="embedding tables of the model's config (python -m pipelines.embed)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file (default: a random-init model of --preset with a random CLIP)")
    p.add_argument("--clip-checkpoint", default=None, help="CLIP weights path overriding the checkpoint's")
    p.add_argument("--preset", default="swinv2_t", help="config preset without --checkpoint (default swinv2_t)")
    p.add_argument("--split", type=int, default=1, help="split whose test categories are used (default 1)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per category (default 200; --quick 10)")
    p.add_argument("--queries", type=int, default=None, help="queries per episode (default 15; --quick 5)")
    p.add_argument("--sample", type=int, default=None,
                   help="pairs the per-pair loops run on, evenly spaced over the protocol (default 96; --quick 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="pairs (per-pair loop) or queries and units (ours) per forward (default: the config's "
                        "optim.batch_size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="10 episodes x 5 queries, 8 sampled pairs: a smoke run")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``evaluate`` subcommand: its options → :func:`benchmark_evaluate`."""
    for name, value in QUICK.items():
        if getattr(args, name) is None:
            setattr(args, name, value if args.quick else {"episodes": 200, "queries": 15, "sample": 96}[name])
    for flag, value in (("--episodes", args.episodes), ("--queries", args.queries), ("--sample", args.sample),
                        ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None:
            positive(flag, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return benchmark_evaluate(args)


def load(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, RunCfg, str]:
    """The model to measure, its config and what it is (the checkpoint, or the random-init preset)."""
    from capenext.checkpoint import load_model
    from capenext.models import build_model

    if args.checkpoint is not None:
        model, cfg, _ = load_model(args.checkpoint, args.clip_checkpoint, device)
        return model, cfg, str(args.checkpoint)
    cfg = load_preset(args.preset)
    cfg.model.clip_checkpoint = args.clip_checkpoint or cfg.model.clip_checkpoint or "random"
    torch.manual_seed(0)
    return build_model(cfg.model).to(device).eval(), cfg, f"random init of preset {args.preset}"


def reference_style(model: torch.nn.Module, subset, pairs: np.ndarray, cfg: RunCfg, device: torch.device,
                    load_image: Callable) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The reference's test loop per pair (see the module docstring): one pair per forward, CLIP's text
    tower on the support-visible keypoint texts and the class prompt and its image tower on the crop in
    every forward. Returns the metrics and one record per pair (``pred``, ``pck``, ``visible``)."""
    ds = PairDataset(subset, pairs, cfg.data, load_image=load_image)
    clip, slots = model.clip, cfg.data.max_keypoints
    acc, kept = PCKAccumulator(THRESHOLDS), []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ds), REFERENCE_TEST_BATCH):
            batch = collate([ds[j] for j in range(i, min(i + REFERENCE_TEST_BATCH, len(ds)))])
            kp = torch.zeros(len(batch["img"]), slots, clip.embed_dim, device=device)  # (B, K, C)
            names = []
            for b, cid in enumerate(batch["category_id"].tolist()):
                category, mask = subset.categories[cid], batch["kp_mask"][b]
                texts = [t for t, v in zip(category.keypoints, mask.tolist()) if v]
                kp[b, mask.to(device)] = clip.encode_text(texts)  # (k, C) the visible keypoints' texts, per forward
                names.append(category.name)
            batch = to_device(batch, device)
            batch["kp_emb"] = kp
            if model.needs_class_embedding:
                batch["cls_emb"] = clip.encode_class(names)  # (B, C)
            if model.needs_image_embedding and model.image_embedding == "precomputed":
                batch["img_emb"] = clip.encode_image(batch["img"])  # (B, C) the reference encodes it in forward
            with autocast(device, precision_of(model)):
                out = model(batch)
            pred = to_image_pixels(out["points"][-1].float(), batch["inverse"], cfg.data.image_size)
            start = len(kept)
            score(acc, pred, batch, kept)
            for r, vis in zip(kept[start:], batch["visible"].cpu()):
                r["visible"] = vis
    return acc.result(), kept


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def _mean_pck(records: list[dict[str, Any]]) -> dict[str, float]:
    per = np.asarray([r["pck"] for r in records], dtype=np.float64).reshape(-1, len(THRESHOLDS))  # (P, T)
    return {pck_key(t): float(v) for t, v in zip(THRESHOLDS, per.mean(0) if len(per) else np.zeros(len(THRESHOLDS)))}


def _max_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """The largest |Δ| (px) of two runs' predictions of the same pairs at keypoints visible in both."""
    diffs = [float((x["pred"] - y["pred"])[x["visible"]].abs().max()) for x, y in zip(a, b) if x["visible"].any()]
    return max(diffs, default=0.0)


def _loop(name: str, pairs_n: int, seconds: float, records: list, sample_of_ours: list) -> dict[str, Any]:
    pck = _mean_pck(records)
    mine = _mean_pck(sample_of_ours)
    return {"pairs_measured": pairs_n, "seconds": round(seconds, 3), "pairs_per_s": pairs_n / seconds,
            "pck_on_sample": pck, "max_abs_pred_diff_px_vs_ours": _max_diff(records, sample_of_ours),
            "pck_equal_to_ours": all(abs(pck[k] - mine[k]) <= PCK_TOLERANCE for k in pck), "what": name}


def benchmark_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The three loops on the same model and episodes; see the module docstring for each field."""
    from capenext.data.embeddings import check_tables, load_bank, needs_image_table
    from capenext.data.shards import ShardIndex

    device = torch.device(args.device)
    model, cfg, what = load(args, device)
    batch_size = args.batch_size or cfg.optim.batch_size
    index = ShardIndex(args.shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    subset = index.subset(args.split, "test")
    check_tables(args.embeddings, cfg, index.digest, images=needs_image_table(cfg))
    bank = load_bank(args.embeddings, images=needs_image_table(cfg))
    pairs = our_pairs(subset, args.episodes, args.queries, episode_seed(cfg.optim.seed, "test"))
    sample = np.unique(np.linspace(0, len(pairs) - 1, min(args.sample, len(pairs))).round().astype(np.int64))
    common = dict(load_image=index.read_bytes, batch_size=batch_size, bank=bank, records=True)

    # warm-ups (untimed): one batch of each loop
    run_protocol(model, subset, pairs[sample[:batch_size]], cfg.data, device, **common)
    run_protocol(model, subset, pairs[sample[:batch_size]], cfg.data, device, dedupe=False, **common)
    reference_style(model, subset, pairs[sample[:1]], cfg, device, index.read_bytes)

    stats: dict[str, Any] = {}
    (ours, ours_records), ours_s = _timed(
        lambda: run_protocol(model, subset, pairs, cfg.data, device, stats=stats, **common), device)
    (_, pp_records), pp_s = _timed(
        lambda: run_protocol(model, subset, pairs[sample], cfg.data, device, dedupe=False, **common), device)
    (_, ref_records), ref_s = _timed(
        lambda: reference_style(model, subset, pairs[sample], cfg, device, index.read_bytes), device)
    ours_on_sample = [ours_records[i] for i in sample]  # one world: records follow the pairs' order
    ours_row = {"pairs_measured": len(pairs), "seconds": round(ours_s, 3), "pairs_per_s": len(pairs) / ours_s,
                "pck": {k: v for k, v in ours.items() if k != "count"}, "pck_on_sample": _mean_pck(ours_on_sample),
                "queries": stats["queries"], "units": stats["units"],
                "stage_seconds": {k: round(v, 3) for k, v in stats["seconds"].items()}}
    per_pair = _loop(f"run_protocol(dedupe=False), {batch_size} pairs per forward, embeddings from the tables",
                     len(sample), pp_s, pp_records, ours_on_sample)
    reference = _loop(f"per pair, {REFERENCE_TEST_BATCH} pair per forward, CLIP text + image towers in every "
                      "forward", len(sample), ref_s, ref_records, ours_on_sample)

    def hours(pairs_per_s: float) -> float:
        return round(FIVE_SPLIT_PAIRS / pairs_per_s / 3600, 2)

    return {
        "benchmark": "evaluate", "model": what, "backbone": cfg.model.backbone, "ablation": cfg.model.ablation,
        "image_embedding": cfg.model.image_embedding, "split": args.split, "episodes": args.episodes,
        "queries": args.queries, "pairs": len(pairs), "test_categories": len(subset.categories),
        "batch_size": batch_size, "device": args.device, "threads": torch.get_num_threads(),
        "reference_style": reference, "per_pair": per_pair, "ours": ours_row,
        "ratio_vs_per_pair": ours_row["pairs_per_s"] / reference["pairs_per_s"],
        "ratio_vs_our_per_pair_loop": ours_row["pairs_per_s"] / per_pair["pairs_per_s"],
        "pck_equal": per_pair["pck_equal_to_ours"],
        "projected_five_splits": {
            "pairs": FIVE_SPLIT_PAIRS, "hours_reference_style": hours(reference["pairs_per_s"]),
            "hours_per_pair": hours(per_pair["pairs_per_s"]), "hours_ours": hours(ours_row["pairs_per_s"]),
            "note": f"from the pairs/s measured here: the per-pair loops on {len(sample)} sampled pairs, ours on "
                    f"all {len(pairs)}; ours holds for a set with this one's share of unique queries and units"},
        "machine": machine(),
    }
