"""Loader benchmark: ``python -m jobs.benchmark loader`` (also runnable as ``python -m jobs.bench_loader``).

Measures the training loader, decode + top-down crop + augmentation + heatmaps (``make_item`` with a
seeded generator), in images per second per CPU core (one process, OpenCV and torch on one thread, so
per-core figures come from the process CPU time), over the same ``(query, support)`` pairs for:

* ``per_file``: the usual per-file loader, ``pycocotools.coco.COCO`` on the annotation file plus
  the file read and decoded per item (``read_image``), the query rebuilt from the COCO record (``clean_bbox``);
* ``shards``: :class:`capenext.data.shards.ShardIndex` (seek + read of the stored original bytes) into
  ``PairDataset``; its items are checked equal to the per-file ones, so both do the same work;
* ``shards_margin_crop``: the alternative storage the shard job could use, a margin crop (the square of
  ``margin × max(w, h)`` around the bbox centre, resized so its side is at most ``margin × image_size``,
  JPEG quality 95) built in memory from the same bytes; keypoints are mapped into it and the outputs mapped
  back, so only the pixels differ (reported as the mean absolute difference of the normalised crop).

``make_item_only`` times the common part on pre-decoded images: the per-file time divided by it is the
ceiling any storage format can reach. Prints JSON; the ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from capenext.config import DataCfg
from capenext.data.dataset import PairDataset, make_item
from capenext.data.episodes import training_pairs
from capenext.data.mp100 import Category, Sample, annotation_path, clean_bbox, load_split
from capenext.data.shards import ShardIndex
from capenext.data.transforms import decode_image, read_image
from jobs.common import machine

GOAL = 2.0  # the target: shards at least 2x the per-file loader


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
        image = read_image(str(self.image_root / query.file_name))
        return make_item(image, query, support, self.categories[query.category_id], self.cfg, rng)


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
    """Per-file vs shard loader (and the margin-crop alternative) over the same ``samples`` items.

    ``data_root`` is the MP-100 copy ``shards`` was made from; each loader runs ``rounds`` times,
    interleaved, and its best round counts. Returns the JSON-ready result.
    """
    cfg = cfg or DataCfg()
    data_root, shards = Path(data_root), Path(shards)
    files = load_split(data_root, split, subset)
    t0 = time.perf_counter()
    index = ShardIndex(shards)
    index_s = time.perf_counter() - t0
    from_shards = index.subset(split, subset)
    t0 = time.perf_counter()
    coco = CocoFileLoader(annotation_path(data_root, split, subset), data_root / "images", files.categories, cfg)
    coco_s = time.perf_counter() - t0

    pairs = training_pairs(files.by_category(), seed, 0)
    pairs = np.resize(pairs, (samples, 2))  # repeat when the subset is small
    ann = np.array([[files.samples[q].ann_id, files.samples[s].ann_id] for q, s in pairs])
    pos = {s.ann_id: i for i, s in enumerate(from_shards.samples)}
    shard_pairs = np.vectorize(pos.__getitem__)(ann)
    ds = PairDataset(from_shards, shard_pairs, cfg, train=True, seed=seed, load_image=index.load_image)

    def rng(i: int) -> np.random.Generator:
        return np.random.default_rng([seed, 0, i])  # PairDataset's generator for item i, epoch 0

    def per_file(i: int) -> dict[str, Any]:
        return coco.item(int(ann[i, 0]), int(ann[i, 1]), rng(i))

    for i in range(min(8, samples)):  # same work: the two loaders give the same tensors
        a, b = per_file(i), ds[i]
        assert all(bool((a[k] == b[k]).all()) for k in a), f"loaders differ on item {i}"

    by_id = {s.ann_id: s for s in from_shards.samples}
    images = {a: index.load_image(by_id[a]) for a in np.unique(ann[:, 0])}
    crops = {a: margin_crop(images[a], by_id[a], margin, int(margin * cfg.image_size)) for a in images}
    stored = {"original": sum(len(index.read_bytes(a)) for a in images) / len(images),
              "margin_crop": sum(len(c[0]) for c in crops.values()) / len(crops)}

    def margin_item(i: int) -> dict[str, Any]:
        q, s = by_id[int(ann[i, 0])], by_id[int(ann[i, 1])]
        data, scale, origin = crops[q.ann_id]
        return item_from_margin_crop(data, scale, origin, q, s, from_shards.categories[q.category_id], cfg, rng(i))

    def common(i: int) -> dict[str, Any]:
        q, s = by_id[int(ann[i, 0])], by_id[int(ann[i, 1])]
        return make_item(images[q.ann_id], q, s, from_shards.categories[q.category_id], cfg, rng(i))

    diff = float(np.mean([(margin_item(i)["img"] - ds[i]["img"]).abs().mean().item()
                          for i in range(min(32, samples))]))
    with _one_thread():
        timed = _time_rounds({"per_file": per_file, "shards": ds.__getitem__, "margin": margin_item,
                              "common": common}, samples, rounds)
    base, shard, crop, only = (timed[k] for k in ("per_file", "shards", "margin", "common"))
    ratio = shard["img_s_per_core"] / base["img_s_per_core"]
    ratio_crop = crop["img_s_per_core"] / base["img_s_per_core"]
    return {
        "benchmark": "loader",
        "machine": machine(),
        "data": {"root": str(data_root), "shards": str(shards), "split": split, "subset": subset,
                 "items": samples, "rounds": rounds, "distinct_images": len(images), "image_size": cfg.image_size,
                 "mean_image_px": round(float(np.mean([im.shape[0] * im.shape[1] for im in images.values()]))),
                 "mean_stored_bytes": {k: round(v) for k, v in stored.items()}},
        "setup_s": {"coco_index": round(coco_s, 3), "shard_index": round(index_s, 3)},
        "per_file": base,
        "shards": shard,
        "shards_margin_crop": {**crop, "margin": margin, "mean_abs_diff_normalised_crop": round(diff, 4)},
        "make_item_only": only,
        "ratio": round(ratio, 3),
        "ratio_margin_crop": round(ratio_crop, 3),
        "ceiling": round(only["img_s_per_core"] / base["img_s_per_core"], 3),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
        "image_storage": "original",
    }


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The loader benchmark's options (``python -m jobs.benchmark loader``)."""
    parser.add_argument("--data-root", type=Path, default=None,
                        help="MP-100 copy (default: the synthetic set, generated into --workdir)")
    parser.add_argument("--shards", type=Path, default=None,
                        help="its shards (default: made from --data-root into --workdir, with Ray)")
    parser.add_argument("--workdir", type=Path, default=None, help="where generated data and shards go "
                                                                   "(default: a temporary folder)")
    parser.add_argument("--samples", type=int, default=400, help="items timed per loader (default 400)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds per loader, interleaved; the best counts (default 3)")
    parser.add_argument("--split", type=int, default=1, help="split 1-5 (default 1)")
    parser.add_argument("--subset", default="train", choices=["train", "val", "test"])
    parser.add_argument("--image-size", type=int, default=DataCfg.image_size, help="crop side (default 256)")
    parser.add_argument("--margin", type=float, default=1.5,
                        help="margin-crop side in bbox sides, for the alternative storage (default 1.5)")
    parser.add_argument("--full-size", action="store_true",
                        help="generate the MP-100-sized synthetic set (larger images) when no --data-root")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Make the data and shards when not given, run :func:`loader_benchmark`, return its JSON."""
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_loader_")))
        root = args.data_root
        if root is None:
            from pipelines.synthetic import generate

            root = work / ("data_full" if args.full_size else "data")
            if not (root / "annotations").is_dir():
                generate(root, seed=0, full_size=args.full_size, progress=False)
        shards = args.shards
        if shards is None or not (shards / "manifest.json").is_file():
            from pipelines.shard import shard

            shards = shards or work / f"shards_{root.name}"
            shard(root, shards, progress=False)
        return loader_benchmark(root, shards, args.samples, args.split, args.subset,
                                DataCfg(image_size=args.image_size), args.margin, rounds=args.rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_loader",
                                     description="Loader benchmark: shards vs per-file pycocotools + file "
                                                 "reads, img/s per CPU core, JSON.")
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    from capenext.cli import run_main

    run_main(main)
