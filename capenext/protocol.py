"""The MP-100 test protocol, once: episodes in, per-threshold PCK and per-query records out.

What a training run's validation and final test (:mod:`jobs.training.loop`), ``jobs.evaluate``, the sweep's
trials and the quickstart all measure (DETR's ``engine.evaluate`` is likewise what training and ``--eval``
call). An episode is a (query, support) pair of annotations of one test category; text-only CAPE never
encodes the support image, so the support contributes its category's keypoint texts, skeleton and
visibility, the query its un-augmented crop. Per category ``data.test_episodes`` episodes ×
``data.queries`` queries are drawn by our seeded sampler (:func:`our_pairs`) or taken from the reference's
sampler (:func:`reference_pairs`, mmpose's ``make_paired_samples`` on the split's test annotation file);
every pair is scored on its own (:func:`capenext.engine.score`: PCK over the keypoints visible in both, the
query box's max side as normaliser). Where the subset's categories list polysemous keypoints
(``Category.polysemous``), both ways also sum the keypoint-level PCK of those and of the other keypoints
(:func:`capenext.metrics.polysemy_groups`), derived from the subset, so no caller passes anything.

The work is done once per unique input, not once per pair (:func:`run_protocol`). A query annotation
recurs in many episodes (200 × 15 draws over a category of N instances: about 3000 / N times) and many
supports share a visibility mask, while a pair's prediction depends on nothing else: its query crop, its
category's texts and skeleton, its support's mask. So each query's crop is decoded, and its backbone map
and CLIP image embedding computed, once (:meth:`~capenext.models.CapeNext.encode_image`); the rest of the
model (:meth:`~capenext.models.CapeNext.head`) runs once per :class:`Plan` unit, (query, support mask,
text identity); every pair is then scored with its unit's prediction, its own visibility (query AND
support visible) and its query's normaliser, in pair order. The per-pair loop (:func:`per_pair_protocol`,
``run_protocol(..., dedupe=False)``) is kept as the reference the tests and ``jobs.benchmark evaluate``
compare against: the same pairs give the same predictions up to float rounding of other batch
compositions, and the same PCK.

Distributed: the deduplicated protocol gives each rank a strided share of the unique queries (with all
their pairs), the per-pair loop a strided share of the pairs; either way the accumulator is all-reduced,
so every rank returns the same metrics over all pairs; records are the rank's own.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np
import torch
from torch import nn

from capenext.config import DataCfg
from capenext.data import PairDataset, adjacency, collate, episodes
from capenext.data.dataset import QueryDataset
from capenext.data.embeddings import EmbeddingBank
from capenext.engine import autocast, evaluate, precision_of, score, to_device, to_image_pixels
from capenext.metrics import THRESHOLDS, PCKAccumulator, polysemy_groups


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


def _wants_image(model: nn.Module) -> bool:
    """Whether ``model`` reads a precomputed image embedding (``batch["img_emb"]``)."""
    core = getattr(model, "module", model)  # DDP
    return getattr(core, "needs_image_embedding", False) and getattr(core, "image_embedding", "") == "precomputed"


def preparer(model: nn.Module, bank: EmbeddingBank | None, data: DataCfg, device: torch.device,
             online_images: bool = False) -> Callable[[dict], dict]:
    """What a batch needs before the forward: the frozen embeddings from ``bank`` (none for a model that
    reads no embeddings, such as the mean-position floor). ``online_images``: a model that reads a
    precomputed image embedding gets it from its own CLIP on the un-augmented crop, as
    ``pipelines.embed`` computes the table."""
    if bank is None:
        return lambda batch: batch
    core = getattr(model, "module", model)  # DDP
    wants_image = _wants_image(model)
    image_table = wants_image and not online_images

    def prepare(batch: dict) -> dict:
        batch = bank.fill(batch, data.max_keypoints, image_table, core.needs_class_embedding)
        if online_images and wants_image:
            batch["img_emb"] = core.clip.encode_image(batch["img"].to(device)).cpu()  # (B, C)
        return batch

    return prepare


@dataclass(frozen=True)
class PairClasses:
    """A class prompt per (query, support) pair instead of the category's: the reference's per-query class
    noise (:func:`capenext.noise.query_class`). ``name(query ann id, support ann id)`` is the pair's class
    name, ``embeddings[name]`` its (C,) embedding of ``a photo of {name}``."""

    name: Callable[[int, int], str]
    embeddings: dict[str, torch.Tensor]

    def stack(self, ann_ids: torch.Tensor, support_ids: torch.Tensor) -> torch.Tensor:
        """(B,) query and support annotation ids → (B, C) class embeddings."""
        return torch.stack([self.embeddings[self.name(int(a), int(s))] for a, s in zip(ann_ids, support_ids)])


def texts_key(query, support, classes: PairClasses | None = None) -> Hashable:
    """The identity of the texts (keypoint texts and class prompt) a pair is given: its category (one
    :class:`EmbeddingBank` holds one text per category and keypoint), and with per-pair class prompts the
    pair's class name. Part of a unit's key, so that cached work is keyed by the texts actually used."""
    if classes is None:
        return query.category_id
    return query.category_id, classes.name(query.ann_id, support.ann_id)


@dataclass
class Plan:
    """The unique work of a share of (query, support) pairs.

    Attributes (Q unique queries, U units, P pairs, K slots):
        queries: (Q,) sample indices of the unique queries, in order of first appearance (so category by
            category for our and the reference's episodes).
        unit_query: (U,) the query (position in ``queries``) of each unit, non-decreasing: a query's units
            are contiguous and follow the query order.
        unit_support: (U,) one support (sample index) of each unit; every support of the unit has its mask.
        unit_mask: (U, K) bool the unit's support mask, the model's ``kp_mask``: the support's visibility
            with the reference's test-crop rule (:func:`capenext.data.dataset.support_mask`).
        pairs: (P, 2) the share's pairs, in the order they are scored.
        pair_unit: (P,) the unit of each pair.
        pair_visible: (P, K) bool each pair's support annotation visibility: what is scored (with the query's).
    """

    queries: np.ndarray
    unit_query: np.ndarray
    unit_support: np.ndarray
    unit_mask: np.ndarray
    pairs: np.ndarray
    pair_unit: np.ndarray
    pair_visible: np.ndarray

    @property
    def pair_query(self) -> np.ndarray:
        """(P,) the query (position in ``queries``) of each pair."""
        return self.unit_query[self.pair_unit]

    def unit_range(self, q0: int, q1: int) -> tuple[int, int]:
        """The units ``[u0, u1)`` of the queries at positions ``[q0, q1)``."""
        return (int(np.searchsorted(self.unit_query, q0, "left")), int(np.searchsorted(self.unit_query, q1, "left")))


def plan(subset, pairs: np.ndarray, data: DataCfg, rank: int = 0, world: int = 1,
         key: Callable[[Any, Any], Hashable] = texts_key) -> Plan:
    """The units of this rank's share of ``pairs``: the unique queries at positions ``rank::world`` of the
    first-appearance order, every pair of those queries, and per (query, support mask, ``key(query, support)``) one
    unit. The support mask is the reference's at test (:func:`~capenext.data.dataset.support_mask`), once
    per support."""
    from capenext.data.dataset import support_mask

    slots = data.max_keypoints
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    _, first = np.unique(pairs[:, 0], return_index=True)
    queries = pairs[np.sort(first), 0][rank::world]  # (Q,)
    position = {int(q): i for i, q in enumerate(queries)}
    mine = pairs[np.isin(pairs[:, 0], queries)]  # (P, 2) in the global order
    units: dict[tuple, int] = {}
    found: list[tuple[int, int, int]] = []  # (query position, first pair, support) per unit, as found
    pair_unit = np.empty(len(mine), dtype=np.int64)
    pair_visible = np.zeros((len(mine), slots), dtype=bool)
    masks: dict[int, np.ndarray] = {}
    for p, (qi, si) in enumerate(mine.tolist()):
        query, support = subset.samples[qi], subset.samples[si]
        if si not in masks:
            masks[si] = support_mask(support, data) > 0  # (k,)
        pair_visible[p, : len(support.visible)] = support.visible
        k = (position[qi], masks[si].tobytes(), key(query, support))
        if k not in units:
            units[k] = len(found)
            found.append((position[qi], p, si))
        pair_unit[p] = units[k]
    order = sorted(range(len(found)), key=lambda u: found[u][:2])  # by query, then first appearance
    rank_of = np.empty(len(found), dtype=np.int64)
    rank_of[order] = np.arange(len(found))
    unit_mask = np.zeros((len(found), slots), dtype=bool)
    for new, u in enumerate(order):
        mask = masks[found[u][2]]
        unit_mask[new, : len(mask)] = mask
    return Plan(queries=queries, unit_query=np.asarray([found[u][0] for u in order], dtype=np.int64),
                unit_support=np.asarray([found[u][2] for u in order], dtype=np.int64), unit_mask=unit_mask,
                pairs=mine, pair_unit=rank_of[pair_unit], pair_visible=pair_visible)


class _Clock:
    """Seconds per stage of the protocol, when asked for (``stats``); CUDA is synchronised at each lap so
    that a stage's time is its own."""

    def __init__(self, device: torch.device, on: bool):
        self.device, self.on = device, on
        self.seconds: dict[str, float] = {"load": 0.0, "image": 0.0, "head": 0.0, "score": 0.0}
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if not self.on:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] += now - self.t
        self.t = now


class _Cached:
    """Runs a :class:`Plan`: the image part once per query batch, the head once per batch of units, and
    keeps what scoring needs. A query's cached image outputs are dropped as soon as its last unit ran, so
    at most the queries of two batches are held (those of the batch just encoded and those with units
    still waiting), whatever the size of a category.

    A model with ``encode_image`` / ``head`` (:class:`~capenext.models.CapeNext`) has its backbone (and
    online CLIP image tower) run once per query; any other model (the mean-position floor) runs whole
    once per unit on the cached crop.
    """

    def __init__(self, model: nn.Module, work: Plan, categories: dict, data: DataCfg, device: torch.device,
                 bank: EmbeddingBank | None, online_images: bool, batch_size: int, clock: _Clock, bar=None):
        self.model, self.work, self.categories, self.data, self.device = model, work, categories, data, device
        self.bank, self.batch_size, self.clock, self.bar = bank, batch_size, clock, bar
        self.core = getattr(model, "module", model)  # DDP: its forward (and collectives) is never needed
        self.split = callable(getattr(self.core, "encode_image", None)) and callable(getattr(self.core, "head", None))
        wants = bank is not None and _wants_image(model)
        self.image_table, self.online_table = wants and not online_images, wants and online_images
        q, k = len(work.queries), data.max_keypoints
        self.inverse, self.gt_xy = torch.zeros(q, 2, 3), torch.zeros(q, k, 2)  # (Q, 2, 3), (Q, K, 2)
        self.visible, self.norm = torch.zeros(q, k, dtype=torch.bool), torch.zeros(q)  # (Q, K), (Q,)
        self.ann_id, self.category_id = torch.zeros(q, dtype=torch.long), torch.zeros(q, dtype=torch.long)
        self.preds = torch.zeros(len(work.unit_query), k, 2)  # (U, K, 2) image pixels
        self.cache: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.left = np.bincount(work.unit_query, minlength=q)  # units still to run, per query
        self.adj: dict[int, torch.Tensor] = {}
        self.done = self.ready = 0  # units run; units whose query is encoded
        self.classes: PairClasses | None = None  # per-pair class prompts (run_protocol sets them)
        self.support_ann: dict[int, int] = {}  # sample index → annotation id

    def encode(self, batch: dict[str, torch.Tensor], start: int) -> None:
        """The image part of the queries at positions ``start ..`` (a collated :class:`QueryDataset` batch)."""
        n = len(batch["ann_id"])
        for name in ("inverse", "gt_xy", "norm", "ann_id", "category_id"):
            getattr(self, name)[start: start + n] = batch[name]
        self.visible[start: start + n] = batch["query_visible"]
        img = batch["img"].to(self.device, non_blocking=True)  # (B, 3, S, S)
        extra = {}
        if self.online_table:  # as preparer: the model's CLIP on the crop, outside autocast
            extra["img_emb"] = self.core.clip.encode_image(img)  # (B, C)
        if self.split:
            with autocast(self.device, precision_of(self.core)):
                image = self.core.encode_image(img)  # feat (B, d, h, w) [, img_emb (B, C)]
        else:
            image = {"img": img}
        for j in range(n):
            self.cache[start + j] = ({k: v[j] for k, v in image.items()}, {k: v[j] for k, v in extra.items()})
        self.ready = self.work.unit_range(0, start + n)[1]
        self.clock.lap("image")

    def heads(self, final: bool = False) -> None:
        """Run the waiting units in full batches (all of them when ``final``)."""
        while self.ready - self.done >= self.batch_size or (final and self.done < self.ready):
            u1 = min(self.done + self.batch_size, self.ready)
            self._head(self.done, u1)
            if self.bar is not None:
                self.bar.update(u1 - self.done)
            self.done = u1
        self.clock.lap("head")

    def _adjacency(self, category_id: int, category) -> torch.Tensor:
        if category_id not in self.adj:
            self.adj[category_id] = torch.from_numpy(adjacency(category.skeleton, self.data.max_keypoints))
        return self.adj[category_id]  # (K, K)

    def _head(self, u0: int, u1: int) -> None:
        work, categories = self.work, self.categories
        qpos = work.unit_query[u0:u1].tolist()
        cats = self.category_id[qpos]  # (B,)
        mask = torch.from_numpy(work.unit_mask[u0:u1])  # (B, K) the supports' visibility
        batch = {"kp_mask": mask, "support_weight": mask.float(), "category_id": cats, "ann_id": self.ann_id[qpos],
                 "adj": torch.stack([self._adjacency(c, categories[c]) for c in cats.tolist()])}  # adj (B, K, K)
        if self.bank is not None:
            batch = self.bank.fill(batch, self.data.max_keypoints, self.image_table,
                                   getattr(self.core, "needs_class_embedding", False))
            if self.classes is not None and "cls_emb" in batch:  # the pair's class prompt, not the category's
                supports = torch.tensor([self.support_ann[int(i)] for i in work.unit_support[u0:u1]])
                batch["cls_emb"] = self.classes.stack(batch["ann_id"], supports)  # (B, C)
        batch = to_device(batch, self.device)
        image = {k: torch.stack([self.cache[q][0][k] for q in qpos]) for k in self.cache[qpos[0]][0]}
        batch.update({k: torch.stack([self.cache[q][1][k] for q in qpos]) for k in self.cache[qpos[0]][1]})
        with autocast(self.device, precision_of(self.core)):
            out = self.core.head(image, batch) if self.split else self.model({**batch, **image})
        inverse = self.inverse[qpos].to(self.device)  # (B, 2, 3)
        self.preds[u0:u1] = to_image_pixels(out["points"][-1].float(), inverse, self.data.image_size).cpu()
        for q in qpos:
            self.left[q] -= 1
            if self.left[q] == 0:
                del self.cache[q]

    def score(self, acc: PCKAccumulator, keep: list | None) -> None:
        """Every pair, in order, with its unit's prediction and its own visibility and normaliser."""
        work, size = self.work, self.batch_size
        pair_query = work.pair_query
        for p0 in range(0, len(work.pairs), size):
            u, q = work.pair_unit[p0: p0 + size], pair_query[p0: p0 + size]
            visible = self.visible[q] & torch.from_numpy(work.pair_visible[p0: p0 + size])  # (B, K) query AND support
            batch = {"gt_xy": self.gt_xy[q], "visible": visible, "norm": self.norm[q], "ann_id": self.ann_id[q],
                     "category_id": self.category_id[q]}
            score(acc, self.preds[u], batch, keep)
            if keep is not None:
                for r, vis in zip(keep[len(keep) - len(u):], visible):
                    r["visible"] = vis
        self.clock.lap("score")


def _progress(progress: str | None, total: int):
    if progress is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=progress, unit="unit", file=sys.stderr, leave=False)


def run_protocol(model: nn.Module, subset, pairs: np.ndarray, data: DataCfg, device: torch.device, *,
                 load_image: Callable, batch_size: int, bank: EmbeddingBank | None = None,
                 online_images: bool = False, thresholds: tuple[float, ...] = THRESHOLDS, rank: int = 0,
                 world: int = 1, loader_workers: int = 0, records: bool = False, progress: str | None = None,
                 dedupe: bool = True, stats: dict[str, Any] | None = None, classes: PairClasses | None = None
                 ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """PCK of ``model`` on the (query, support) ``pairs`` of ``subset``, each unique input's work done once.

    Returns ``({"pck_0.05": ..., "pck_mean": ..., "count": n}, records)``, plus the keypoint-level PCK of the
    ``polysemous/`` and ``unambiguous/`` keypoints when a category of ``subset`` lists polysemous keypoints
    (:func:`capenext.metrics.polysemy_groups`); with ``records`` one dict per
    pair of this rank (``ann_id``, ``category_id`` of its query, ``pred`` (K, 2) image pixels, ``pck`` per
    threshold, ``visible`` (K,)) for pictures of the best and worst queries. ``progress``: a bar with that
    label on stderr. ``batch_size``: query crops per backbone forward, and units per head forward.
    ``dedupe=False``: the per-pair loop (:func:`per_pair_protocol`), the reference for the same numbers.
    ``stats``, when given, receives the counts of pairs, queries and units and the seconds of each stage.
    ``classes``: a class prompt per pair (:class:`PairClasses`) instead of the bank's per category.
    """
    if not dedupe:
        return per_pair_protocol(model, subset, pairs, data, device, load_image=load_image, batch_size=batch_size,
                                 bank=bank, online_images=online_images, thresholds=thresholds, rank=rank,
                                 world=world, loader_workers=loader_workers, records=records, progress=progress,
                                 classes=classes)
    model.eval()
    work = plan(subset, pairs, data, rank, world, key=lambda q, s: texts_key(q, s, classes))
    clock = _Clock(device, stats is not None)
    bar = _progress(progress, len(work.unit_query))
    runner = _Cached(model, work, subset.categories, data, device, bank, online_images, batch_size, clock, bar)
    runner.classes, runner.support_ann = classes, {i: s.ann_id for i, s in enumerate(subset.samples)}
    loader = torch.utils.data.DataLoader(QueryDataset(subset, work.queries, data, load_image), batch_size=batch_size,
                                         collate_fn=collate, num_workers=loader_workers)
    with torch.no_grad():
        start = 0
        for batch in loader:
            clock.lap("load")
            runner.encode(batch, start)
            start += len(batch["ann_id"])
            runner.heads()
        runner.heads(final=True)
    if bar is not None:
        bar.close()
    acc = PCKAccumulator(thresholds, polysemy_groups(subset.categories.values()))
    kept: list[dict[str, Any]] | None = [] if records else None
    runner.score(acc, kept)
    acc.all_reduce(device)
    if stats is not None:
        stats.update(pairs=len(work.pairs), queries=len(work.queries), units=len(work.unit_query),
                     seconds=dict(clock.seconds))
    return acc.result(), kept or []


def per_pair_protocol(model: nn.Module, subset, pairs: np.ndarray, data: DataCfg, device: torch.device, *,
                      load_image: Callable, batch_size: int, bank: EmbeddingBank | None = None,
                      online_images: bool = False, thresholds: tuple[float, ...] = THRESHOLDS, rank: int = 0,
                      world: int = 1, loader_workers: int = 0, records: bool = False, progress: str | None = None,
                      classes: PairClasses | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The protocol as a per-pair loop: one :class:`PairDataset` item (decode and crop of the query) and one
    whole forward per pair, ``batch_size`` pairs per forward, a strided share of the pairs per rank. What
    :func:`run_protocol` computes, at the cost of every pair; kept as the reference its numbers are
    checked against. Arguments and result as :func:`run_protocol`."""
    mine = np.arange(rank, len(pairs), world)
    ds = PairDataset(subset, pairs, data, load_image=load_image, positions=mine)  # decoded as in training
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=loader_workers)
    fill = preparer(model, bank, data, device, online_images)

    def prepare(batch: dict) -> dict:
        batch = fill(batch)
        if classes is not None and "cls_emb" in batch:
            batch["cls_emb"] = classes.stack(batch["ann_id"], batch["support_ann_id"])  # (B, C)
        return batch

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
                       thresholds=thresholds, keep=kept, groups=polysemy_groups(subset.categories.values()))
    if kept is None:
        return metrics, []
    for r, vis in zip(kept, torch.cat(visible) if visible else []):
        r["visible"] = vis
    return metrics, kept
