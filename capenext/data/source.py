"""The MP-100 source as one cleaned union: the 15 annotation files of a data root merged into one set of
categories and samples, with the checks that only the union can make, and the image check every sample
must pass before it goes into a shard.

:func:`collect` is what ``pipelines.shard`` shards and ``pipelines.validate`` audits; each annotation that
survives the data layer's cleaning (:mod:`capenext.data.mp100`) becomes one sample, whatever number of
files it appears in. :func:`source_digest` identifies the annotation files a shard set came from.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from capenext.data.mp100 import SPLITS, SUBSETS, Category, DataError, Sample, Subset, annotation_path, load_subset


def annotation_files() -> list[str]:
    """The 15 annotation files relative to the data root, in the fixed order the digest uses."""
    return [f"annotations/mp100_split{k}_{s}.json" for k in SPLITS for s in SUBSETS]



@dataclass
class Source:
    """The cleaned union of a data root's 15 annotation files."""

    root: Path
    digest: str  # sha256 over the 15 files (name, length, bytes) in annotation_files() order
    categories: dict[int, Category]
    samples: list[Sample]  # one per annotation id, sorted by (category id, annotation id)
    records: dict[int, tuple[dict, dict]]  # annotation id → (raw annotation, raw image record)
    splits: dict[str, dict[str, list[int]]]  # "1" → {"train": [category ids], ...}
    subsets: dict[tuple[int, str], Subset] = field(default_factory=dict)
    raw_images: dict[str, dict[int, dict]] = field(default_factory=dict)  # file → image id → record

    @property
    def image_root(self) -> Path:
        return self.root / "images"

    def dropped(self) -> dict[str, dict[str, int]]:
        """Per split, what cleaning dropped (reason → count), summed over its three subsets."""
        out: dict[str, dict[str, int]] = {}
        for (split, _), sub in sorted(self.subsets.items()):
            acc = Counter(out.get(str(split), {}))
            acc.update(sub.dropped)
            out[str(split)] = dict(sorted(acc.items()))
        return out


def source_digest(root: Path) -> str:
    """sha256 over the annotation files' names, lengths and bytes, in a fixed order (missing = empty)."""
    h = hashlib.sha256()
    for name in annotation_files():
        path = root / name
        data = path.read_bytes() if path.is_file() else b""
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def collect(root: str | Path, problems: list[DataError] | None = None) -> Source:
    """Read, clean and merge the 15 annotation files of ``root``.

    With ``problems=None`` the first problem raises :class:`DataError` (the shard job); with a list, every
    problem is appended and the records concerned are left out (``pipelines.validate``). Beyond the
    data layer's checks: two different records with one id in a file, and an annotation (or category)
    that differs between files.
    """
    root = Path(root)

    def report(err: DataError) -> None:
        if problems is None:
            raise err
        problems.append(err)

    categories: dict[int, tuple[Category, str]] = {}
    seen: dict[int, tuple[dict, dict, str]] = {}
    samples: dict[int, Sample] = {}
    splits: dict[str, dict[str, list[int]]] = {}
    subsets: dict[tuple[int, str], Subset] = {}
    raw_images: dict[str, dict[int, dict]] = {}
    for split in SPLITS:
        for name in SUBSETS:
            path = annotation_path(root, split, name)
            try:
                sub = load_subset(path, root / "images", missing="ignore", problems=problems)
            except DataError as err:  # the file itself: missing, not json, no lists
                report(err)
                continue
            subsets[(split, name)] = sub
            splits.setdefault(str(split), {})[name] = sorted(sub.categories)
            raw = json.loads(path.read_bytes())
            anns, images = _raw_index(path, raw, report)
            raw_images[path.name] = images
            for cat in sub.categories.values():
                known = categories.setdefault(cat.id, (cat, path.name))
                if known[0] != cat:
                    report(DataError(f"{path}: category {cat.id}: differs from its definition in {known[1]}",
                                     "inconsistent category"))
            for s in sub.samples:
                record = (anns[s.ann_id], images[s.image_id])
                first = seen.setdefault(s.ann_id, (*record, path.name))
                if first[:2] != record:
                    report(DataError(f"{path}: annotation {s.ann_id}: differs from its copy in {first[2]} "
                                     "(annotation or image record)", "inconsistent annotation", s.file_name))
                    continue
                if categories[s.category_id][0] == sub.categories[s.category_id]:
                    samples.setdefault(s.ann_id, s)
    ordered = sorted(samples.values(), key=lambda s: (s.category_id, s.ann_id))
    return Source(
        root=root,
        digest=source_digest(root),
        categories={cid: c for cid, (c, _) in sorted(categories.items())},
        samples=ordered,
        records={s.ann_id: seen[s.ann_id][:2] for s in ordered},
        splits=splits,
        subsets=subsets,
        raw_images=raw_images,
    )


def _raw_index(path: Path, raw: dict, report) -> tuple[dict[int, dict], dict[int, dict]]:
    """Annotation id → record and image id → record of a parsed file.

    An id twice in the file with two different records is reported; identical copies are merged.
    """
    anns: dict[int, dict] = {}
    for a in raw["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("id"), int):
            if anns.setdefault(a["id"], a) != a:
                report(DataError(f"{path}: annotation {a['id']}: two different records with this id",
                                 "duplicate annotation"))
    images: dict[int, dict] = {}
    for im in raw["images"]:
        if isinstance(im, dict) and isinstance(im.get("id"), int):
            if images.setdefault(im["id"], im) != im:
                report(DataError(f"{path}: image {im['id']}: two different records with this id",
                                 "duplicate image", im.get("file_name")))
    return anns, images



class BadImage(Exception):
    """An image that cannot go into a shard: ``kind`` is missing / unreadable / corrupt / size mismatch."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason

    def __reduce__(self):
        return (type(self), (self.kind, self.reason))


def read_checked(path: Path, width: int, height: int) -> bytes:
    """The file's bytes, after checking it exists, is complete, decodes as the loader decodes it
    (:func:`capenext.data.transforms.decode_image`) and is then ``width × height``: the size after its
    EXIF orientation is applied, the frame the loader and the keypoints share."""
    from PIL import Image

    from capenext.data.transforms import decode_image

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing image", "file not found") from None
    except OSError as err:
        raise BadImage("unreadable image", f"cannot read ({err.strerror or err})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            stored = im.size
            im.load()  # a truncated file fails here (OpenCV before 5 decodes it, grey where data is missing)
        decoded = decode_image(data, "it")
    except Exception as err:  # PIL raises many types for corrupt files
        reason = " ".join(str(err).removeprefix("cannot decode it: ").split())
        raise BadImage("corrupt image", f"cannot decode ({reason})") from None
    size = (decoded.shape[1], decoded.shape[0])
    if size != (width, height):
        rotated = "" if size == stored else \
            f" after its EXIF orientation is applied ({stored[0]}x{stored[1]} as stored)"
        raise BadImage("size mismatch", f"is {size[0]}x{size[1]}{rotated}, the json says {width}x{height}")
    return data
