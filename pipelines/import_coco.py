"""Plain COCO keypoint files → an MP-100-layout root: ``python -m pipelines.import_coco`` (docs/own-data.md).

The root it writes is what ``pipelines.validate``, ``pipelines.shard`` and every job after them read:
``ROOT/annotations/mp100_split{1..5}_{train,val,test}.json`` and ``ROOT/images/`` holding each image at
its ``file_name`` (a symlink to the file under ``--images``, or a copy with ``--copy``).

Three ways to split:

* ``--test-categories`` (and ``--val-categories``): category-disjoint, the CAPE protocol; every other
  category trains.
* ``--split-file``: ``{"train": [...], "val": [...], "test": [...]}`` by category name, or a list of up
  to five such objects (splits 1, 2, ...). Without ``"train"`` the categories named nowhere train; with
  it, those are left out.
* ``--by-image``: the same categories, held-out images (``--test-fraction``, ``--val-fraction`` per
  category, seeded by ``--seed``); each category is written once per subset under its own id (train
  ``i``, val ``N + i``, test ``2N + i``), since the shards select a subset's samples by category id.

Rules of the written root: a split without val categories (or images) gets the test subset as its val
subset, so that training can run (its best.pt is then picked on the test data; final.pt is not
affected); splits the user did not give are copies of split 1. Categories, images (one per ``file_name``)
and annotations are numbered 1.. in input order over all files.

What real exports differ in (visibility 0/1/2 or 0/1, missing ``num_keypoints``/``area``/``bbox``/size,
1-based skeletons, sub-folders) is normalised as docs/own-data.md lists; anything else wrong (a NaN or
infinite box, an image that resolves outside ``--images``) is one line naming the file and the record, and
nothing is written (the root is assembled beside ``--out``, renamed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from capenext.cli import UsageError, run_main
from capenext.config import MAX_KEYPOINTS
from capenext.data.mp100 import SPLITS, SUBSETS, DataError, annotation_path, load_subset, text_of
from capenext.files import file_sha256

RECORD = "import.json"  # what the import did, beside annotations/ and images/


@dataclass
class Category:
    id: int  # the new id, 1..N
    name: str
    supercategory: str
    keypoints: list[str]
    skeleton: list[list[int]]  # 0-based
    source: str  # "<file>: category <id>" where it was first defined

    def record(self, cid: int | None = None) -> dict[str, Any]:
        return {"id": self.id if cid is None else cid, "name": self.name, "supercategory": self.supercategory,
                "keypoints": self.keypoints, "skeleton": self.skeleton}


@dataclass
class Image:
    id: int
    file_name: str  # relative to --images, '/'-separated
    width: int
    height: int
    source: Path  # the file under --images


@dataclass
class Annotation:
    id: int
    image_id: int
    category_id: int
    record: dict[str, Any]  # the cleaned-up COCO record, ids already the new ones


@dataclass
class Merged:
    """Every input file's categories, images and annotations under one numbering."""

    files: list[Path]
    categories: dict[int, Category] = field(default_factory=dict)
    images: dict[int, Image] = field(default_factory=dict)
    annotations: list[Annotation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, Category]:
        return {c.name: c for c in self.categories.values()}


# ---------------------------------------------------------------- reading the exports


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: COCO file not found (--coco)")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid json ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or malformed '{key}' list")
    return data


def _skeleton(path: Path, c: dict[str, Any], k: int, base: str, file_base: int | None) -> tuple[list, int]:
    """The category's skeleton, 0-based, and the numbering it was written in (0 or 1).

    ``base`` is ``--skeleton-base``; with ``auto``, a skeleton whose indices fit only one numbering is
    read in it, and one that fits both (no index 0, none equal to K) in ``file_base``, the numbering the
    file's other categories use.
    """
    where = f"{path}: category {c['id']} ({c['name']})"
    edges = c.get("skeleton") or []
    if not isinstance(edges, list) or not all(
            isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(i, int) for i in e) for e in edges):
        raise DataError(f"{where}: 'skeleton' must be a list of index pairs")
    flat = [i for e in edges for i in e]
    if not flat:
        return [], 0
    fits = {0: all(0 <= i < k for i in flat), 1: all(1 <= i <= k for i in flat)}
    if base != "auto":
        chosen = int(base)
        if not fits[chosen]:
            edge = next(list(e) for e in edges if not all(chosen <= i < k + chosen for i in e))
            raise DataError(f"{where}: skeleton index out of range in {edge} (keypoints {chosen}..{k - 1 + chosen}, "
                            f"--skeleton-base {base})")
    elif fits[0] and fits[1]:
        if file_base is None:
            raise DataError(f"{where}: skeleton indices {min(flat)}..{max(flat)} of {k} keypoints fit both 0- and "
                            "1-based numbering; pass --skeleton-base 0 or 1")
        chosen = file_base
    elif fits[0] or fits[1]:
        chosen = 0 if fits[0] else 1
    else:
        edge = next((list(e) for e in edges if not all(0 <= i <= k for i in e)), None)
        if edge is None:  # every index in 0..K, but both 0 and K occur
            edge = next(list(e) for e in edges if k in e)
        raise DataError(f"{where}: skeleton index out of range in {edge} (keypoints 0..{k - 1}, or 1..{k} for a "
                        "1-based skeleton)")
    return [[i - chosen for i in e] for e in edges], chosen


def _file_base(path: Path, cats: list[dict[str, Any]]) -> int | None:
    """The skeleton numbering a file's unambiguous categories agree on (None: none, or they disagree)."""
    seen = set()
    for c in cats:
        names, edges = c.get("keypoints"), c.get("skeleton") or []
        if not isinstance(names, list) or not isinstance(edges, list):
            continue
        flat = [i for e in edges if isinstance(e, (list, tuple)) for i in e if isinstance(i, int)]
        if flat:
            fits0 = all(0 <= i < len(names) for i in flat)
            fits1 = all(1 <= i <= len(names) for i in flat)
            if fits0 != fits1:
                seen.add(0 if fits0 else 1)
    return seen.pop() if len(seen) == 1 else None


def _relative(path: Path, image: dict[str, Any], images_dir: Path) -> str:
    """``file_name`` as a '/'-separated path relative to ``--images`` (an absolute one inside it is made
    relative); one that resolves outside ``--images`` (``..``, a symlink out of it) is refused."""
    name = str(image["file_name"]).replace("\\", "/")
    p = PurePosixPath(name)
    if p.is_absolute():
        try:
            p = PurePosixPath(Path(name).resolve().relative_to(images_dir.resolve()).as_posix())
        except ValueError:
            raise DataError(f"{path}: image {image['id']}: file_name {name} is not under --images "
                            f"{images_dir}") from None
    parts = [part for part in p.parts if part not in ("", ".")]
    if not parts or ".." in parts:
        raise DataError(f"{path}: image {image['id']}: file_name {name!r} must be a path inside --images")
    real = images_dir.joinpath(*parts).resolve()
    if not real.is_relative_to(images_dir.resolve()):
        raise DataError(f"{path}: image {image['id']}: {name} resolves to {real}, outside --images (a symlink)")
    return "/".join(parts)


def _image_size(path: Path, image_id: Any, file: Path) -> tuple[int, int]:
    """Width and height as the loader sees the image: after its EXIF orientation (5-8 swap the sides)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(file) as im:
            try:
                turned = int(im.getexif().get(0x0112, 1)) in (5, 6, 7, 8)
            except Exception:  # a broken EXIF block: read as stored
                turned = False
            return im.size[::-1] if turned else im.size
    except Exception as err:  # PIL raises many types for files that are not images
        raise DataError(f"{path}: image {image_id}: {file} is not a readable image "
                        f"({' '.join(str(err).split())[:120]})") from None


def _keypoints(where: str, kps: Any, k: int, cat: Category) -> list[float]:
    if not isinstance(kps, list):
        raise DataError(f"{where}: no keypoints list, category {cat.name!r} needs 3 x {k} values")
    if len(kps) != 3 * k:
        raise DataError(f"{where}: keypoints has {len(kps)} values, category {cat.name!r} needs 3 x {k}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in kps):
        raise DataError(f"{where}: keypoints must be finite numbers")
    out = list(kps)
    for j in range(2, len(out), 3):
        if out[j] not in (0, 1, 2):
            raise DataError(f"{where}: visibility {out[j]!r} of keypoint {j // 3} is not 0, 1 or 2")
        out[j] = int(out[j])
    return out


def _bbox_from_points(kps: list[float], width: int, height: int) -> list[float]:
    """The labelled keypoints' extent, 10 % larger on each side, inside the image; zeros when none."""
    pts = np.asarray(kps, dtype=np.float64).reshape(-1, 3)
    pts = pts[pts[:, 2] > 0, :2]
    if not len(pts):
        return [0.0, 0.0, 0.0, 0.0]
    (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    mx, my = 0.1 * max(x2 - x1, 1.0), 0.1 * max(y2 - y1, 1.0)
    x1, y1 = max(0.0, x1 - mx), max(0.0, y1 - my)
    x2, y2 = min(width - 1.0, x2 + mx), min(height - 1.0, y2 + my)
    return [round(float(v), 2) for v in (x1, y1, x2 - x1, y2 - y1)]


def read_exports(paths: list[Path], images_dir: Path, skeleton_base: str = "auto") -> Merged:
    """Parse, check and merge COCO keypoint files; :class:`DataError` (one line) on the first problem."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: not a directory")
    merged = Merged(files=list(paths))
    names: dict[str, Category] = {}
    by_file_name: dict[str, Image] = {}
    for path in paths:
        data = _load(path)
        file_base = _file_base(path, [c for c in data["categories"] if isinstance(c, dict)])
        cats: dict[int, Category] = {}
        one_based = False
        for c in data["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                raise DataError(f"{path}: category {c.get('id') if isinstance(c, dict) else c!r:.40}: needs an "
                                "integer 'id' and a string 'name'")
            where = f"{path}: category {c['id']} ({c['name']})"
            kp_names = c.get("keypoints")
            if not isinstance(kp_names, list) or not kp_names or not all(isinstance(n, str) and n.strip()
                                                                          for n in kp_names):
                raise DataError(f"{where}: no keypoint names ('keypoints' must be a non-empty list of names)")
            if len(kp_names) > MAX_KEYPOINTS:
                raise DataError(f"{where}: {len(kp_names)} keypoints, the model has {MAX_KEYPOINTS} slots")
            if c["id"] in cats:
                raise DataError(f"{where}: two categories with this id")
            edges, numbering = _skeleton(path, c, len(kp_names), skeleton_base, file_base)
            one_based |= numbering == 1
            cat = Category(len(names) + 1, c["name"], str(c.get("supercategory") or ""), list(kp_names), edges, where)
            known = names.get(cat.name)
            if known is None:
                names[cat.name] = cat
                merged.categories[cat.id] = cat
            elif (known.keypoints, known.skeleton) != (cat.keypoints, cat.skeleton):
                raise DataError(f"{where}: differs from category {cat.name!r} of {known.source} (keypoints or "
                                "skeleton)")
            cats[c["id"]] = names[cat.name]
        if one_based:
            merged.notes.append(f"{path}: 1-based skeletons (COCO's numbering) converted to 0-based")

        images: dict[int, Image] = {}
        for im in data["images"]:
            if not (isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)):
                raise DataError(f"{path}: image {im.get('id') if isinstance(im, dict) else im!r:.40}: needs an "
                                "integer 'id' and a string 'file_name'")
            if im["id"] in images:
                raise DataError(f"{path}: image {im['id']}: two image records with this id")
            rel = _relative(path, im, images_dir)
            file = images_dir / rel
            if not file.is_file():
                raise DataError(f"{path}: image {im['id']}: {file} not found")
            known = by_file_name.get(rel)
            if known is None:
                w, h = _image_size(path, im["id"], file)
                if (im.get("width"), im.get("height")) not in ((None, None), (w, h)):
                    raise DataError(f"{path}: image {im['id']}: {file} is {w}x{h}, the json says "
                                    f"{im.get('width')}x{im.get('height')}")
                known = by_file_name[rel] = Image(len(merged.images) + 1, rel, w, h, file)
                merged.images[known.id] = known
            elif (im.get("width"), im.get("height")) not in ((None, None), (known.width, known.height)):
                raise DataError(f"{path}: image {im['id']}: {file} is {known.width}x{known.height}, the json "
                                f"says {im.get('width')}x{im.get('height')}")
            images[im["id"]] = known

        seen: set[int] = set()
        for a in data["annotations"]:
            ann_id = a.get("id") if isinstance(a, dict) else None
            if not isinstance(ann_id, int):
                raise DataError(f"{path}: annotation {a!r:.60}: needs an integer 'id'")
            where = f"{path}: annotation {ann_id}"
            if ann_id in seen:
                raise DataError(f"{where}: two annotation records with this id")
            seen.add(ann_id)
            cat = cats.get(a.get("category_id")) if isinstance(a.get("category_id"), int) else None
            if cat is None:
                raise DataError(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
            image = images.get(a.get("image_id")) if isinstance(a.get("image_id"), int) else None
            if image is None:
                raise DataError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
            kps = _keypoints(where, a.get("keypoints"), len(cat.keypoints), cat)
            bbox = a.get("bbox")
            if bbox is None:
                bbox = _bbox_from_points(kps, image.width, image.height)
            elif not (isinstance(bbox, list) and len(bbox) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in bbox)):
                raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.60}")
            area = a.get("area")
            if not isinstance(area, (int, float)) or isinstance(area, bool):
                area = float(bbox[2]) * float(bbox[3])
            elif not np.isfinite(area):
                raise DataError(f"{where}: area must be a finite number, got {area!r}")
            new_id = len(merged.annotations) + 1
            record = {"id": new_id, "image_id": image.id, "category_id": cat.id, "bbox": list(bbox),
                      "keypoints": kps, "num_keypoints": sum(v > 0 for v in kps[2::3]), "area": area,
                      "iscrowd": int(a.get("iscrowd") or 0)}
            merged.annotations.append(Annotation(new_id, image.id, cat.id, record))
    return merged


# ---------------------------------------------------------------- subsets


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _find(merged: Merged, name: str, where: str) -> Category:
    """A category by its name as written in the file or with ``_`` as spaces."""
    by_name = merged.by_name()
    cat = by_name.get(name) or next((c for c in by_name.values() if text_of(c.name) == text_of(name)), None)
    if cat is None:
        listed = ", ".join(sorted(by_name))
        raise UsageError(f"{where}: no category {name!r} in {', '.join(map(str, merged.files))} (categories: {listed})")
    return cat


@dataclass
class Split:
    """One split: per subset, the category ids and the annotations it holds (with their written ids)."""

    categories: dict[str, list[int]]  # subset → category ids as written
    annotations: dict[str, list[dict[str, Any]]]  # subset → COCO annotation records
    records: dict[int, dict[str, Any]]  # written category id → category record
    notes: list[str] = field(default_factory=list)  # printed with the summary


def by_categories(merged: Merged, test: list[str], val: list[str], train: list[str] | None, where: str) -> Split:
    """A category-disjoint split by category names (``train=None``: every category not in test or val)."""
    chosen: dict[int, str] = {}
    groups = {"test": test, "val": val, "train": train or []}
    for subset, names in groups.items():
        for name in names:
            cat = _find(merged, name, where)
            if cat.id in chosen:
                other = chosen[cat.id]
                raise UsageError(f"{where}: category {cat.name!r} is in both {other} and {subset}"
                                 if other != subset else f"{where}: category {cat.name!r} is named twice in {subset}")
            chosen[cat.id] = subset
    if not test:
        raise UsageError(f"{where}: no test categories")
    ids = {s: [c for c, sub in chosen.items() if sub == s] for s in SUBSETS}
    if train is None:
        ids["train"] = [c for c in merged.categories if c not in chosen]
    notes = []
    if not ids["train"]:
        notes.append(f"{where}: no train categories; the root serves evaluation (jobs.evaluate), not training")
    if not ids["val"]:
        ids["val"] = ids["test"]
        if ids["train"]:
            notes.append(f"{where}: no val categories, val is the test subset (best.pt is then picked on it)")
    anns = {s: [a.record for a in merged.annotations if a.category_id in set(ids[s])] for s in SUBSETS}
    return Split({s: sorted(ids[s]) for s in SUBSETS}, anns,
                 {c.id: c.record() for c in merged.categories.values()}, notes)


def by_images(merged: Merged, test_fraction: float, val_fraction: float, seed: int) -> Split:
    """Held-out images of the same categories; each category written once per subset under its own id."""
    n = len(merged.categories)
    first: dict[int, int] = {}  # image id → category of its first annotation
    for a in merged.annotations:
        first.setdefault(a.image_id, a.category_id)
    subset_of: dict[int, str] = {}
    for cid, cat in merged.categories.items():
        ims = sorted(i for i, c in first.items() if c == cid)
        if not ims:
            continue
        order = np.random.default_rng([seed, cid]).permutation(ims).tolist()
        n_test = max(1, round(test_fraction * len(ims)))
        n_val = max(1, round(val_fraction * len(ims))) if val_fraction > 0 else 0
        if len(ims) - n_test - n_val < 1:
            raise UsageError(f"--by-image: category {cat.name!r} has {len(ims)} image(s), too few to hold out "
                             f"{n_test} for test{f' and {n_val} for val' if n_val else ''} and keep one to train")
        for i, image_id in enumerate(order):
            subset_of[image_id] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    offset = {"train": 0, "val": n, "test": 2 * n}
    if val_fraction <= 0:
        offset["val"] = offset["test"]
    anns: dict[str, list[dict[str, Any]]] = {s: [] for s in SUBSETS}
    for a in merged.annotations:
        subset = subset_of[a.image_id]
        targets = [subset] + (["val"] if subset == "test" and val_fraction <= 0 else [])
        for s in targets:
            anns[s].append({**a.record, "category_id": a.category_id + offset[s]})
    cats = {s: sorted({a["category_id"] for a in anns[s]}) for s in SUBSETS}
    records = {cid + offset[s]: merged.categories[cid].record(cid + offset[s])
               for s in SUBSETS for cid in merged.categories}
    same = "--by-image: no --val-fraction, val is the test subset (best.pt is then picked on it)"
    notes = [] if val_fraction > 0 else [same]
    return Split(cats, anns, records, notes)


def read_split_file(path: Path, merged: Merged) -> list[Split]:
    """``{"train", "val", "test"}`` by category name, or a list of up to five of them."""
    if not path.is_file():
        raise FileNotFoundError(f"--split-file {path}: not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--split-file {path}: not valid json ({err})") from None
    items = data if isinstance(data, list) else [data]
    if not 1 <= len(items) <= len(SPLITS):
        raise UsageError(f"--split-file {path}: holds {len(items)} splits; give 1 to {len(SPLITS)}")
    out = []
    for k, item in enumerate(items, 1):
        where = f"--split-file {path}" + (f" split {k}" if isinstance(data, list) else "")
        ok = isinstance(item, dict) and set(item) <= set(SUBSETS) and all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in item.values())
        if not ok:
            raise UsageError(f"{where}: expected {{\"train\": [...], \"val\": [...], \"test\": [...]}} with lists "
                             "of category names")
        out.append(by_categories(merged, item.get("test", []), item.get("val", []), item.get("train"), where))
    return out


# ---------------------------------------------------------------- writing the root


def _coco(split: Split, subset: str, merged: Merged, info: dict[str, Any]) -> dict[str, Any]:
    anns = split.annotations[subset]
    used = sorted({a["image_id"] for a in anns})
    images = [{"id": i, "file_name": merged.images[i].file_name, "width": merged.images[i].width,
               "height": merged.images[i].height} for i in used]
    return {"info": info, "images": images, "annotations": anns,
            "categories": [split.records[c] for c in split.categories[subset]]}


def _place_images(merged: Merged, used: set[int], target: Path, copy: bool) -> None:
    for image_id in sorted(used):
        image = merged.images[image_id]
        dest = target / image.file_name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copy2(image.source, dest)
        else:
            os.symlink(image.source.resolve(), dest)


def write_root(merged: Merged, splits: list[Split], out: Path, copy: bool, info: dict[str, Any]) -> dict[str, Any]:
    """Write the root into a temporary folder beside ``out``, check it loads, rename it into place."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not empty; pick a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "annotations").mkdir(parents=True)
        used = set()
        for k in SPLITS:
            split = splits[k - 1] if k <= len(splits) else splits[0]
            copied = {"copy_of_split": 1} if k > len(splits) else {}
            for subset in SUBSETS:
                data = _coco(split, subset, merged, {**info, "split": k, "subset": subset, **copied})
                used.update(im["id"] for im in data["images"])
                annotation_path(tmp, k, subset).write_text(json.dumps(data, separators=(",", ":"), allow_nan=False))
        _place_images(merged, used, tmp / "images", copy)
        summary = summarize(tmp, len(splits))
        (tmp / RECORD).write_text(json.dumps({**info, "splits_given": len(splits), "summary": summary}, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def summarize(root: Path, splits_given: int) -> dict[str, Any]:
    """Per subset of each given split: category names, images, annotations, keypoints, what cleaning drops
    (read back with the data layer, images checked)."""
    out: dict[str, Any] = {}
    for k in range(1, splits_given + 1):
        for subset in SUBSETS:
            sub = load_subset(annotation_path(root, k, subset), root / "images")
            out.setdefault(str(k), {})[subset] = {**sub.summary(), "dropped": sum(sub.dropped.values()),
                                                  "names": sorted({c.name for c in sub.categories.values()})}
    return out


def format_summary(summary: dict[str, Any], out: Path, splits_given: int) -> str:
    header = (f"{'split':<6}{'subset':<7}{'categories':>11}{'images':>8}{'annotations':>12}{'keypoints':>10}"
              f"{'dropped':>8}  categories")
    lines = [header]
    for k, subsets in summary.items():
        for subset, row in subsets.items():
            names = ", ".join(row["names"][:6]) + (f" ... (+{len(row['names']) - 6})" if len(row["names"]) > 6 else "")
            lines.append(f"{k:<6}{subset:<7}{row['categories']:>11}{row['images']:>8}{row['annotations']:>12}"
                         f"{row['keypoints']:>10}{row['dropped']:>8}  {names or '-'}")
    if splits_given < len(SPLITS):
        rest = f"{splits_given + 1}" + (f"-{len(SPLITS)}" if splits_given + 1 < len(SPLITS) else "")
        lines.append(f"splits {rest}: copies of split 1")
    lines.append(f"→ {out} (python -m pipelines.validate --data-root {out})")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.import_coco",
        description="Import plain COCO keypoint files as an MP-100-layout root (annotations/mp100_split{1..5}_"
                    "{train,val,test}.json + images/) that every pipeline and job reads unchanged.",
    )
    p.add_argument("--coco", type=Path, action="append", required=True, metavar="FILE",
                   help="a COCO keypoint json (repeatable; image and annotation ids are re-numbered)")
    p.add_argument("--images", type=Path, required=True, help="the folder every file_name is relative to")
    p.add_argument("--out", type=Path, required=True, help="the new root (must not exist, or be empty)")
    g = p.add_argument_group("how to split (one of)")
    mode = g.add_mutually_exclusive_group(required=True)
    mode.add_argument("--test-categories", metavar="A,B", help="unseen test categories; the rest train")
    mode.add_argument("--split-file", type=Path, metavar="FILE",
                      help='{"train": [...], "val": [...], "test": [...]} by category name, or a list of up to 5')
    mode.add_argument("--by-image", action="store_true", help="same categories, held-out images")
    g.add_argument("--val-categories", metavar="C", help="val categories (with --test-categories; default: "
                                                          "the test categories)")
    g.add_argument("--test-fraction", type=float, help="share of each category's images for test (--by-image)")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="share for val (--by-image; default 0: val is the test subset)")
    g.add_argument("--seed", type=int, default=0, help="seed of the image draw (--by-image; default 0)")
    p.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    p.add_argument("--skeleton-base", choices=("auto", "0", "1"), default="auto",
                   help="skeleton index numbering (default auto: 1-based when no index is 0 and one is K)")
    args = p.parse_args(argv)
    if args.val_categories is not None and args.test_categories is None:
        raise UsageError("--val-categories goes with --test-categories")
    if not args.by_image and (args.test_fraction is not None or args.val_fraction):
        raise UsageError("--test-fraction and --val-fraction go with --by-image")
    if args.by_image:
        if args.test_fraction is None:
            raise UsageError("--by-image needs --test-fraction F")
        if not (0 < args.test_fraction < 1 and 0 <= args.val_fraction < 1
                and args.test_fraction + args.val_fraction < 1):
            raise UsageError(f"--test-fraction {args.test_fraction} and --val-fraction {args.val_fraction}: each "
                             "in (0, 1), together below 1")
    return args


def import_coco(args: argparse.Namespace) -> dict[str, Any]:
    """Read, split and write; returns the summary (also in ``ROOT/import.json``)."""
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UsageError(f"--out {args.out}: exists and is not empty; pick a new folder")
    merged = read_exports(args.coco, args.images, args.skeleton_base)
    if args.by_image:
        splits = [by_images(merged, args.test_fraction, args.val_fraction, args.seed)]
        mode = {"mode": "by-image", **{k: getattr(args, k) for k in ("test_fraction", "val_fraction", "seed")}}
    elif args.split_file is not None:
        splits = read_split_file(args.split_file, merged)
        mode = {"mode": "split-file", "split_file": str(args.split_file)}
    else:
        splits = [by_categories(merged, _names(args.test_categories), _names(args.val_categories), None,
                                "--test-categories")]
        mode = {"mode": "categories"}
    info = {"description": "imported by pipelines.import_coco", **mode,
            "sources": [{"file": str(p), "sha256": file_sha256(p)} for p in args.coco],
            "images": str(args.images), "copied": bool(args.copy)}
    for note in merged.notes + [n for split in splits for n in split.notes]:
        print(f"note: {note}")
    summary = write_root(merged, splits, args.out, args.copy, info)
    print(format_summary(summary, args.out, len(splits)))
    return summary


def main(argv: list[str] | None = None) -> int:
    import_coco(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_main(main)
