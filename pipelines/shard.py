"""MP-100 → webdataset tars + ``manifest.json``: ``python -m pipelines.shard --data-root DIR --out DIR``.

One sample per annotation that survives cleaning, over the union of the 15 annotation files (an
annotation sits in one subset of every split; it is stored once, and its copies must agree). Shards are
made once for all five splits: a split selects its samples by category (DESIGN.md), so a shard never
mixes categories and the manifest records each split's category lists.

A sample is the tar members ``<key>.<ext>`` and ``<key>.json``:

* key ``a{ann_id:09d}`` (no dots, as webdataset and Ray Data split the member name at the first dot);
* ``<ext>`` (``jpg``, ``png`` ...): the image file's **original bytes**. The loader benchmark
  (``python -m jobs.benchmark loader``, ``docs/benchmarks.md``) decided against a stored margin crop: the
  crop, augmentation and heatmaps cost the same from either, decoding is a small part of an item, and
  the original bytes keep every item bit-identical to the file loader (and the reference);
* ``json``: ``{"key", "image_ext", "sample": Sample.to_json(), "annotation": the raw COCO record,
  "image": the raw image record, "category": {id, name, supercategory, keypoints, skeleton}}``.

Shard ``c{category:05d}-{chunk:04d}.tar`` holds up to ``--shard-size`` samples of one category, sorted by
annotation id; names and bytes depend only on the data (fixed member mtime, owner and mode), so two runs
give identical sha256. Each Ray task writes one shard to a temporary name, renames it into place, then
writes its sidecar ``.<name>.json`` (name, sha256, count, skipped samples and a digest of what it was made
from). A re-run skips a shard whose file hashes to its sidecar's sha256 and whose inputs are unchanged,
so a shard torn by a killed run is rewritten. ``manifest.json`` is removed when a run starts writing and
written last (temporary name + rename): a manifest present means every shard it lists is complete.

Bad input: a missing, undecodable or wrongly sized image stops the job with one line naming the file and
the annotation id; ``--skip-bad`` skips those samples and lists them in the manifest. A malformed
annotation file gets the data layer's one-line error. ``--verify`` rehashes and recounts every shard.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from capenext.cli import UsageError, run_main
from capenext.data.mp100 import (
    SPLITS,
    SUBSETS,
    Category,
    DataError,
    Sample,
    Subset,
    annotation_path,
    load_subset,
)

FORMAT = "capenext-shards/1"
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 1000
SHARD_NAME = re.compile(r"^c-?\d+-\d{4,}\.tar$")
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".ppm": "ppm", ".pgm": "pgm", ".pbm": "pbm",
              ".bmp": "bmp", ".gif": "gif", ".tif": "tif", ".tiff": "tif", ".webp": "webp"}
_TAR = dict(mtime=0, user="capenext", group="capenext", mode=0o444)  # reproducible member headers


# ---------------------------------------------------------------- the source: 15 files, one union


def sample_key(ann_id: int) -> str:
    """The webdataset key of an annotation: no dots, sorts like the id for ids below 10^9."""
    return f"a{ann_id:09d}"


def image_ext(file_name: str) -> str:
    """Member extension of an image file: its suffix, lower-cased (``.jpeg`` → ``jpg``)."""
    suffix = Path(file_name).suffix.lower()
    return IMAGE_EXTS.get(suffix, suffix.lstrip(".") or "img")


def annotation_files() -> list[str]:
    """The 15 annotation files relative to the data root, in the fixed order the digest uses."""
    return [f"annotations/mp100_split{k}_{s}.json" for k in SPLITS for s in SUBSETS]


def category_json(cat: Category) -> dict[str, Any]:
    return {"id": cat.id, "name": cat.name, "supercategory": cat.supercategory,
            "keypoints": list(cat.keypoints), "skeleton": [list(e) for e in cat.skeleton]}


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


# ---------------------------------------------------------------- images


class BadImage(Exception):
    """An image that cannot go into a shard: ``kind`` is missing / unreadable / corrupt / size mismatch."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason

    def __reduce__(self):
        return (type(self), (self.kind, self.reason))


def read_checked(path: Path, width: int, height: int) -> bytes:
    """The file's bytes, after checking it exists, decodes fully (any mode to RGB) and is ``width × height``."""
    from PIL import Image

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing image", "file not found") from None
    except OSError as err:
        raise BadImage("unreadable image", f"cannot read ({err.strerror or err})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            im.load()  # a truncated file fails here, not at open
            if im.mode not in ("RGB", "L"):
                im.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt files
        raise BadImage("corrupt image", f"cannot decode ({' '.join(str(err).split())})") from None
    if size != (width, height):
        raise BadImage("size mismatch", f"is {size[0]}x{size[1]}, the json says {width}x{height}")
    return data


# ---------------------------------------------------------------- planning


@dataclass
class ShardPlan:
    """One shard to write: its name, its category and its samples' records."""

    name: str
    category: int
    records: list[dict[str, Any]]  # {"ann_id", "key", "file_name", "width", "height", "ext", "payload"}
    inputs: str = ""  # sha256 of the payloads and the image files' size and mtime


def plan_shards(source: Source, shard_size: int) -> list[ShardPlan]:
    """Shards per category, ``shard_size`` samples each (the last one fewer), in (category, ann id) order."""
    by_cat: dict[int, list[Sample]] = defaultdict(list)
    for s in source.samples:
        by_cat[s.category_id].append(s)
    plans = []
    for cid, samples in sorted(by_cat.items()):
        cat = category_json(source.categories[cid])
        for chunk, start in enumerate(range(0, len(samples), shard_size)):
            records = [_record(source, s, cat) for s in samples[start:start + shard_size]]
            plans.append(ShardPlan(f"c{cid:05d}-{chunk:04d}.tar", cid, records))
    stats = _file_stats(source.image_root, {r["file_name"] for p in plans for r in p.records})
    for p in plans:
        h = hashlib.sha256()
        for r in p.records:
            h.update(r["payload"])
            h.update(repr(stats[r["file_name"]]).encode())
        p.inputs = h.hexdigest()
    return plans


def _record(source: Source, s: Sample, category: dict[str, Any]) -> dict[str, Any]:
    ann, image = source.records[s.ann_id]
    ext = image_ext(s.file_name)
    meta = {"key": sample_key(s.ann_id), "image_ext": ext, "sample": s.to_json(), "annotation": ann,
            "image": image, "category": category}
    payload = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return {"ann_id": s.ann_id, "key": meta["key"], "file_name": s.file_name, "width": s.width,
            "height": s.height, "ext": ext, "payload": payload}


def _file_stats(root: Path, names: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    out: dict[str, tuple[int, int] | None] = {}
    for name in names:
        try:
            st = os.stat(root / name)
            out[name] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[name] = None
    return out


# ---------------------------------------------------------------- writing one shard (a Ray task)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(out: Path, name: str) -> Path:
    return out / f".{name}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(plan: ShardPlan, image_root: str, out: str, skip_bad: bool) -> dict[str, Any]:
    """Write one shard (temporary name, then rename) and its sidecar.

    Returns ``{"entry": manifest entry or None, "bad": [{"ann_id", "file_name", "kind", "reason"}]}``;
    without ``skip_bad`` the first bad image aborts the shard (nothing is left behind) and is returned.
    """
    from webdataset import TarWriter

    root, out_dir = Path(image_root), Path(out)
    final = out_dir / plan.name
    tmp = out_dir / f".{plan.name}.{os.getpid()}.tmp"
    bad: list[dict[str, Any]] = []
    cache: dict[str, bytes | BadImage] = {}
    count = 0
    try:
        with open(tmp, "wb") as f, TarWriter(f, encoder=False, **_TAR) as tar:
            for r in plan.records:
                if r["file_name"] not in cache:
                    try:
                        cache[r["file_name"]] = read_checked(root / r["file_name"], r["width"], r["height"])
                    except BadImage as err:
                        cache[r["file_name"]] = err
                data = cache[r["file_name"]]
                if isinstance(data, BadImage):
                    bad.append({"ann_id": r["ann_id"], "file_name": r["file_name"], "kind": data.kind,
                                "reason": data.reason})
                    if not skip_bad:
                        break
                    continue
                tar.write({"__key__": r["key"], r["ext"]: data, "json": r["payload"]})
                count += 1
        if bad and not skip_bad:
            return {"entry": None, "bad": bad}
        entry = {"name": plan.name, "categories": [plan.category], "count": count,
                 "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
        # the sidecar lands first: a tar on disk always has one (a run killed between the two renames
        # leaves a sidecar whose tar is missing, which the next run rewrites)
        side = {**entry, "inputs": plan.inputs, "skipped": [{**b, "shard": plan.name} for b in bad]}
        _write_atomic(sidecar_path(out_dir, plan.name), json.dumps(side, sort_keys=True).encode())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {"entry": entry, "bad": bad}


def _complete(out: Path, plan: ShardPlan, skip_bad: bool) -> dict[str, Any] | None:
    """The sidecar of a shard already written from the same inputs and intact on disk, else ``None``."""
    try:
        side = json.loads(sidecar_path(out, plan.name).read_text())
    except (OSError, ValueError):
        return None
    path = out / plan.name
    if side.get("inputs") != plan.inputs or side.get("name") != plan.name or not path.is_file():
        return None
    if side["skipped"] and not skip_bad:
        return None  # made with --skip-bad; without it, the bad samples must stop the job
    if path.stat().st_size != side.get("bytes") or sha256_file(path) != side.get("sha256"):
        return None
    return side


def _tidy(out: Path, plans: list[ShardPlan]) -> None:
    """Remove temporary files of killed runs, and shards (with sidecars) the current data no longer has."""
    wanted = {p.name for p in plans}
    for path in out.iterdir():
        name = path.name
        if name.startswith(".") and name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif SHARD_NAME.match(name) and name not in wanted:
            path.unlink(missing_ok=True)
        elif name.startswith(".") and name.endswith(".tar.json") and SHARD_NAME.match(name[1:-5]) \
                and name[1:-5] not in wanted:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- the job


def init_ray(address: str | None = None):
    """Reuse an initialised Ray; else ``ray.init(address)``, quietly.

    ``address=None`` is ``ray.init()``'s own lookup: ``RAY_ADDRESS`` (set by ``ray job submit``), a cluster
    started with ``ray start`` on this machine, else a new local instance.
    """
    import ray

    if not ray.is_initialized():
        # the dashboard stays on: Ray Train's State API (placement-group cleanup) needs it
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    return ray


def shard(
    data_root: str | Path,
    out: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    skip_bad: bool = False,
    address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Shard ``data_root`` into ``out``; returns the manifest (also written to ``out/manifest.json``).

    Raises :class:`DataError` on a malformed annotation file or (without ``skip_bad``) a bad image.
    Ray: reuses an initialised instance, else ``ray.init(address=address)``; it is left running.
    """
    root, out = Path(data_root), Path(out)
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if not (root / "annotations").is_dir():
        raise FileNotFoundError(f"--data-root {root}: no annotations/ folder (expected the MP-100 layout)")
    source = collect(root)
    plans = plan_shards(source, shard_size)
    out.mkdir(parents=True, exist_ok=True)
    _tidy(out, plans)
    sides = {p.name: _complete(out, p, skip_bad) for p in plans}
    todo = [p for p in plans if sides[p.name] is None]
    if todo:
        (out / MANIFEST).unlink(missing_ok=True)  # a manifest only ever lists complete shards
        for name, side in _run_tasks(todo, source.image_root, out, skip_bad, address, progress,
                                     len(plans)).items():
            sides[name] = side
    manifest = build_manifest(source, plans, sides, shard_size)
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def _run_tasks(todo: list[ShardPlan], image_root: Path, out: Path, skip_bad: bool, address: str | None,
               progress: bool, total: int) -> dict[str, dict[str, Any]]:
    """One Ray task per shard; a progress bar over finished tasks; the first bad image (default) stops all."""
    from tqdm import tqdm

    ray = init_ray(address)
    task = ray.remote(num_cpus=1)(write_shard)
    pending = {task.remote(p, str(image_root), str(out), skip_bad): p for p in todo}
    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=total, initial=total - len(todo), unit="shard", desc="sharding",
               disable=None if progress else True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            plan = pending.pop(ready[0])
            result = ray.get(ready[0])
            if result["entry"] is None:
                for ref in pending:
                    ray.cancel(ref)
                raise DataError(_bad_line(image_root, result["bad"][0]))
            results[plan.name] = {**result["entry"], "inputs": plan.inputs,
                                  "skipped": [{**b, "shard": plan.name} for b in result["bad"]]}
            bar.update(1)
    finally:
        bar.close()
    return results


def _bad_line(image_root: Path, bad: dict[str, Any]) -> str:
    return (f"{image_root / bad['file_name']}: {bad['kind']}, {bad['reason']} (annotation {bad['ann_id']}); "
            "fix or remove it, or pass --skip-bad to leave such samples out")


def build_manifest(source: Source, plans: list[ShardPlan], sides: dict[str, dict[str, Any]],
                   shard_size: int) -> dict[str, Any]:
    """The manifest: everything in it depends only on the data and ``shard_size`` (no times, no paths)."""
    keys = ("name", "categories", "count", "sha256", "bytes")
    shards = [{k: sides[p.name][k] for k in keys} for p in plans]
    skipped = sorted((s for p in plans for s in sides[p.name]["skipped"]), key=lambda s: s["ann_id"])
    return {
        "format": FORMAT,
        "image_storage": "original",  # the image file's own bytes; see the module docstring
        "key": "a{ann_id:09d}",
        "shard_size": shard_size,
        "source": {"digest": source.digest, "annotations": annotation_files()},
        "splits": source.splits,
        "categories": [category_json(c) for c in source.categories.values()],
        "cleaning": source.dropped(),
        "samples": sum(s["count"] for s in shards),
        "shards": shards,
        "skipped": skipped,
    }


# ---------------------------------------------------------------- verify


def verify(out: str | Path, data_root: str | Path | None = None) -> dict[str, Any]:
    """Rehash and recount every shard of ``out/manifest.json``; raise :class:`DataError` on any mismatch.

    With ``data_root``, also check the annotation files still hash to the manifest's source digest.
    Returns ``{"shards", "samples"}`` verified.
    """
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (the shard job has not completed in {out})")
    manifest = json.loads(path.read_text())
    bad = []
    for entry in manifest["shards"]:
        shard_path = out / entry["name"]
        if not shard_path.is_file():
            bad.append(f"{entry['name']} missing")
            continue
        digest = sha256_file(shard_path)
        if digest != entry["sha256"]:
            bad.append(f"{entry['name']} sha256 {digest[:12]}… != manifest {entry['sha256'][:12]}…")
            continue
        count = count_samples(shard_path)
        if count != entry["count"]:
            bad.append(f"{entry['name']} holds {count} samples, manifest says {entry['count']}")
    problems = []
    if bad:
        shown = "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        problems.append(f"{len(bad)} of {len(manifest['shards'])} shards fail verification: {shown}")
    if data_root is not None and source_digest(Path(data_root)) != manifest["source"]["digest"]:
        problems.append(f"the annotation files under {data_root} are not the ones the shards were made from")
    if problems:
        raise DataError(f"{out}: {'; '.join(problems)}; re-run pipelines.shard to rewrite the shards")
    return {"shards": len(manifest["shards"]), "samples": manifest["samples"]}


def count_samples(path: Path) -> int:
    """Distinct keys in a tar (members ``<key>.<ext>``); raises DataError when it is not a readable tar."""
    try:
        with tarfile.open(path, "r:") as tf:
            return len({m.name.split(".", 1)[0] for m in tf if m.isfile()})
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{path}: not a readable tar ({err})") from None


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.shard",
        description="Shard an MP-100 copy into webdataset tars (one sample per cleaned annotation, all five "
                    "splits at once) with a manifest.json of per-shard counts and sha256. Re-running skips "
                    "complete shards and rewrites torn ones.",
    )
    p.add_argument("--data-root", type=Path, help="MP-100 root: annotations/*.json and images/ (not needed "
                                                  "with --verify)")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and manifest.json")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard at most; a shard holds one category (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for ray.init (default: what ray.init() finds: RAY_ADDRESS, a "
                        "cluster started with `ray start` on this machine, else a new local instance); on a "
                        "cluster, --data-root and --out must be on a filesystem every node sees")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip samples whose image is missing, corrupt or wrongly sized, and list them in "
                        "the manifest (default: stop with one line naming the file)")
    p.add_argument("--verify", action="store_true",
                   help="only check the shards in --out against manifest.json (sha256 and sample counts; "
                        "with --data-root also the annotation digest); non-zero exit on a mismatch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.data_root is None and not args.verify:
        p.error("--data-root is required (except with --verify)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify:
        result = verify(args.out, args.data_root)
        print(f"ok: {result['shards']} shards, {result['samples']} samples match {args.out / MANIFEST}")
        return 0
    manifest = shard(args.data_root, args.out, args.shard_size, args.skip_bad, args.address,
                     progress=not args.quiet)
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['skipped'])} skipped → {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    run_main(main)
