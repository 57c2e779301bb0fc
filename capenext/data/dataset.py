"""From a ``(query, support)`` pair to the tensors the model and the loss take.

:func:`make_item` is shared by every image source (files here, webdataset shards in ``pipelines``): it
crops the query, builds the targets and the support mask in the 100 padded slots and keeps what
evaluation needs to map predictions back to image pixels. Augmentation draws from a generator seeded by
``(seed, epoch, index)``, so an item is the same whichever worker loads it.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from capenext.config import DataCfg
from capenext.data.mp100 import Category, Sample, Subset
from capenext.data.transforms import (Crop, affine_matrix, apply_affine, box_center_scale, crop, decode_for_crop,
                                      decode_image, heatmap_targets, random_scale_rotation, target_weights)


def adjacency(skeleton: tuple[tuple[int, int], ...], slots: int) -> np.ndarray:
    """(slots, slots) float32 0/1 matrix with ``A[a, b] = 1`` per skeleton edge (the model symmetrises)."""
    adj = np.zeros((slots, slots), dtype=np.float32)
    for a, b in skeleton:
        adj[a, b] = 1.0
    return adj


def crop_query(image: np.ndarray | bytes, query: Sample, cfg: DataCfg, scale: float = 1.0, rot: float = 0.0) -> Crop:
    """The query's top-down crop (scaled by ``scale``, rotated by ``rot`` degrees; 1, 0 at evaluation).

    ``image`` is decoded (RGB uint8) or encoded (the file's bytes): encoded, it is decoded here, and with
    ``cfg.reduced_decode`` a JPEG is decoded only at the resolution the crop needs
    (:func:`capenext.data.transforms.decode_for_crop`)."""
    reduction = 1
    if not isinstance(image, np.ndarray):
        where = f"the image of annotation {query.ann_id} ({query.file_name})"
        if cfg.reduced_decode:
            step = box_center_scale(query.bbox, cfg.bbox_scale)[1] * scale / cfg.image_size
            image, reduction = decode_for_crop(bytes(image), where, query.width, query.height, step)
        else:
            image = decode_image(image, where)
    return crop(image, query.bbox, cfg.image_size, cfg.bbox_scale, scale, rot, reduction)


def support_mask(support: Sample, cfg: DataCfg, scale: float = 1.0, rot: float = 0.0) -> np.ndarray:
    """The support mask (K,) float32 in {0, 1}, as the reference computes it in training and at test: the
    support's keypoints go through its own crop (its box, ``scale``/``rot``: the augmentation's draw in
    training, none at test) and a visible keypoint whose Gaussian falls wholly off the heatmap gets weight 0
    (:func:`capenext.data.transforms.target_weights`; the reference's ``top_down_transform.py:244-247``). Its
    text is then zeroed and its slot masked in the model's input; it is still scored where the query and the
    support annotation both mark it visible."""
    size = cfg.image_size
    center, side = box_center_scale(support.bbox, cfg.bbox_scale)
    m = affine_matrix(center, side * scale, rot, size)
    points = apply_affine(support.keypoints[:, :2].astype(np.float64), m)
    return target_weights(points, support.visible, size, cfg.heatmap_size, cfg.sigma)


def make_item(
    image: np.ndarray | bytes,
    query: Sample,
    support: Sample,
    category: Category,
    cfg: DataCfg,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """One training/evaluation item. ``rng`` given (training) → the reference's random scale and rotation,
    one draw for the query crop, then one for the support's.

    ``image`` is the query's image, decoded (RGB uint8) or encoded (the file's bytes): encoded, it is
    decoded here, and with ``cfg.reduced_decode`` a JPEG is decoded only at the resolution the crop needs
    (:func:`capenext.data.transforms.decode_for_crop`).

    The support image is never decoded (text-only CAPE needs only its keypoints), but in training its
    keypoints go through the crop the reference would make of it (its own bbox, its own draw), and its
    target weight is the reference's (:func:`support_mask`): the support mask (the reference's ``mask_s``),
    which masks the keypoint text embeddings and the loss. At evaluation the same rule runs on the support's
    un-augmented test crop, as the reference's test pipeline does.

    Keys (K = ``cfg.max_keypoints`` slots, k = the category's keypoints):
        img (3, S, S); heatmap (K, Hh, Hh); points (K, 2) query keypoints in [0, 1] crop coordinates;
        query_weight (K,) the query's target weight (visible, and its Gaussian not wholly off the heatmap
        after the query's warp); support_weight (K,) the support mask (:func:`support_mask`: the support's
        target weight after its own warp, augmented in training, the test crop at evaluation); kp_mask (K,)
        bool ``support_weight > 0``; support_masked () int64, visible support keypoints the rule zeroed;
        adj (K, K); gt_xy (K, 2) query keypoints in image pixels; visible (K,) bool query AND support visible (annotation visibility, for PCK); norm () max(w, h) of the cleaned query bbox;
        inverse (2, 3) crop → image; category_id, ann_id, support_ann_id, num_keypoints.
    """
    slots, size = cfg.max_keypoints, cfg.image_size
    k = category.num_keypoints
    if k > slots:
        raise ValueError(f"category {category.id} has {k} keypoints, more than the {slots} slots")

    def draw() -> tuple[float, float]:
        if rng is None:
            return 1.0, 0.0
        return random_scale_rotation(rng, cfg.scale_sigma, cfg.scale_clip, cfg.rot_sigma, cfg.rot_prob)

    scale, rot = draw()
    c = crop_query(image, query, cfg, scale, rot)

    q_vis = query.visible
    s_vis = support.visible
    pts = apply_affine(query.keypoints[:, :2].astype(np.float64), c.matrix)
    heat, q_weight = heatmap_targets(pts, q_vis, size, cfg.heatmap_size, cfg.sigma, slots)
    s_weight = support_mask(support, cfg, *draw())  # training: the support's own draw, after the query's

    def pad(a: np.ndarray, *tail: int, dtype=np.float32) -> np.ndarray:
        out = np.zeros((slots, *tail), dtype=dtype)
        out[:k] = a
        return out

    return {
        "img": torch.from_numpy(c.image),
        "heatmap": torch.from_numpy(heat),
        "points": torch.from_numpy(pad(pts / size, 2)),
        "query_weight": torch.from_numpy(pad(q_weight)),
        "support_weight": torch.from_numpy(pad(s_weight)),
        "kp_mask": torch.from_numpy(pad(s_weight > 0, dtype=bool)),
        "support_masked": torch.tensor(int(s_vis.sum() - (s_weight > 0).sum())),
        "adj": torch.from_numpy(adjacency(category.skeleton, slots)),
        "gt_xy": torch.from_numpy(pad(query.keypoints[:, :2], 2)),
        "visible": torch.from_numpy(pad(q_vis & s_vis, dtype=bool)),
        "norm": torch.tensor(max(query.bbox[2], query.bbox[3]), dtype=torch.float32),
        "inverse": torch.from_numpy(c.inverse.astype(np.float32)),
        "category_id": torch.tensor(category.id),
        "ann_id": torch.tensor(query.ann_id),
        "support_ann_id": torch.tensor(support.ann_id),
        "num_keypoints": torch.tensor(k),
    }


def collate(items: list[dict]) -> dict:
    """Stack the items of :func:`make_item` (all tensors of one shape per key) into a batch."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class PairDataset(Dataset):
    """Items of ``(query, support)`` index pairs over one :class:`Subset`, images read from files.

    ``train=True`` applies the augmentation with a generator seeded by ``(seed, epoch, index)``, where
    index is the pair's position in the *global* ``pairs``; ``positions`` selects this worker's share of
    them, so an item is identical whichever rank (and however many ranks) load it. Call
    :meth:`set_epoch` (and pass the epoch's pairs and share) to move on. ``load_image(sample)`` returns
    the query's image decoded, or its encoded bytes (which :func:`make_item` decodes, reduced when
    ``cfg.reduced_decode``); it defaults to the bytes of ``subset.image_path(sample)``.
    """

    def __init__(
        self,
        subset: Subset,
        pairs: np.ndarray,
        cfg: DataCfg,
        train: bool = False,
        seed: int = 0,
        load_image: Callable[[Sample], np.ndarray] | None = None,
        positions: np.ndarray | None = None,
    ):
        self.subset, self.cfg, self.train, self.seed = subset, cfg, train, seed
        self.epoch = 0
        self.set_epoch(0, pairs, positions)
        self.load_image = load_image or (lambda s: subset.image_path(s).read_bytes())

    def set_epoch(self, epoch: int, pairs: np.ndarray | None = None, positions: np.ndarray | None = None) -> None:
        self.epoch = epoch
        if pairs is not None:
            self.pairs = pairs
            self.positions = np.arange(len(pairs)) if positions is None else np.asarray(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = int(self.positions[i])
        qi, si = (int(v) for v in self.pairs[g])
        query, support = self.subset.samples[qi], self.subset.samples[si]
        rng = np.random.default_rng([self.seed, self.epoch, g]) if self.train else None
        image = self.load_image(query)
        return make_item(image, query, support, self.subset.categories[query.category_id], self.cfg, rng)


def query_item(image: np.ndarray | bytes, query: Sample, cfg: DataCfg) -> dict[str, Any]:
    """What the test protocol keeps of a query, whatever its support: the un-augmented crop and what maps
    its predictions back and scores them. The same numbers as :func:`make_item`'s item of any pair with
    this query at evaluation (``rng`` None), for the keys both have.

    Keys (K = ``cfg.max_keypoints`` slots): img (3, S, S); inverse (2, 3) crop → image; gt_xy (K, 2) query
    keypoints in image pixels; query_visible (K,) bool; norm () max(w, h) of the cleaned query bbox;
    ann_id; category_id.
    """
    slots, k = cfg.max_keypoints, len(query.visible)
    if k > slots:
        raise ValueError(f"category {query.category_id} has {k} keypoints, more than the {slots} slots")
    c = crop_query(image, query, cfg)
    gt_xy = np.zeros((slots, 2), dtype=np.float32)
    gt_xy[:k] = query.keypoints[:, :2]
    visible = np.zeros(slots, dtype=bool)
    visible[:k] = query.visible
    return {
        "img": torch.from_numpy(c.image),
        "inverse": torch.from_numpy(c.inverse.astype(np.float32)),
        "gt_xy": torch.from_numpy(gt_xy),
        "query_visible": torch.from_numpy(visible),
        "norm": torch.tensor(max(query.bbox[2], query.bbox[3]), dtype=torch.float32),
        "ann_id": torch.tensor(query.ann_id),
        "category_id": torch.tensor(query.category_id),
    }


class QueryDataset(Dataset):
    """:func:`query_item` of the samples ``indices`` of ``subset`` (the unique queries of a test
    protocol), images from ``load_image(sample)`` as in :class:`PairDataset` (default: the file's bytes)."""

    def __init__(self, subset: Subset, indices: np.ndarray, cfg: DataCfg,
                 load_image: Callable[[Sample], np.ndarray | bytes] | None = None):
        self.subset, self.indices, self.cfg = subset, np.asarray(indices, dtype=np.int64), cfg
        self.load_image = load_image or (lambda s: subset.image_path(s).read_bytes())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        query = self.subset.samples[int(self.indices[i])]
        return query_item(self.load_image(query), query, self.cfg)
