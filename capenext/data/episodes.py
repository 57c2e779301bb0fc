"""Pairs and episodes.

Text-only CAPE: a pair is ``(query, support)`` of one category; the support contributes its category's
keypoint texts, its skeleton and its visibility mask, never its image.

* Training: class-balanced pairs, redrawn every epoch from ``(seed, epoch)``: every category gets as many
  pairs as the largest category has instances; each of its instances is a query about equally often, and
  the support is another instance of the category (the same one only for a single-instance category).
* Evaluation: per category ``episodes`` episodes; each draws ``1 + queries`` distinct instances with a
  seeded generator, the first is the support and the rest are queries (fewer when the category is small).
  Test uses 200 × 15, validation 100 × 15, with fixed seeds.
"""

from __future__ import annotations

import numpy as np


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
