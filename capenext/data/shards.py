"""Reading the shards of ``pipelines.shard`` back: random access for training, webdataset for streaming.

A shard folder holds ``manifest.json`` and tars ``c{category:05d}-{chunk:04d}.tar`` of samples
``<key>.<ext>`` (the image file's original bytes) + ``<key>.json`` (``sample``, ``annotation``,
``image``, ``category``), key ``a{ann_id:09d}``. Shards serve all five splits; a split selects its samples
by the category lists the manifest records.

:class:`ShardIndex` reads the manifest, walks every tar's headers once (``tarfile`` gives each member's
data offset) and then serves ``read_bytes`` by seek + read: random access that works from any number of
processes (each opens its own file handles). ``index.subset(split, "train")`` is a real
:class:`~capenext.data.mp100.Subset`, so the file-based tools run unchanged from shards::

    index = ShardIndex("shards/")
    train = index.subset(1, "train")
    ds = PairDataset(train, training_pairs(train.by_category(), 0, 0), cfg, train=True,
                     load_image=index.load_image)

:func:`iter_webdataset` streams the same samples through the ``webdataset`` library. Pure Python: no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from capenext.data.mp100 import Category, DataError, Descriptions, Sample, Subset, as_descriptions, check_split
from capenext.data.transforms import decode_image

MANIFEST = "manifest.json"
FORMAT = "capenext-shards/1"
SHARD_NAME = re.compile(r"^c-?\d+-\d{4,}\.tar$")  # c{category:05d}-{chunk:04d}.tar
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".ppm": "ppm", ".pgm": "pgm", ".pbm": "pbm",
              ".bmp": "bmp", ".gif": "gif", ".tif": "tif", ".tiff": "tif", ".webp": "webp"}


def sample_key(ann_id: int) -> str:
    """The webdataset key of an annotation: no dots, sorts like the id for ids below 10^9."""
    return f"a{ann_id:09d}"


def image_ext(file_name: str) -> str:
    """Member extension of an image file: its suffix, lower-cased (``.jpeg`` → ``jpg``)."""
    suffix = Path(file_name).suffix.lower()
    return IMAGE_EXTS.get(suffix, suffix.lstrip(".") or "img")


def category_json(cat: Category) -> dict[str, Any]:
    """A category as a sample's json and the manifest store it (:func:`category_from_json` reads it back);
    ``polysemous_keypoints`` only when the category has some, so MP-100's shards are written as before."""
    out = {"id": cat.id, "name": cat.name, "supercategory": cat.supercategory,
           "keypoints": list(cat.keypoints), "skeleton": [list(e) for e in cat.skeleton]}
    if cat.polysemous:
        out["polysemous_keypoints"] = list(cat.polysemous)
    return out


def category_from_json(d: dict[str, Any]) -> Category:
    return Category(
        id=int(d["id"]),
        name=str(d["name"]),
        supercategory=str(d.get("supercategory", "")),
        keypoints=tuple(d["keypoints"]),
        skeleton=tuple((int(a), int(b)) for a, b in d["skeleton"]),
        polysemous=tuple(int(i) for i in d.get("polysemous_keypoints", ())),
    )


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """``shards_dir/manifest.json``; one-line errors when it is missing or of another format."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (run python -m pipelines.shard --out {shards_dir})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid json ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format {found!r} is not {FORMAT!r}")
    return manifest


def shard_paths(shards_dir: str | Path) -> list[str]:
    """The shard files the manifest lists, in order (what ``ray.data.read_webdataset`` should read)."""
    return [str(Path(shards_dir) / e["name"]) for e in read_manifest(shards_dir)["shards"]]


@dataclass(frozen=True)
class Member:
    """Where one sample's image sits: shard file, data offset and size, extension."""

    shard: str
    offset: int
    size: int
    ext: str


class ShardIndex:
    """Every sample of a shard folder, with random access to its image bytes.

    Attributes:
        manifest: the parsed ``manifest.json``; ``digest`` its sha256; ``shard_paths`` the tar files.
        categories: category id → :class:`Category` (keypoint texts replaced by ``descriptions`` if given,
            for ``text_variant``).
        annotation_categories: the same with the annotation's own keypoint names.
        samples: every sample, in shard order (category id, then annotation id).
        members: sample key → :class:`Member`.
    """

    def __init__(self, shards_dir: str | Path,
                 descriptions: str | Path | dict[str, list[str]] | Descriptions | None = None,
                 text_variant: str = "regular"):
        self.root = Path(shards_dir)
        self.manifest = read_manifest(self.root)
        self._digest = hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()
        self.descriptions = as_descriptions(descriptions, text_variant)
        self.annotation_categories = {c.id: c for c in map(category_from_json, self.manifest["categories"])}
        self.categories = {cid: _describe(c, self.descriptions) for cid, c in self.annotation_categories.items()}
        self.samples: list[Sample] = []
        self.members: dict[str, Member] = {}
        for entry in self.manifest["shards"]:
            self._index_shard(entry)
        self._keys = {s.ann_id: sample_key(s.ann_id) for s in self.samples}
        self._files: dict[str, Any] = {}
        self._pid = os.getpid()

    def _index_shard(self, entry: dict[str, Any]) -> None:
        path = self.root / entry["name"]
        metas: dict[str, bytes] = {}  # key → json member, in tar order (annotation id)
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    if ext == "json":
                        metas[key] = tf.extractfile(m).read()
                    else:
                        self.members[key] = Member(entry["name"], m.offset_data, m.size, ext)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"{path}: not a readable shard ({err}); re-run pipelines.shard") from None
        if len(metas) != entry["count"]:
            raise DataError(f"{path}: holds {len(metas)} samples, the manifest says {entry['count']}; "
                            "re-run pipelines.shard")
        for key, data in metas.items():
            if key not in self.members:
                raise DataError(f"{path}: sample {key} has no image member; re-run pipelines.shard")
            self.samples.append(Sample.from_json(json.loads(data)["sample"]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:  # open files stay with their process
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    @property
    def splits(self) -> dict[str, dict[str, list[int]]]:
        return self.manifest["splits"]

    @property
    def shard_paths(self) -> list[Path]:
        """The shard files, in manifest order (for ``ray.data.read_webdataset``)."""
        return [self.root / e["name"] for e in self.manifest["shards"]]

    @property
    def digest(self) -> str:
        """sha256 of ``manifest.json``: names this exact shard set (counts, hashes, source digest)."""
        return self._digest

    def subset(self, split: int, subset: str) -> Subset:
        """The samples of the split's subset (selected by its categories) as a :class:`Subset`.

        ``image_root`` is the shard folder; read images with :meth:`load_image` (``PairDataset(...,
        load_image=index.load_image)``). ``dropped`` is what cleaning dropped over the whole split.
        """
        check_split(split, subset)
        if str(split) not in self.splits or subset not in self.splits[str(split)]:
            raise DataError(f"{self.root / MANIFEST}: no category list for split {split} {subset} "
                            f"(its annotation file was missing when the shards were made)")
        cats = self.splits[str(split)][subset]
        keep = set(cats)
        return Subset(
            path=self.root / MANIFEST,
            image_root=self.root,
            categories={c: self.categories[c] for c in cats},
            samples=[s for s in self.samples if s.category_id in keep],
            dropped=Counter(self.manifest.get("cleaning", {}).get(str(split), {})),
        )

    def key(self, key_or_sample: str | int | Sample) -> str:
        if isinstance(key_or_sample, Sample):
            return self._keys.get(key_or_sample.ann_id) or sample_key(key_or_sample.ann_id)
        if isinstance(key_or_sample, (int, np.integer)):
            return sample_key(int(key_or_sample))
        return key_or_sample

    def read_bytes(self, key_or_sample: str | int | Sample) -> bytes:
        """The stored image bytes of a sample (by key, annotation id or :class:`Sample`): one seek + read."""
        key = self.key(key_or_sample)
        member = self.members.get(key)
        if member is None:
            raise KeyError(f"sample {key!r} is not in the shards of {self.root}")
        f = self._file(member.shard)
        return os.pread(f.fileno(), member.size, member.offset)

    def load_image(self, sample: Sample) -> np.ndarray:
        """RGB uint8 (H, W, 3), decoded as the file loader decodes (``decode_image``)."""
        key = self.key(sample)
        return decode_image(self.read_bytes(key), f"{self.root}/{self.members[key].shard}:{key}")

    def _file(self, shard: str):
        if os.getpid() != self._pid:  # forked (DataLoader worker): never share file offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.root / shard, "rb")
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def _describe(cat: Category, descriptions: Descriptions | None) -> Category:
    """The category with its keypoint texts replaced as the descriptions file says, if there is one."""
    return descriptions.apply(cat) if descriptions is not None else cat


def iter_webdataset(shards_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every sample, in shard order, read with the ``webdataset`` library.

    Yields ``{"key", "ext", "image": bytes, "meta": dict (the json member), "sample": Sample,
    "category": Category}``.
    """
    import webdataset as wds

    urls = shard_paths(shards_dir)
    if not urls:
        return
    for item in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(item["json"])
        ext = meta["image_ext"]
        yield {"key": item["__key__"], "ext": ext, "image": item[ext], "meta": meta,
               "sample": Sample.from_json(meta["sample"]), "category": category_from_json(meta["category"])}


__all__ = ["Member", "ShardIndex", "iter_webdataset", "read_manifest", "sample_key", "shard_paths"]
