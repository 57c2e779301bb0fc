"""Pairs and episodes.

Text-only CAPE: a pair is ``(query, support)`` of one category; the support contributes its category's
keypoint texts, its skeleton and its visibility mask, never its image.

* Training: class-balanced pairs, redrawn every epoch from ``(seed, epoch)``: every category gets as many
  pairs as the largest category has instances; each of its instances is a query about equally often, and
  the support is another instance of the category (the same one only for a single-instance category).
* Evaluation: per category ``episodes`` episodes; each draws ``1 + queries`` distinct instances with a
  seeded generator, the first is the support and the rest are queries (fewer when the category is small).
  Test uses 200 × 15, validation 100 × 15, with fixed seeds.
* The reference's test episodes (``DataCfg.episodes="reference"``): the (support, query) annotation ids
  that mmpose's ``TestPoseDataset.make_paired_samples`` draws from the same annotation file
  (:func:`reference_order`, :func:`reference_episodes`), so a published checkpoint is measured on the
  very queries the paper's numbers come from.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

REFERENCE_SEED = 1  # make_paired_samples calls random.seed(1) (and np.random.seed(0), which draws nothing)


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(s) for s in seed]))


def training_pairs(by_category: dict[int, list[int]], seed: int, epoch: int) -> np.ndarray:
    """Class-balanced ``(query, support)`` index pairs for one epoch, shuffled: (P, 2) int64."""
    groups = {c: idx for c, idx in sorted(by_category.items()) if idx}
    if not groups:
        return np.zeros((0, 2), dtype=np.int64)
    n = max(len(idx) for idx in groups.values())
    rng = _rng(seed, epoch)
    pairs = []
    for idx in groups.values():
        idx = np.asarray(idx, dtype=np.int64)
        reps = -(-n // len(idx))
        queries = np.concatenate([rng.permutation(idx) for _ in range(reps)])[:n]
        if len(idx) == 1:
            supports = queries.copy()
        else:
            # a random other instance: shift the query's position by 1..len-1 (mod len)
            pos = np.searchsorted(np.sort(idx), queries)
            shift = rng.integers(1, len(idx), size=n)
            supports = np.sort(idx)[(pos + shift) % len(idx)]
        pairs.append(np.stack([queries, supports], axis=1))
    out = np.concatenate(pairs)
    return out[rng.permutation(len(out))]


def episodes(
    by_category: dict[int, list[int]], num_episodes: int, queries: int, seed: int
) -> np.ndarray:
    """Evaluation ``(query, support)`` pairs, category by category, episode by episode: (P, 2) int64.

    The generator of each category is seeded by ``(seed, category id)``, so a category's episodes do not
    depend on which other categories are present.
    """
    pairs = []
    for cat, idx in sorted(by_category.items()):
        if len(idx) < 2:
            continue  # one instance cannot be both support and query
        rng = _rng(seed, cat)
        idx = np.asarray(idx, dtype=np.int64)
        q = min(queries, len(idx) - 1)
        for _ in range(num_episodes):
            chosen = rng.choice(idx, size=q + 1, replace=False)
            pairs.append(np.stack([chosen[1:], np.full(q, chosen[0])], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def reference_order(data: dict[str, Any]) -> tuple[list[int], dict[int, list[int]]]:
    """The reference's ``valid_class_ids`` and ``cat2obj`` of an annotation file, as annotation ids.

    The reference reads the file with the COCO API and keeps, per category, its annotations in the order
    it meets them: images in the file's order (a repeated image id keeps its first place), each image's
    annotations in the file's order (by id, the last record of an id), without crowd annotations (no
    ``iscrowd`` counts as not crowd, as xtcocotools sets it), after its cleaning (a bbox is kept when
    ``area`` is absent or positive and the sanitised box is not empty; then annotations without
    keypoints, with all-zero keypoints or ``num_keypoints == 0`` are dropped; an empty keypoint list,
    where the reference would stop, is dropped too). The classes are the file's categories in its order,
    each looked up by its name (a repeated name gives the last id of that name, as the reference's
    name → id map).

    Args:
        data: the parsed ``mp100_split{K}_test.json``.

    Returns:
        ``(class ids in the reference's order, category id → annotation ids in the reference's order)``.
    """
    cats = data["categories"]
    ids_by_name = dict(zip((c["name"] for c in cats), (c["id"] for c in cats)))
    classes = [ids_by_name[c["name"]] for c in cats]
    images: dict[Any, dict] = {}
    for im in data["images"]:
        images[im["id"]] = im
    anns: dict[Any, dict] = {}
    by_image: dict[Any, list[Any]] = {}
    for a in data["annotations"]:
        anns[a["id"]] = a
        by_image.setdefault(a["image_id"], []).append(a["id"])
    cat2obj: dict[int, list[int]] = {c["id"]: [] for c in cats}
    for image_id, im in images.items():
        for ann_id in by_image.get(image_id, []):
            a = anns[ann_id]
            if a.get("iscrowd", 0) != 0 or "bbox" not in a:
                continue
            x, y, w, h = a["bbox"]
            x1, y1 = max(0, x), max(0, y)
            x2 = min(im["width"] - 1, x1 + max(0, w - 1))
            y2 = min(im["height"] - 1, y1 + max(0, h - 1))
            if not (("area" not in a or a["area"] > 0) and x2 > x1 and y2 > y1):
                continue
            kps = a.get("keypoints")
            if not kps or max(kps) == 0 or a.get("num_keypoints", 1) == 0:
                continue
            if a["category_id"] not in cat2obj:
                raise ValueError(f"annotation {ann_id}: category_id {a['category_id']!r} is not in 'categories'")
            cat2obj[a["category_id"]].append(ann_id)
    return classes, cat2obj


def reference_episodes(classes: list[int], cat2obj: dict[int, list[int]], num_episodes: int, queries: int,
                       shots: int = 1, names: dict[int, str] | None = None) -> list[tuple[list[int], int]]:
    """The reference's test episodes: ``[(support annotation ids, query annotation id), ...]`` in its order.

    Per class in ``classes`` order, ``num_episodes`` times, ``shots + queries`` distinct annotations are
    drawn with Python's ``random.sample`` from a generator seeded with 1 once for all classes; the first
    ``shots`` are the support, each of the others a query. A class with fewer annotations is an error, as
    the reference's ``random.sample`` fails there.
    """
    rng = random.Random(REFERENCE_SEED)  # the same stream as random.seed(1), without touching the global one
    out = []
    for cls in classes:
        population = cat2obj[cls]
        if len(population) < shots + queries:
            label = f"{cls} ({names[cls]})" if names and cls in names else str(cls)
            raise ValueError(f"category {label} has {len(population)} annotations after the reference's cleaning; "
                             f"its episodes draw {shots} + {queries} (the reference's random.sample fails here)")
        for _ in range(num_episodes):
            drawn = rng.sample(population, shots + queries)
            out += [(drawn[:shots], q) for q in drawn[shots:]]
    return out


def reference_pairs(data: dict[str, Any], ann_index: dict[int, int], num_episodes: int, queries: int,
                    where: str = "the annotation file") -> np.ndarray:
    """:func:`reference_episodes` of an annotation file as ``(query, support)`` index pairs (P, 2) int64,
    indices by ``ann_index`` (annotation id → sample index); an annotation the samples lack is one line."""
    classes, cat2obj = reference_order(data)
    names = {c["id"]: c["name"] for c in data["categories"]}
    pairs = []
    for support, query in reference_episodes(classes, cat2obj, num_episodes, queries, names=names):
        for ann in (query, support[0]):
            if ann not in ann_index:
                raise ValueError(f"annotation {ann} of {where}, drawn by the reference's episodes, is not among the "
                                 "samples (cleaned or skipped differently: see pipelines.validate)")
        pairs.append((ann_index[query], ann_index[support[0]]))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
