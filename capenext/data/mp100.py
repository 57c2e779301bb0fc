"""Reading MP-100 (COCO keypoint json per split and subset) and cleaning it as the reference does.

MP-100 as its users have it: ``annotations/mp100_split{1..5}_{train,val,test}.json`` and the images in
the folder the json's ``file_name`` is relative to (``images/`` by default). Each category carries its
keypoint names (or text descriptions) and its 0-based skeleton, as in the GraphCape/CapeX files, and may
carry ``polysemous_keypoints``, the 0-based indices of its keypoints whose name means another part in
another supercategory (the synthetic set writes it; MP-100's files have none).

Cleaning follows the mmpose-based reference codebases (GraphCape, CapeX, CapeNext):

* bbox: ``x1 = max(0, x)``, ``y1 = max(0, y)``, ``x2 = min(W-1, x1 + max(0, w-1))``, ``y2`` likewise;
  kept only when ``area > 0`` and ``x2 > x1``, ``y2 > y1``;
* annotations with no keypoints, all-zero keypoints or ``num_keypoints == 0`` are dropped;
* visibility is ``min(1, v)``.

Deviation from the reference, on purpose: an annotation whose image file is missing is an error naming
the file (``missing="error"``), not a silent drop; a mistyped folder would otherwise remove a whole
category without a word. ``missing="skip"`` skips and records such samples (the shard job's
``--skip-bad``).

Keypoint texts: a category's keypoint names, or the texts of a descriptions file
(:func:`load_descriptions`): either a CapeX-style map of category name → texts, or the reference's own
rules as ``python -m pipelines.descriptions`` writes them, applied as the reference applies them
(:meth:`Descriptions.apply`).

A malformed file raises :class:`DataError` with one line naming the file, the annotation (or category)
id and the problem. ``load_subset(..., problems=[])`` collects the record-level problems instead (each a
:class:`DataError` with a ``kind``) and skips the records they concern: ``pipelines.validate`` reports
them all at once, with the same messages the loader raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capenext.data.transforms import clean_bbox
from capenext.files import unsafe_file_name

SPLITS = (1, 2, 3, 4, 5)
SUBSETS = ("train", "val", "test")
DESCRIPTIONS_FORMAT = "capenext-descriptions/1"  # the reference's rules, as pipelines.descriptions writes them
# the reference's text variants (its test_type): the regular texts, then the robustness study's
TEXT_VARIANTS = ("regular", "typo", "synonyms", "translate", "no_position", "manual", "manual_v1", "manual_paw",
                 "manual_eye", "manual_elbow", "manual_shoulder")
RULE_FIELDS = ("supercategory", "name", "id")  # the category fields the reference's rules test

_log = logging.getLogger(__name__)
_warned: set[str] = set()


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
    # sorted 0-based indices of the keypoints whose name means another part in another supercategory (a
    # chair's "leg" and a horse's): the optional ``polysemous_keypoints`` of the category record, which the
    # synthetic set writes; evaluation reports PCK over them and over the others (capenext.metrics)
    polysemous: tuple[int, ...] = ()

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


def _warn_once(message: str) -> None:
    """One warning line per distinct message and process (categories are described in several places)."""
    if message not in _warned:
        _warned.add(message)
        _log.warning("warning: %s", message)


@dataclass(frozen=True)
class Rule:
    """One branch of the reference's if/elif chain: ``category[field]`` equal to one of ``values`` gives
    ``texts``."""

    field: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]
    line: int | None = None

    def matches(self, cat: Category) -> bool:
        return any(getattr(cat, self.field) == v for v in self.values)


@dataclass(frozen=True)
class Descriptions:
    """The keypoint texts of a descriptions file, for one text variant.

    Two kinds of file: a CapeX-style map ``{category name: [texts]}`` (``variant`` is ``None``; the list
    must have one text per keypoint), or the reference's rules for ``variant`` (``rules`` in order, the
    first that matches wins; ``otherwise`` says what a category no rule matches gets: ``"names"`` its
    annotation names rewritten by ``replace``, ``"keep"`` its names, ``"stop"`` an error, as the reference
    exits there).
    """

    path: str
    sha256: str
    variant: str | None = None
    by_name: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    otherwise: str = "names"
    replace: tuple[tuple[str, str], ...] = ()

    @property
    def source_id(self) -> str:
        """What the embedding tables record: ``descriptions:<sha256>`` for a map, plus ``:<variant>`` for
        the reference's rules."""
        return f"descriptions:{self.sha256}" + (f":{self.variant}" if self.variant is not None else "")

    def rule_for(self, cat: Category) -> Rule | None:
        return next((r for r in self.rules if r.matches(cat)), None)

    def apply(self, cat: Category, where: str | None = None) -> Category:
        """``cat`` with its keypoint texts replaced as the file says (the category's skeleton, ids, polysemous
        keypoints and keypoint count never change).

        The reference's rules are applied as its dataset applies them: the first matching rule's list
        (an empty list keeps the names); no match gives the annotation names, ``_`` → space, each of them
        rewritten by every ``replace`` pair whose ``old`` it contains (each rewrite starts from the name,
        so the last matching pair wins, as the reference's loop). A list of another length than the
        category's keypoints is used as the reference's model reads it, with one warning line: the first
        K texts of a longer list; for a shorter list of L texts, keypoints L..K-1 keep their annotation
        names, where the reference has no text (it gives them no embedding when the support hides them
        and fails when the support shows one).
        """
        where = where or f"category {cat.id} ({cat.name})"
        k = cat.num_keypoints
        if self.variant is None:
            texts = self.by_name.get(cat.name)
            if texts is None:
                return cat
            if len(texts) != k:
                raise DataError(f"{where}: description file gives {len(texts)} keypoint texts, category has {k}",
                                "descriptions")
            return dataclasses.replace(cat, keypoints=tuple(text_of(t) for t in texts))
        rule = self.rule_for(cat)
        if rule is None:
            if self.otherwise == "stop":
                raise DataError(f"{where}: no rule of the reference's {self.variant!r} texts ({self.path}) matches "
                                "it, and the reference stops there", "descriptions")
            if self.otherwise == "keep":
                return cat
            texts = [_rewrite(text_of(n), self.replace) for n in cat.keypoints]
        elif not rule.texts:
            return cat  # the reference keeps the names when a rule gives an empty list
        else:
            texts = list(rule.texts)
        if len(texts) == k:
            return dataclasses.replace(cat, keypoints=tuple(texts))
        rule_of = f"the reference's {self.variant!r} texts ({Path(self.path).name}, rule at line {rule.line})"
        if len(texts) > k:
            _warn_once(f"{where}: {rule_of} give {len(texts)} texts for {k} keypoints; as the reference, the "
                       f"first {k} are used")
            texts = texts[:k]
        elif len(texts) < k:
            _warn_once(f"{where}: {rule_of} give {len(texts)} texts for {k} keypoints; keypoints {len(texts)}-{k - 1} "
                       "keep their annotation names (the reference has none for them and fails on a support that "
                       "shows one)")
            texts = texts + list(cat.keypoints[len(texts):])
        return dataclasses.replace(cat, keypoints=tuple(texts))


def _rewrite(name: str, replace: tuple[tuple[str, str], ...]) -> str:
    out = name
    for old, new in replace:
        if old in name:
            out = name.replace(old, new)
    return out


def _rules_of(path: Path, doc: dict[str, Any], variant: str) -> dict[str, Any]:
    variants = doc.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise DataError(f"{path}: no 'variants' in this descriptions file; write it again with "
                        "python -m pipelines.descriptions")
    if variant not in variants:
        raise DataError(f"{path}: holds the reference's {sorted(variants)} texts, not {variant!r} (--text-variant); "
                        f"write it with python -m pipelines.descriptions --variant {variant} (or all)")
    v = variants[variant]
    rules = v.get("rules") if isinstance(v, dict) else None
    other = v.get("otherwise") if isinstance(v, dict) else None
    ok = (isinstance(rules, list) and isinstance(other, dict) and other.get("kind") in ("names", "keep", "stop")
          and all(isinstance(r, dict) and r.get("field") in RULE_FIELDS and isinstance(r.get("values"), list)
                  and isinstance(r.get("texts"), list) and all(isinstance(t, str) for t in r["texts"])
                  for r in rules)
          and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                  for p in other.get("replace", [])))
    if not ok:
        raise DataError(f"{path}: variant {variant!r} is malformed (rules of field/values/texts and an 'otherwise' "
                        "of kind names, keep or stop); write it again with python -m pipelines.descriptions")
    return v


def load_descriptions(path: str | Path | None, variant: str = "regular") -> Descriptions | None:
    """A descriptions file (``--descriptions``) for ``variant`` (``--text-variant``); ``None`` for no file.

    Either the reference's rules (``python -m pipelines.descriptions``; ``variant`` must be one the file
    holds) or a CapeX-style map of category name → keypoint texts (no variants: only ``regular``).
    """
    if path is None:
        return None
    if variant not in TEXT_VARIANTS:
        raise DataError(f"unknown text variant {variant!r} (--text-variant); valid: {list(TEXT_VARIANTS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: description file not found (--descriptions)")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid json ({err})") from None
    sha = hashlib.sha256(raw).hexdigest()
    if isinstance(data, dict) and "format" in data:
        if data["format"] != DESCRIPTIONS_FORMAT:
            raise DataError(f"{path}: format {data['format']!r} is not {DESCRIPTIONS_FORMAT!r}")
        v = _rules_of(path, data, variant)
        rules = tuple(Rule(r["field"], tuple(r["values"]), tuple(r["texts"]), r.get("line")) for r in v["rules"])
        other = v["otherwise"]
        return Descriptions(str(path), sha, variant, rules=rules, otherwise=other["kind"],
                            replace=tuple((a, b) for a, b in other.get("replace", [])))
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in data.values()
    )
    if not ok:
        raise DataError(f"{path}: expected an object mapping category name to a list of strings")
    if variant != "regular":
        raise DataError(f"{path}: a map of category name → texts has no variants, so --text-variant {variant} does "
                        "not apply (variants come from python -m pipelines.descriptions)")
    return Descriptions(str(path), sha, None, by_name={k: tuple(v) for k, v in data.items()})


def check_texts(data) -> None:
    """A config's keypoint-text settings (``DataCfg``: descriptions file, text variant, test sampler) are
    readable and consistent: one line otherwise, before anything slow."""
    if data.episodes not in ("ours", "reference"):
        raise DataError(f"data.episodes={data.episodes!r} (--sampler); valid: ['ours', 'reference']")
    if data.descriptions is None and data.text_variant != "regular":
        raise DataError(f"--text-variant {data.text_variant} needs --descriptions FILE (the reference's texts, "
                        "python -m pipelines.descriptions)")
    load_descriptions(data.descriptions, data.text_variant)


def as_descriptions(descriptions: str | Path | dict[str, list[str]] | Descriptions | None,
                    variant: str = "regular") -> Descriptions | None:
    """A path (read for ``variant``), a loaded :class:`Descriptions`, a name → texts dict, or ``None``."""
    if descriptions is None or isinstance(descriptions, Descriptions):
        return descriptions
    if isinstance(descriptions, dict):
        return Descriptions("(dict)", "", None, by_name={k: tuple(v) for k, v in descriptions.items()})
    return load_descriptions(descriptions, variant)


def _parse_category(path: Path, c: Any, descriptions: Descriptions | None) -> Category:
    where = f"{path}: category {c.get('id') if isinstance(c, dict) else c!r}"
    if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
        raise DataError(f"{where}: needs an integer 'id' and a string 'name'", "category record")
    names = c.get("keypoints")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: 'keypoints' must be a non-empty list of names", "keypoint names")
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
    cat = Category(
        id=c["id"],
        name=c["name"],
        supercategory=str(c.get("supercategory", "")),
        keypoints=tuple(text_of(n) for n in names),
        skeleton=tuple(edges),
        polysemous=_polysemous(where, c.get("polysemous_keypoints", []), len(names)),
    )
    return descriptions.apply(cat, where) if descriptions is not None else cat


def _polysemous(where: str, value: Any, k: int) -> tuple[int, ...]:
    """The sorted indices of an optional ``polysemous_keypoints`` list: distinct integers in ``0..k-1``
    (a bool is not an index), else one line naming the category, as for the skeleton."""
    ok = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    if not ok or len(set(value)) != len(value) or not all(0 <= i < k for i in value):
        raise DataError(f"{where}: 'polysemous_keypoints' must be a list of distinct keypoint indices 0..{k - 1}, "
                        f"got {value!r:.60}", "polysemous keypoints")
    return tuple(sorted(value))


def _lookup(table: dict | set, key: Any) -> Any:
    """``table.get(key)`` (or membership for a set) that treats an unhashable key (a list id) as absent."""
    try:
        return key in table if isinstance(table, set) else table.get(key)
    except TypeError:
        return None


def load_subset(
    path: str | Path,
    image_root: str | Path | None = None,
    descriptions: str | Path | dict[str, list[str]] | Descriptions | None = None,
    missing: str = "error",
    problems: list[DataError] | None = None,
    text_variant: str = "regular",
) -> Subset:
    """Read and clean one MP-100 annotation file.

    Args:
        path: ``mp100_split{K}_{subset}.json``.
        image_root: folder ``file_name`` is relative to; default ``<path>/../../images``.
        descriptions: a descriptions file (:func:`load_descriptions`, for ``text_variant``), a loaded
            :class:`Descriptions` or a name → texts dict, overriding the keypoint names.
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
    desc = as_descriptions(descriptions, text_variant)
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
        why = unsafe_file_name(im["file_name"])
        if why:
            report(DataError(f"{path}: image {im['id']}: file_name {im['file_name']!r} {why}; it must be a path "
                             "inside the image folder", "image record", im["file_name"]))
            rejected_images.add(im["id"])
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
        if not all(math.isfinite(v) for v in bbox):
            report(DataError(f"{where}: bbox holds a non-finite value (NaN or Infinity): {bbox!r}", "bbox", image))
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
    descriptions: str | Path | dict[str, list[str]] | Descriptions | None = None,
    missing: str = "error",
    problems: list[DataError] | None = None,
    text_variant: str = "regular",
) -> Subset:
    """``load_subset`` on ``<root>/annotations/mp100_split{split}_{subset}.json``, images under ``<root>/images``."""
    check_split(split, subset)
    return load_subset(annotation_path(root, split, subset), Path(root) / "images", descriptions, missing,
                       problems, text_variant)
