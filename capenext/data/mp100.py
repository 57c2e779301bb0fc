"""Reading MP-100 (COCO keypoint json per split and subset) and cleaning it as the reference does.

MP-100 as its users have it: ``annotations/mp100_split{1..5}_{train,val,test}.json`` and the images in
the folder the json's ``file_name`` is relative to (``images/`` by default). Each category carries its
keypoint names (or text descriptions) and its 0-based skeleton, as in the GraphCape/CapeX files.

Cleaning follows the mmpose-based reference codebases (GraphCape, CapeX, CapeNext):

* bbox: ``x1 = max(0, x)``, ``y1 = max(0, y)``, ``x2 = min(W-1, x1 + max(0, w-1))``, ``y2`` likewise;
  kept only when ``area > 0`` and ``x2 > x1``, ``y2 > y1``;
* annotations with no keypoints, all-zero keypoints or ``num_keypoints == 0`` are dropped;
* visibility is ``min(1, v)``.

Deviation from the reference, on purpose: an annotation whose image file is missing is an error naming
the file (``missing="error"``), not a silent drop; a mistyped folder would otherwise remove a whole
category without a word. ``missing="skip"`` skips and records such samples (the shard job's
``--skip-bad``).

A malformed file raises :class:`DataError` with one line naming the file, the annotation (or category)
id and the problem. ``load_subset(..., problems=[])`` collects the record-level problems instead (each a
:class:`DataError` with a ``kind``) and skips the records they concern: ``pipelines.validate`` reports
them all at once, with the same messages the loader raises.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = (1, 2, 3, 4, 5)
SUBSETS = ("train", "val", "test")


class DataError(ValueError):
    """A one-line problem with a user's data, naming the file and the record.

    ``kind`` names the class of problem (``"skeleton index"``, ``"keypoint length"`` ...), so that an
    audit can group them; ``image`` is the image ``file_name`` the record points at, when known.
    """

    def __init__(self, message: str, kind: str = "data", image: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.image = image

    def __reduce__(self):  # keep kind and image through pickling (Ray tasks, process pools)
        return (type(self), (str(self), self.kind, self.image))


def annotation_path(root: str | Path, split: int, subset: str) -> Path:
    return Path(root) / "annotations" / f"mp100_split{split}_{subset}.json"


def check_split(split: int, subset: str | None = None) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    if subset is not None and subset not in SUBSETS:
        raise DataError(f"unknown subset {subset!r}; valid: {list(SUBSETS)}")


def text_of(name: str) -> str:
    """Keypoint descriptions and class names are used raw, with ``_`` → space."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str
    keypoints: tuple[str, ...]  # keypoint texts (descriptions when a description file is given)
    skeleton: tuple[tuple[int, int], ...]  # 0-based index pairs

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoints)

    @property
    def class_text(self) -> str:
        return text_of(self.name)


@dataclass(frozen=True)
class Sample:
    """One annotation that survived cleaning."""

    ann_id: int
    image_id: int
    category_id: int
    file_name: str  # relative to the image root
    width: int
    height: int
    bbox: tuple[float, float, float, float]  # cleaned xywh
    keypoints: np.ndarray = field(compare=False)  # (K, 3) float32: x, y, visibility in {0, 1}

    @property
    def visible(self) -> np.ndarray:
        return self.keypoints[:, 2] > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ann_id": self.ann_id,
            "image_id": self.image_id,
            "category_id": self.category_id,
            "file_name": self.file_name,
            "width": self.width,
            "height": self.height,
            "bbox": list(self.bbox),
            "keypoints": self.keypoints.reshape(-1).tolist(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Sample:
        return cls(
            ann_id=int(d["ann_id"]),
            image_id=int(d["image_id"]),
            category_id=int(d["category_id"]),
            file_name=str(d["file_name"]),
            width=int(d["width"]),
            height=int(d["height"]),
            bbox=tuple(float(v) for v in d["bbox"]),
            keypoints=np.asarray(d["keypoints"], dtype=np.float32).reshape(-1, 3),
        )


@dataclass
class Subset:
    """One annotation file after cleaning: its categories and its samples."""

    path: Path
    image_root: Path
    categories: dict[int, Category]
    samples: list[Sample]
    dropped: Counter = field(default_factory=Counter)  # cleaning reason → count
    missing: list[tuple[int, str]] = field(default_factory=list)  # (ann id, file) skipped as missing

    def by_category(self) -> dict[int, list[int]]:
        """Category id → indices into ``samples`` (categories without samples included, empty)."""
        out: dict[int, list[int]] = {cid: [] for cid in self.categories}
        for i, s in enumerate(self.samples):
            out[s.category_id].append(i)
        return out

    def image_path(self, sample: Sample) -> Path:
        return self.image_root / sample.file_name

    def summary(self) -> dict[str, int]:
        return {
            "categories": len(self.categories),
            "images": len({s.image_id for s in self.samples}),
            "annotations": len(self.samples),
            "keypoints": sum(c.num_keypoints for c in self.categories.values()),
        }


def clean_bbox(bbox: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The reference's bbox sanitising; ``None`` when nothing is left."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 > x1 and y2 > y1:
        return (x1, y1, x2 - x1, y2 - y1)
    return None


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found", "annotation file")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid json ({err})", "annotation file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with images, annotations, categories",
                        "annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or malformed '{key}' list", "annotation file")
    return data


def load_descriptions(path: str | Path | None) -> dict[str, list[str]]:
    """A CapeX-style description file: category name → list of keypoint descriptions."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: description file not found (--descriptions)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid json ({err})") from None
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in data.values()
    )
    if not ok:
        raise DataError(f"{path}: expected an object mapping category name to a list of strings")
    return data


def _parse_category(path: Path, c: Any, descriptions: dict[str, list[str]]) -> Category:
    where = f"{path}: category {c.get('id') if isinstance(c, dict) else c!r}"
    if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
        raise DataError(f"{where}: needs an integer 'id' and a string 'name'", "category record")
    names = c.get("keypoints")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: 'keypoints' must be a non-empty list of names", "keypoint names")
    if c["name"] in descriptions:
        texts = descriptions[c["name"]]
        if len(texts) != len(names):
            raise DataError(
                f"{where}: description file gives {len(texts)} keypoint texts, category has {len(names)}",
                "descriptions",
            )
        names = texts
    skeleton = c.get("skeleton") or []  # real MP-100 has categories without a skeleton
    if not isinstance(skeleton, list):
        raise DataError(f"{where}: 'skeleton' must be a list of index pairs", "skeleton edge")
    edges = []
    for edge in skeleton:
        if not (isinstance(edge, (list, tuple)) and len(edge) == 2 and all(isinstance(i, int) for i in edge)):
            raise DataError(f"{where}: skeleton edge {edge!r} is not a pair of integers", "skeleton edge")
        if not all(0 <= i < len(names) for i in edge):
            raise DataError(
                f"{where}: skeleton index out of range in {list(edge)} (keypoints 0..{len(names) - 1})",
                "skeleton index",
            )
        edges.append((int(edge[0]), int(edge[1])))
    return Category(
        id=c["id"],
        name=c["name"],
        supercategory=str(c.get("supercategory", "")),
        keypoints=tuple(text_of(n) for n in names),
        skeleton=tuple(edges),
    )


def _lookup(table: dict | set, key: Any) -> Any:
    """``table.get(key)`` (or membership for a set) that treats an unhashable key (a list id) as absent."""
    try:
        return key in table if isinstance(table, set) else table.get(key)
    except TypeError:
        return None


def load_subset(
    path: str | Path,
    image_root: str | Path | None = None,
    descriptions: str | Path | dict[str, list[str]] | None = None,
    missing: str = "error",
    problems: list[DataError] | None = None,
) -> Subset:
    """Read and clean one MP-100 annotation file.

    Args:
        path: ``mp100_split{K}_{subset}.json``.
        image_root: folder ``file_name`` is relative to; default ``<path>/../../images``.
        descriptions: CapeX-style file (or its loaded dict) overriding the keypoint names.
        missing: ``"error"`` (default) raises on a missing image file; ``"skip"`` records and skips it;
            ``"ignore"`` does not look at the files at all (shards carry the bytes).
        problems: ``None`` (default) raises the first problem with a record; a list collects every
            record-level problem (malformed category, image or annotation record, unknown ids, wrong
            keypoint count, missing image file with ``missing="error"``) and skips the records concerned
            (annotations of a rejected category or image record are skipped silently). Problems with the
            file itself (missing, not json, no ``images`` list) always raise.
    """
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent.parent / "images"
    if missing not in ("error", "skip", "ignore"):
        raise ValueError(f"missing={missing!r}; valid: error, skip, ignore")
    desc = descriptions if isinstance(descriptions, dict) else load_descriptions(descriptions)
    data = _load_json(path)

    def report(err: DataError) -> None:
        if problems is None:
            raise err
        problems.append(err)

    categories: dict[int, Category] = {}
    rejected_categories: set[Any] = set()  # ids whose record was reported (collecting mode)
    for c in data["categories"]:
        try:
            cat = _parse_category(path, c, desc)
        except DataError as err:
            report(err)
            rejected_categories.add(c.get("id") if isinstance(c, dict) else None)
            continue
        if cat.id in categories:
            report(DataError(f"{path}: category {cat.id}: duplicate category id", "duplicate category"))
            continue
        categories[cat.id] = cat

    images: dict[int, dict[str, Any]] = {}
    rejected_images: set[Any] = set()
    for im in data["images"]:
        ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
        if not ok or not isinstance(im.get("width"), int) or not isinstance(im.get("height"), int):
            report(DataError(f"{path}: image {im.get('id') if isinstance(im, dict) else im!r}: "
                             "needs integer id, width, height and a string file_name", "image record"))
            rejected_images.add(im.get("id") if isinstance(im, dict) else None)
            continue
        images[im["id"]] = im

    subset = Subset(path=path, image_root=image_root, categories=categories, samples=[])
    exists: dict[str, bool] = {}
    for a in data["annotations"]:
        ann_id = a.get("id") if isinstance(a, dict) else None
        where = f"{path}: annotation {ann_id}"
        if not isinstance(ann_id, int):
            report(DataError(f"{path}: annotation {a!r:.60}: needs an integer 'id'", "annotation record"))
            continue
        if _lookup(rejected_categories, a.get("category_id")) or _lookup(rejected_images, a.get("image_id")):
            continue  # its category or image record was reported already (collecting mode only)
        cat = _lookup(categories, a.get("category_id"))
        im = _lookup(images, a.get("image_id"))
        image = im["file_name"] if im is not None else None
        if cat is None:
            report(DataError(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'",
                             "unknown category", image))
            continue
        if im is None:
            report(DataError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'", "unknown image"))
            continue
        kps = a.get("keypoints")
        if not kps or a.get("num_keypoints", 1) == 0:
            subset.dropped["no keypoints"] += 1
            continue
        if not isinstance(kps, list) or len(kps) != 3 * cat.num_keypoints:
            n = len(kps) if isinstance(kps, list) else type(kps).__name__
            report(DataError(
                f"{where}: keypoints has {n} values, category {cat.id} needs 3 x {cat.num_keypoints}",
                "keypoint length", image,
            ))
            continue
        try:
            kp = np.asarray(kps, dtype=np.float32).reshape(-1, 3)
        except (TypeError, ValueError):
            report(DataError(f"{where}: keypoints must be numbers", "keypoint values", image))
            continue
        if not np.isfinite(kp).all():
            report(DataError(f"{where}: keypoints hold non-finite values", "keypoint values", image))
            continue
        if kp.max() <= 0:
            subset.dropped["all-zero keypoints"] += 1
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            report(DataError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}", "bbox", image))
            continue
        area = a.get("area", bbox[2] * bbox[3])
        box = clean_bbox(bbox, im["width"], im["height"])
        if box is None or not area > 0:
            subset.dropped["empty bbox"] += 1
            continue
        kp[:, 2] = np.minimum(1.0, kp[:, 2])
        file_name = im["file_name"]
        if missing != "ignore":
            if file_name not in exists:
                exists[file_name] = (image_root / file_name).is_file()
            if not exists[file_name]:
                if missing == "error":
                    report(DataError(f"{where}: image file not found: {image_root / file_name}",
                                     "missing image", file_name))
                    continue
                subset.missing.append((ann_id, file_name))
                continue
        subset.samples.append(
            Sample(ann_id, im["id"], cat.id, file_name, im["width"], im["height"], box, kp)
        )
    return subset


def load_split(
    root: str | Path,
    split: int,
    subset: str,
    descriptions: str | Path | dict[str, list[str]] | None = None,
    missing: str = "error",
    problems: list[DataError] | None = None,
) -> Subset:
    """``load_subset`` on ``<root>/annotations/mp100_split{split}_{subset}.json``, images under ``<root>/images``."""
    check_split(split, subset)
    return load_subset(annotation_path(root, split, subset), Path(root) / "images", descriptions, missing,
                       problems)
