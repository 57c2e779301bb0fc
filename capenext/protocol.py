"""The MP-100 test protocol, once: episodes in, per-threshold PCK and per-query records out.

What a training run's validation and final test (:mod:`jobs.training.loop`), ``jobs.evaluate``, the sweep's
trials and the quickstart all measure (DETR's ``engine.evaluate`` is likewise what training and ``--eval``
call). An episode is a (query, support) pair of annotations of one test category; text-only CAPE never
encodes the support image, so the support contributes its category's keypoint texts, skeleton and
visibility, the query its un-augmented crop. Per category ``data.test_episodes`` episodes ×
``data.queries`` queries are drawn by our seeded sampler (:func:`our_pairs`) or taken from the reference's
sampler (:func:`reference_pairs`, mmpose's ``make_paired_samples`` on the split's test annotation file);
every pair is scored by :func:`capenext.engine.evaluate` (PCK over the keypoints visible in both, the
query box's max side as normaliser).

In a distributed run each rank takes a strided share of the pairs and the accumulator is all-reduced,
so every rank returns the same metrics; records are the rank's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from capenext.config import DataCfg
from capenext.data import PairDataset, collate, episodes
from capenext.data.embeddings import EmbeddingBank
from capenext.engine import evaluate
from capenext.metrics import THRESHOLDS


def our_pairs(subset, num_episodes: int, queries: int, seed: int) -> np.ndarray:
    """Our seeded episodes of every category in ``subset``: (P, 2) query, support indices."""
    return episodes(subset.by_category(), num_episodes, queries, seed)


def reference_pairs(data_root: Path, split: int, index, subset, num_episodes: int, queries: int) -> np.ndarray:
    """The reference's test episodes of ``split`` (its sampler on the split's test annotation file under
    ``data_root``) as (P, 2) query, support indices into ``subset.samples``. One line when the file is
    missing or is not the one the shards were made from."""
    from capenext.data.episodes import reference_pairs as from_annotations
    from capenext.data.mp100 import annotation_path
    from capenext.data.source import source_digest

    path = annotation_path(data_root, split, "test")
    if not path.is_file():
        raise FileNotFoundError(f"--sampler reference: {path} not found (--data-root)")
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
    return from_annotations(data, ann_index, num_episodes, queries, where=str(path))


def preparer(model: nn.Module, bank: EmbeddingBank | None, data: DataCfg, device: torch.device,
             online_images: bool = False) -> Callable[[dict], dict]:
    """What a batch needs before the forward: the frozen embeddings from ``bank`` (none for a model that
    reads no embeddings, such as the mean-position floor). ``online_images``: a model that reads a
    precomputed image embedding gets it from its own CLIP on the un-augmented crop, as
    ``pipelines.embed`` computes the table."""
    if bank is None:
        return lambda batch: batch
    core = getattr(model, "module", model)  # DDP
    wants_image = getattr(core, "needs_image_embedding", False) and getattr(core, "image_embedding", "") == "precomputed"
    image_table = wants_image and not online_images

    def prepare(batch: dict) -> dict:
        batch = bank.fill(batch, data.max_keypoints, image_table, core.needs_class_embedding)
        if online_images and wants_image:
            batch["img_emb"] = core.clip.encode_image(batch["img"].to(device)).cpu()  # (B, C)
        return batch

    return prepare


def run_protocol(model: nn.Module, subset, pairs: np.ndarray, data: DataCfg, device: torch.device, *,
                 load_image: Callable, batch_size: int, bank: EmbeddingBank | None = None,
                 online_images: bool = False, thresholds: tuple[float, ...] = THRESHOLDS, rank: int = 0,
                 world: int = 1, loader_workers: int = 0, records: bool = False, progress: str | None = None
                 ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """PCK of ``model`` on the (query, support) ``pairs`` of ``subset``.

    Returns ``({"pck_0.05": ..., "pck_mean": ..., "count": n}, records)``; with ``records`` one dict per
    query (``ann_id``, ``category_id``, ``pred`` (K, 2) image pixels, ``pck`` per threshold, ``visible``
    (K,)) for pictures of the best and worst queries. ``progress``: a bar with that label on stderr.
    """
    mine = np.arange(rank, len(pairs), world)
    ds = PairDataset(subset, pairs, data, load_image=load_image, positions=mine)  # decoded as in training
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=loader_workers)
    prepare = preparer(model, bank, data, device, online_images)
    visible: list[torch.Tensor] = []

    def keep_visible(batch: dict) -> dict:
        batch = prepare(batch)
        visible.append(batch["visible"])
        return batch

    batches: Any = loader
    if progress is not None:
        from tqdm import tqdm

        batches = tqdm(loader, desc=progress, unit="batch", file=sys.stderr, leave=False)
    kept: list[dict[str, Any]] | None = [] if records else None
    metrics = evaluate(model, batches, device, keep_visible if records else prepare, data.image_size,
                       thresholds=thresholds, keep=kept)
    if kept is None:
        return metrics, []
    for r, vis in zip(kept, torch.cat(visible) if visible else []):
        r["visible"] = vis
    return metrics, kept
