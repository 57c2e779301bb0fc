"""MP-100 → webdataset tars + ``manifest.json``: ``python -m pipelines.shard --data-root DIR --out DIR``.

One sample per annotation that survives cleaning, over the union of the 15 annotation files (an
annotation sits in one subset of every split; it is stored once, and its copies must agree). Shards are
made once for all five splits: a split selects its samples by category, so a shard never
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
import contextlib
import hashlib
import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from capenext.cli import UsageError, run_main
from capenext.data.mp100 import DataError, Sample
from capenext.data.shards import FORMAT, MANIFEST, SHARD_NAME, category_json, image_ext, sample_key
from capenext.data.source import BadImage, Source, annotation_files, collect, read_checked, source_digest
from capenext.files import file_sha256, write_atomic
from pipelines.cluster import start_ray

DEFAULT_SHARD_SIZE = 1000
_TAR = dict(mtime=0, user="capenext", group="capenext", mode=0o444)  # reproducible member headers


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


def sidecar_path(out: Path, name: str) -> Path:
    return out / f".{name}.json"


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
                 "sha256": file_sha256(tmp), "bytes": tmp.stat().st_size}
        # the sidecar lands first: a tar on disk always has one (a run killed between the two renames
        # leaves a sidecar whose tar is missing, which the next run rewrites)
        side = {**entry, "inputs": plan.inputs, "skipped": [{**b, "shard": plan.name} for b in bad]}
        write_atomic(sidecar_path(out_dir, plan.name), json.dumps(side, sort_keys=True).encode())
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
    if path.stat().st_size != side.get("bytes") or file_sha256(path) != side.get("sha256"):
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


def run(
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
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def _run_tasks(todo: list[ShardPlan], image_root: Path, out: Path, skip_bad: bool, address: str | None,
               progress: bool, total: int) -> dict[str, dict[str, Any]]:
    """One Ray task per shard; a progress bar over finished tasks; the first bad image (default) stops all."""
    from tqdm import tqdm

    ray = start_ray(address)
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
                _cancel(ray, list(pending))
                raise DataError(_bad_line(image_root, result["bad"][0]))
            results[plan.name] = {**result["entry"], "inputs": plan.inputs,
                                  "skipped": [{**b, "shard": plan.name} for b in result["bad"]]}
            bar.update(1)
    finally:
        bar.close()
    return results


def _cancel(ray, refs: list, timeout: float = 30.0) -> None:
    """Cancel the tasks still running and read their outcomes: Ray prints the error of a task nobody read
    ("Unhandled error ...", e.g. a task interrupted mid-write) when the job exits, which would add lines to
    the job's one-line error. Outcomes are read for at most ``timeout`` seconds; the tasks' own writes are
    atomic, so a task cut short leaves nothing half-written."""
    if not refs:
        return
    for ref in refs:
        ray.cancel(ref)
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in done:
        with contextlib.suppress(Exception):  # cancelled or interrupted: its outcome is read, never reported
            ray.get(ref)


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
        digest = file_sha256(shard_path)
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
    manifest = run(args.data_root, args.out, args.shard_size, args.skip_bad, args.address,
                   progress=not args.quiet)
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['skipped'])} skipped → {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    run_main(main)
