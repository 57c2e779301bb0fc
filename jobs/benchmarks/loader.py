"""Loader benchmark: ``python -m jobs.benchmark loader``.

Measures loaders in images per second per CPU core (one process, OpenCV and torch on one thread, so
per-core figures come from the process CPU time), over the same ``(query, support)`` pairs, each with its
random scale and rotation:

* ``reference_loader``: what the reference's data pipeline does per image, written from mmpose 0.29's
  documented behaviour: ``LoadImageFromFile`` (the file's bytes, ``cv2.imdecode(IMREAD_COLOR)``, BGR →
  RGB), ``TopDownGetRandomScaleRotation``, ``TopDownAffine`` (``get_affine_transform``, three float32
  points, ``cv2.warpAffine`` bilinear at full resolution; joints through the same matrix), ``ToTensor`` +
  ``NormalizeTensor``, ``TopDownGenerateTarget`` (MSRA, σ = 1, the 100 padded joints), from ``_get_db``
  records built once and deep-copied per item. One image per item; ``reference_loader_with_support_image``
  also runs it on the support image first, as the reference's few-shot dataset does (it then drops the
  support's pixels, which ours never decodes);
* ``shards`` and ``shards_reduced_decode``: our training loader, :class:`capenext.data.shards.ShardIndex`
  (seek + read of the stored original bytes) into ``PairDataset`` → ``make_item``, with
  ``DataCfg.reduced_decode`` off (the reference's full decode) and on (a JPEG decoded in the DCT domain
  at 1/2, 1/4 or 1/8 when its crop allows); the reduced items are checked to carry the same targets, and
  the mean absolute difference of their normalised crops from the full decode's is reported;
* ``per_file``: a per-file loader, ``pycocotools.coco.COCO`` on the annotation file plus the file read per
  item, the query rebuilt from the COCO record (``clean_bbox``); its items are checked equal to the
  shards' (full decode), so both do the same work;
* ``shards_margin_crop``: an alternative storage the shard job could use, a margin crop (the square of
  ``margin × max(w, h)`` around the bbox centre, resized so its side is at most ``margin × image_size``,
  JPEG quality 95) built in memory from the same bytes; keypoints are mapped into it and the outputs mapped
  back, so only the pixels differ (reported as the mean absolute difference of the normalised crop).

``make_item_only`` times the common part on pre-decoded images. ``--mp100-sized`` generates the synthetic
set with MP-100's camera-photo sizes (long side 600-1600 px) when no ``--data-root`` is given. Prints
JSON; the ratios are measured in one run. ``--quick`` (the tests' smoke run, best with ``--data-root`` and
``--shards`` already made): 16 items and one timed round per loader, every loader and check still run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capenext.config import DataCfg
from capenext.data.dataset import PairDataset, make_item
from capenext.data.episodes import training_pairs
from capenext.data.mp100 import Category, Sample, annotation_path, load_split
from capenext.data.shards import ShardIndex
from capenext.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    clean_bbox,
    decode_image,
    random_scale_rotation,
    reduction_for,
)
from capenext.options import positive
from jobs.benchmarks import machine
from jobs.benchmarks import sizes as bench_sizes

GOAL = 2.0  # the target: our loader at least 2x the reference-style loader
FULL = {"samples": 400, "rounds": 3}
QUICK = {"samples": 16, "rounds": 1}  # --quick: every loader and check, a few items


# ---------------------------------------------------------------- the per-file baseline


class CocoFileLoader:
    """What a per-file CAPE loader does: a COCO index of the annotation file, one image file per item."""

    def __init__(self, ann_file: Path, image_root: Path, categories: dict[int, Category], cfg: DataCfg):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # COCO prints "loading annotations ..."
            self.coco = COCO(str(ann_file))
        self.image_root, self.categories, self.cfg = image_root, categories, cfg

    def sample(self, ann_id: int) -> Sample:
        ann = self.coco.loadAnns([ann_id])[0]
        im = self.coco.loadImgs([ann["image_id"]])[0]
        kp = np.asarray(ann["keypoints"], dtype=np.float32).reshape(-1, 3)
        kp[:, 2] = np.minimum(1.0, kp[:, 2])
        box = clean_bbox(ann["bbox"], im["width"], im["height"])
        return Sample(ann_id, im["id"], ann["category_id"], im["file_name"], im["width"], im["height"], box, kp)

    def item(self, query_id: int, support_id: int, rng: np.random.Generator) -> dict[str, Any]:
        query, support = self.sample(query_id), self.sample(support_id)
        data = (self.image_root / query.file_name).read_bytes()
        return make_item(data, query, support, self.categories[query.category_id], self.cfg, rng)


# ---------------------------------------------------------------- the reference-style loader


def get_affine_transform(center: np.ndarray, scale: np.ndarray, rot: float, output_size: np.ndarray) -> np.ndarray:
    """mmpose 0.29's ``get_affine_transform`` (no shift, not inverted): three float32 point pairs."""
    import cv2

    src_w = scale[0] * 200.0
    rot_rad = np.pi * rot / 180
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    src_dir = np.array([-src_w * -0.5 * sn, src_w * -0.5 * cs])  # rotate_point([0, -w/2], rot)
    dst_w, dst_h = output_size
    dst_dir = np.array([0.0, dst_w * -0.5])

    def third(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b
        return b + np.array([-d[1], d[0]], dtype=np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    src[2] = third(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def msra_target(joints: np.ndarray, visible: np.ndarray, image_size: np.ndarray, heatmap_size: np.ndarray,
                sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """mmpose 0.29's ``TopDownGenerateTarget._msra_generate_target`` (not unbiased): a (6σ+1)² Gaussian
    patch pasted at the rounded joint, weight zero when the patch misses the heatmap."""
    num_joints = len(joints)
    w, h = heatmap_size
    target_weight = np.zeros((num_joints, 1), dtype=np.float32)
    target = np.zeros((num_joints, h, w), dtype=np.float32)
    tmp_size = sigma * 3
    for j in range(num_joints):
        target_weight[j] = visible[j, 0]
        feat_stride = image_size / heatmap_size
        mu_x = int(joints[j][0] / feat_stride[0] + 0.5)
        mu_y = int(joints[j][1] / feat_stride[1] + 0.5)
        ul = [int(mu_x - tmp_size), int(mu_y - tmp_size)]
        br = [int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1)]
        if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
            target_weight[j] = 0
        if target_weight[j] > 0.5:
            size = 2 * tmp_size + 1
            x = np.arange(0, size, 1, np.float32)
            y = x[:, None]
            x0 = y0 = size // 2
            g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
            g_x = max(0, -ul[0]), min(br[0], w) - ul[0]
            g_y = max(0, -ul[1]), min(br[1], h) - ul[1]
            img_x = max(0, ul[0]), min(br[0], w)
            img_y = max(0, ul[1]), min(br[1], h)
            target[j][img_y[0]:img_y[1], img_x[0]:img_x[1]] = g[int(g_y[0]):int(g_y[1]), int(g_x[0]):int(g_x[1])]
    return target, target_weight


class ReferenceStyleLoader:
    """One image through the reference's training pipeline per item (see the module docstring)."""

    def __init__(self, image_root: Path, samples: dict[int, Sample], cfg: DataCfg, max_joints: int = 100):
        self.image_root, self.cfg = image_root, cfg
        self.image_size = np.array([cfg.image_size, cfg.image_size])
        self.heatmap_size = np.array([cfg.heatmap_size, cfg.heatmap_size])
        self.mean = torch_tensor(IMAGENET_MEAN)
        self.std = torch_tensor(IMAGENET_STD)
        self.db = {a: self._record(s, max_joints) for a, s in samples.items()}

    def _record(self, s: Sample, max_joints: int) -> dict[str, Any]:
        """A ``_get_db`` entry: ``_xywh2cs`` (square, × 1.25, pixel std 200) and joints padded to 100."""
        x, y, w, h = s.bbox
        center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
        w, h = max(w, h), max(w, h)  # aspect ratio 1
        joints = np.zeros((max_joints, 3), dtype=np.float32)
        visible = np.zeros((max_joints, 3), dtype=np.float32)
        joints[: len(s.keypoints), :2] = s.keypoints[:, :2]
        visible[: len(s.keypoints), :2] = s.keypoints[:, 2:3]
        return {"image_file": str(self.image_root / s.file_name), "center": center,
                "scale": np.array([w / 200.0, h / 200.0], dtype=np.float32) * 1.25, "rotation": 0,
                "joints_3d": joints, "joints_3d_visible": visible}

    def item(self, ann_id: int, rng: np.random.Generator) -> dict[str, Any]:
        import cv2
        import torch

        r = copy.deepcopy(self.db[ann_id])
        with open(r["image_file"], "rb") as f:  # LoadImageFromFile
            img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        cfg = self.cfg  # TopDownGetRandomScaleRotation
        s_factor = np.clip(rng.normal() * cfg.scale_sigma + 1, 1 - cfg.scale_clip, 1 + cfg.scale_clip)
        r_factor = np.clip(rng.normal() * cfg.rot_sigma, -cfg.rot_sigma * 2, cfg.rot_sigma * 2)
        rot = r_factor if rng.random() <= cfg.rot_prob else 0
        scale = r["scale"] * s_factor
        trans = get_affine_transform(r["center"], scale, rot, self.image_size)  # TopDownAffine
        size = (int(self.image_size[0]), int(self.image_size[1]))
        img = cv2.warpAffine(img, trans, size, flags=cv2.INTER_LINEAR)
        joints, visible = r["joints_3d"], r["joints_3d_visible"]
        for i in range(len(joints)):
            if visible[i, 0] > 0.0:
                joints[i, 0:2] = (trans @ np.array([joints[i, 0], joints[i, 1], 1.0]))[:2]
        tensor = torch.from_numpy(img.transpose((2, 0, 1))).contiguous().to(torch.float32).div(255)  # ToTensor
        tensor.sub_(self.mean[:, None, None]).div_(self.std[:, None, None])  # NormalizeTensor
        target, target_weight = msra_target(joints, visible, self.image_size, self.heatmap_size, cfg.sigma)
        return {"img": tensor, "target": target, "target_weight": target_weight, "joints_3d": joints}


def torch_tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


# ---------------------------------------------------------------- the margin-crop alternative


def margin_crop(image: np.ndarray, sample: Sample, margin: float,
                max_side: int) -> tuple[bytes, float, np.ndarray]:
    """JPEG of the square ``margin × max(w, h)`` around the bbox centre, side ≤ ``max_side``.

    Returns ``(bytes, s, origin)``: a point ``p`` of the image is at ``s * (p - origin)`` in the crop.
    """
    import cv2

    x, y, w, h = sample.bbox
    side = margin * max(w, h)
    s = min(1.0, max_side / side)
    origin = np.array([x + w / 2 - side / 2, y + h / 2 - side / 2])
    m = np.array([[s, 0, -s * origin[0]], [0, s, -s * origin[1]]])
    n = int(np.ceil(side * s))
    crop = cv2.warpAffine(image, m, (n, n), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    ok, data = cv2.imencode(".jpg", crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes(), s, origin


def item_from_margin_crop(data: bytes, s: float, origin: np.ndarray, query: Sample, support: Sample,
                          category: Category, cfg: DataCfg, rng: np.random.Generator) -> dict[str, Any]:
    """``make_item`` on a margin crop: the query is mapped into it, the outputs mapped back to the image."""
    import torch

    x, y, w, h = query.bbox
    kp = query.keypoints.copy()
    kp[:, :2] = s * (kp[:, :2] - origin)
    moved = Sample(query.ann_id, query.image_id, query.category_id, query.file_name, query.width, query.height,
                   (s * (x - origin[0]), s * (y - origin[1]), s * w, s * h), kp)
    item = make_item(decode_image(data), moved, support, category, cfg, rng)
    back = np.array([[1 / s, 0, origin[0]], [0, 1 / s, origin[1]], [0, 0, 1]])  # crop → image
    inv = np.vstack([item["inverse"].numpy().astype(np.float64), [0, 0, 1]])
    item["inverse"] = torch.from_numpy((back @ inv)[:2].astype(np.float32))
    item["gt_xy"][: category.num_keypoints] = torch.from_numpy(query.keypoints[:, :2])
    item["norm"] = torch.tensor(max(query.bbox[2], query.bbox[3]), dtype=torch.float32)
    return item


# ---------------------------------------------------------------- timing


def _time_rounds(loaders: dict[str, Callable[[int], Any]], n: int, rounds: int) -> dict[str, dict[str, float]]:
    """Each loader over items ``0..n-1``, ``rounds`` times, interleaved; the best round of each counts
    (other processes on the machine only ever slow a round down)."""
    best: dict[str, tuple[float, float]] = {}
    for name, fn in loaders.items():  # warm-up
        for i in range(min(10, n)):
            fn(i)
    for _ in range(rounds):
        for name, fn in loaders.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(n):
                fn(i)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            best[name] = min(best.get(name, (cpu, wall)), (cpu, wall))
    return {name: {"img_s_per_core": round(n / cpu, 1), "img_s_wall": round(n / wall, 1),
                   "ms_per_img": round(1000 * cpu / n, 3)} for name, (cpu, wall) in best.items()}


@contextlib.contextmanager
def _one_thread():
    import cv2
    import torch

    cv, th = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(cv)
        torch.set_num_threads(th)


@dataclass
class Loaders:
    """The loaders of the module docstring over the same items: item ``i`` of each is the pair
    ``ann[i] = (query, support)`` (annotation ids) with ``PairDataset``'s random draws for item ``i``."""

    cfg: DataCfg
    seed: int
    ann: np.ndarray  # (items, 2) annotation ids
    index: ShardIndex
    by_id: dict[int, Sample]  # the subset's samples, from the shards
    categories: dict[int, Category]
    shards: PairDataset  # full decode
    reduced: PairDataset  # DataCfg.reduced_decode
    coco: CocoFileLoader
    reference: ReferenceStyleLoader
    setup_s: dict[str, float]

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0, i])  # PairDataset's generator for item i, epoch 0

    def per_file(self, i: int) -> dict[str, Any]:
        return self.coco.item(int(self.ann[i, 0]), int(self.ann[i, 1]), self.rng(i))

    def reference_item(self, i: int) -> dict[str, Any]:
        return self.reference.item(int(self.ann[i, 0]), self.rng(i))

    def reference_pair(self, i: int) -> dict[str, Any]:
        """The support's pipeline first, as the reference's dataset does."""
        r = self.rng(i)
        self.reference.item(int(self.ann[i, 1]), r)
        return self.reference.item(int(self.ann[i, 0]), r)


def build_loaders(data_root: Path, shards: Path, samples: int, split: int, subset: str, cfg: DataCfg,
                  seed: int) -> Loaders:
    """Every loader over ``samples`` training pairs of ``split``/``subset`` (repeated when the subset is
    small), with the set-up times of the COCO and shard indexes."""
    from dataclasses import replace

    full_cfg, reduced_cfg = replace(cfg, reduced_decode=False), replace(cfg, reduced_decode=True)
    files = load_split(data_root, split, subset)
    t0 = time.perf_counter()
    index = ShardIndex(shards)
    index_s = time.perf_counter() - t0
    from_shards = index.subset(split, subset)
    t0 = time.perf_counter()
    coco = CocoFileLoader(annotation_path(data_root, split, subset), data_root / "images", files.categories,
                          full_cfg)
    coco_s = time.perf_counter() - t0

    pairs = np.resize(training_pairs(files.by_category(), seed, 0), (samples, 2))
    ann = np.array([[files.samples[q].ann_id, files.samples[s].ann_id] for q, s in pairs])
    pos = {s.ann_id: i for i, s in enumerate(from_shards.samples)}
    shard_pairs = np.vectorize(pos.__getitem__)(ann)
    ds = PairDataset(from_shards, shard_pairs, full_cfg, train=True, seed=seed, load_image=index.read_bytes)
    ds_reduced = PairDataset(from_shards, shard_pairs, reduced_cfg, train=True, seed=seed,
                             load_image=index.read_bytes)
    by_id = {s.ann_id: s for s in from_shards.samples}
    reference = ReferenceStyleLoader(data_root / "images", {a: by_id[a] for a in np.unique(ann)}, cfg)
    return Loaders(full_cfg, seed, ann, index, by_id, from_shards.categories, ds, ds_reduced, coco, reference,
                   {"coco_index": round(coco_s, 3), "shard_index": round(index_s, 3)})


def check_loaders(lo: Loaders, samples: int) -> dict[str, float]:
    """Same work: the per-file and shard loaders give the same tensors, the reduced decode changes pixels
    only. Returns the mean absolute differences of the normalised crops from the full decode's (reference,
    reduced) and the share of items the reduced decode decodes smaller."""
    import torch

    for i in range(min(8, samples)):
        a, b = lo.per_file(i), lo.shards[i]
        assert all(bool((a[k] == b[k]).all()) for k in a), f"loaders differ on item {i}"
    ref_diff, reduced_diff = [], []
    for i in range(min(32, samples)):
        full, reduced, ref = lo.shards[i], lo.reduced[i], lo.reference_item(i)
        # the reduced decode changes pixels only: the targets come from the same image → crop map
        for k in full:
            if k != "img":
                assert torch.equal(full[k], reduced[k]), f"reduced decode changes {k} of item {i}"
        reduced_diff.append(float((reduced["img"] - full["img"]).abs().mean()))
        ref_diff.append(float((ref["img"] - full["img"]).abs().mean()))
    cfg = lo.cfg
    step = [box_side(lo.by_id[int(a)], cfg) / cfg.image_size for a in lo.ann[:, 0]]
    scales = [random_scale_rotation(lo.rng(i), cfg.scale_sigma, cfg.scale_clip, cfg.rot_sigma, cfg.rot_prob)[0]
              for i in range(samples)]  # each item's first draw, its query crop's
    return {"reference": round(float(np.mean(ref_diff)), 4), "reduced": round(float(np.mean(reduced_diff)), 4),
            "reduced_share": round(float(np.mean([reduction_for(st * sc) > 1 for st, sc in zip(step, scales)])), 3),
            "box_side_over_crop": round(float(np.mean(step)), 3)}


def margin_loaders(lo: Loaders, margin: float, samples: int) -> tuple[dict[str, Callable[[int], Any]], dict]:
    """The margin-crop alternative and ``make_item`` alone on pre-decoded images, and what they store:
    the two item functions, and ``{"images", "stored_bytes", "margin_diff"}``."""
    images = {a: lo.index.load_image(lo.by_id[a]) for a in np.unique(lo.ann[:, 0])}
    crops = {a: margin_crop(images[a], lo.by_id[a], margin, int(margin * lo.cfg.image_size)) for a in images}
    stored = {"original": sum(len(lo.index.read_bytes(a)) for a in images) / len(images),
              "margin_crop": sum(len(c[0]) for c in crops.values()) / len(crops)}

    def margin_item(i: int) -> dict[str, Any]:
        q, s = lo.by_id[int(lo.ann[i, 0])], lo.by_id[int(lo.ann[i, 1])]
        data, scale, origin = crops[q.ann_id]
        return item_from_margin_crop(data, scale, origin, q, s, lo.categories[q.category_id], lo.cfg, lo.rng(i))

    def common(i: int) -> dict[str, Any]:
        q, s = lo.by_id[int(lo.ann[i, 0])], lo.by_id[int(lo.ann[i, 1])]
        return make_item(images[q.ann_id], q, s, lo.categories[q.category_id], lo.cfg, lo.rng(i))

    diff = float(np.mean([(margin_item(i)["img"] - lo.shards[i]["img"]).abs().mean().item()
                          for i in range(min(32, samples))]))
    return {"margin": margin_item, "common": common}, {"images": images, "stored_bytes": stored,
                                                        "margin_diff": round(diff, 4)}


def loader_benchmark(
    data_root: Path,
    shards: Path,
    samples: int = 400,
    split: int = 1,
    subset: str = "train",
    cfg: DataCfg | None = None,
    margin: float = 1.5,
    seed: int = 0,
    rounds: int = 3,
) -> dict[str, Any]:
    """The loaders of the module docstring over the same ``samples`` items.

    ``data_root`` is the MP-100 copy ``shards`` was made from; each loader runs ``rounds`` times,
    interleaved, and its best round counts. Returns the JSON-ready result.
    """
    cfg = cfg or DataCfg()
    data_root, shards = Path(data_root), Path(shards)
    lo = build_loaders(data_root, shards, samples, split, subset, cfg, seed)
    diffs = check_loaders(lo, samples)
    extra, stored = margin_loaders(lo, margin, samples)
    with _one_thread():
        t = _time_rounds({"reference": lo.reference_item, "reference_pair": lo.reference_pair,
                          "shards": lo.shards.__getitem__, "reduced": lo.reduced.__getitem__,
                          "per_file": lo.per_file, **extra}, samples, rounds)

    def ratio(a: str, b: str) -> float:
        return round(t[a]["img_s_per_core"] / t[b]["img_s_per_core"], 3)

    images = stored["images"]
    return {
        "benchmark": "loader",
        "machine": machine(),
        "data": {"root": str(data_root), "shards": str(shards), "split": split, "subset": subset,
                 "items": samples, "rounds": rounds, "distinct_images": len(images), "image_size": cfg.image_size,
                 "mean_image_px": round(float(np.mean([im.shape[0] * im.shape[1] for im in images.values()]))),
                 "mean_box_side_over_crop": diffs["box_side_over_crop"],
                 "mean_stored_bytes": {k: round(v) for k, v in stored["stored_bytes"].items()}},
        "setup_s": lo.setup_s,
        "reference_loader": {**t["reference"], "mean_abs_diff_normalised_crop_vs_shards": diffs["reference"]},
        "reference_loader_with_support_image": t["reference_pair"],
        "shards": t["shards"],
        "shards_reduced_decode": {**t["reduced"], "mean_abs_diff_normalised_crop": diffs["reduced"],
                                  "share_of_items_reduced": diffs["reduced_share"]},
        "per_file": t["per_file"],
        "shards_margin_crop": {**t["margin"], "margin": margin, "mean_abs_diff_normalised_crop": stored["margin_diff"]},
        "make_item_only": t["common"],
        "ratio_vs_reference_loader": {"shards": ratio("shards", "reference"),
                                      "shards_reduced_decode": ratio("reduced", "reference")},
        "ratio_vs_reference_loader_with_support_image": {"shards": ratio("shards", "reference_pair"),
                                                         "shards_reduced_decode": ratio("reduced", "reference_pair")},
        "ratio_vs_per_file": {"shards": ratio("shards", "per_file"), "shards_margin_crop": ratio("margin", "per_file")},
        "goal": GOAL,
        "meets_goal": max(ratio("shards", "reference"), ratio("reduced", "reference")) >= GOAL,
        "image_storage": "original",
    }


def box_side(sample: Sample, cfg: DataCfg) -> float:
    """The side of the square the crop warps (before the random scale), in image pixels."""
    return max(sample.bbox[2], sample.bbox[3]) * cfg.bbox_scale


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The loader benchmark's options (``python -m jobs.benchmark loader``)."""
    parser.add_argument("--data-root", type=Path, default=None,
                        help="MP-100 copy (default: the synthetic set, generated into --workdir)")
    parser.add_argument("--shards", type=Path, default=None,
                        help="its shards (default: made from --data-root into --workdir, with Ray)")
    parser.add_argument("--workdir", type=Path, default=None, help="where generated data and shards go "
                                                                   "(default: a temporary folder)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"items timed per loader (default {FULL['samples']}; quick {QUICK['samples']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds per loader, interleaved; the best counts (default {FULL['rounds']}; "
                             f"quick {QUICK['rounds']})")
    parser.add_argument("--split", type=int, default=1, help="split 1-5 (default 1)")
    parser.add_argument("--subset", default="train", choices=["train", "val", "test"])
    parser.add_argument("--image-size", type=int, default=DataCfg.image_size, help="crop side (default 256)")
    parser.add_argument("--margin", type=float, default=1.5,
                        help="margin-crop side in bbox sides, for the alternative storage (default 1.5)")
    parser.add_argument("--full-size", action="store_true",
                        help="generate the MP-100-sized synthetic set (larger images) when no --data-root")
    parser.add_argument("--mp100-sized", action="store_true",
                        help="generate the synthetic set with MP-100's camera-photo sizes (long side 600-1600 "
                             "px) when no --data-root")
    parser.add_argument("--quick", action="store_true",
                        help=f"the tests' smoke run: {QUICK['samples']} items, {QUICK['rounds']} round per loader")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Make the data and shards when not given, run :func:`loader_benchmark`, return its JSON."""
    sizes = bench_sizes(args, QUICK, FULL)
    for key, value in sizes.items():
        positive(f"--{key}", value)
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_loader_")))
        root = args.data_root
        if root is None:
            from pipelines.synthetic import generate

            root = work / ("data" + ("_full" if args.full_size else "") + ("_mp100" if args.mp100_sized else ""))
            if not (root / "annotations").is_dir():
                generate(root, seed=0, full_size=args.full_size, mp100_sized=args.mp100_sized, progress=False)
        shards = args.shards
        if shards is None or not (shards / "manifest.json").is_file():
            from pipelines import shard

            shards = shards or work / f"shards_{root.name}"
            shard.run(root, shards, progress=False)
        result = loader_benchmark(root, shards, sizes["samples"], args.split, args.subset,
                                  DataCfg(image_size=args.image_size), args.margin, rounds=sizes["rounds"])
    return {**result, "quick": bool(args.quick)}
