"""``pipelines.shard`` on real Ray and real tars, and reading the shards back (``capenext.data.shards``).

The killed run is the entry point's one real process; its other command-line checks run ``main`` in this
process (:func:`tests.conftest.in_process`), on the worker's Ray."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from capenext.config import DataCfg
from capenext.data import SPLITS, SUBSETS, DataError, PairDataset, annotation_path, load_split, training_pairs
from capenext.data.shards import ShardIndex, iter_webdataset
from capenext.data.transforms import read_image
from pipelines import shard
from pipelines.shard import MANIFEST, verify
from tests.conftest import REPO, assert_one_line_error, in_process
from tests.test_pipelines_validate import make_variety_copy, single_instance_annotations

SMALL = 7  # samples per shard: several shards per category


def cleaned_union(root: Path) -> dict[int, str]:
    """Annotation id → image file of every annotation cleaning keeps, counted straight from the json."""
    out = {}
    for split in SPLITS:
        for subset in SUBSETS:
            data = json.loads(annotation_path(root, split, subset).read_text())
            images = {im["id"]: im for im in data["images"]}
            for a in data["annotations"]:
                im = images[a["image_id"]]
                x, y, w, h = a["bbox"]
                x1, y1 = max(0, x), max(0, y)
                x2 = min(im["width"] - 1, x1 + max(0, w - 1))
                y2 = min(im["height"] - 1, y1 + max(0, h - 1))
                if a["num_keypoints"] > 0 and max(a["keypoints"]) > 0 and a["area"] > 0 and x2 > x1 and y2 > y1:
                    out[a["id"]] = im["file_name"]
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clean(synthetic_root, ray_local, tmp_path_factory) -> tuple[Path, dict]:
    """The synthetic set sharded in-process, SMALL samples per shard."""
    out = tmp_path_factory.mktemp("shards") / "clean"
    return out, shard.run(synthetic_root, out, shard_size=SMALL, progress=False)


def test_sample_count_is_the_cleaned_annotation_count_and_tars_read_back(synthetic_root, clean):
    out, manifest = clean
    union = cleaned_union(synthetic_root)
    assert manifest["samples"] == len(union) == sum(e["count"] for e in manifest["shards"])
    assert manifest["skipped"] == [] and len(manifest["shards"]) > 20
    keys: list[str] = []
    for entry in manifest["shards"]:
        shard_keys = []
        path = out / entry["name"]
        assert sha256(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
        with tarfile.open(path) as tf:
            members = tf.getmembers()
            assert len(members) == 2 * entry["count"]
            assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
            for m in members:
                key, ext = m.name.split(".")
                assert ext in ("jpg", "json") and "." not in key
                if ext == "json":
                    meta = json.loads(tf.extractfile(m).read())
                    assert meta["key"] == key and meta["category"]["id"] == entry["categories"][0]
                    assert meta["sample"]["ann_id"] == meta["annotation"]["id"]
                    shard_keys.append(key)
                else:
                    ann_id = int(key[1:])
                    assert tf.extractfile(m).read() == (synthetic_root / "images" / union[ann_id]).read_bytes()
        assert shard_keys == sorted(shard_keys)  # annotation id order inside a shard
        keys += shard_keys
    assert sorted(int(k[1:]) for k in keys) == sorted(union)  # each cleaned annotation exactly once


def test_webdataset_reads_the_same_samples(clean):
    out, manifest = clean
    items = list(iter_webdataset(out))
    index = ShardIndex(out)
    assert [it["key"] for it in items] == [f"a{s.ann_id:09d}" for s in index.samples]
    for it in items[:: max(1, len(items) // 40)]:
        assert it["image"] == index.read_bytes(it["key"]) and it["ext"] == "jpg"
        assert it["category"] == index.categories[it["sample"].category_id]


def test_shard_index_selects_each_split_like_the_files(synthetic_root, clean):
    out, _ = clean
    index = ShardIndex(out)
    for split in SPLITS:
        for subset in SUBSETS:
            files, shards = load_split(synthetic_root, split, subset), index.subset(split, subset)
            assert shards.categories == files.categories
            assert sorted(s.ann_id for s in shards.samples) == sorted(s.ann_id for s in files.samples)


def test_pair_dataset_from_shards_equals_from_files(synthetic_root, clean):
    out, _ = clean
    index = ShardIndex(out)
    cfg = DataCfg(image_size=128, heatmap_size=32)
    files, shards = load_split(synthetic_root, 3, "train"), index.subset(3, "train")
    pos = {s.ann_id: i for i, s in enumerate(shards.samples)}
    pairs = training_pairs(files.by_category(), seed=1, epoch=2)[:48]
    mapped = np.array([[pos[files.samples[q].ann_id], pos[files.samples[s].ann_id]] for q, s in pairs])
    a = PairDataset(files, pairs, cfg, train=True, seed=5)
    b = PairDataset(shards, mapped, cfg, train=True, seed=5, load_image=index.load_image)
    for i in range(len(pairs)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


def test_rerun_skips_complete_shards_and_rewrites_torn_ones(synthetic_root, clean, tmp_path):
    src, manifest = clean
    out = tmp_path / "shards"
    shutil.copytree(src, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert shard.run(synthetic_root, out, shard_size=SMALL, progress=False) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps  # nothing rewritten
    torn, gone = manifest["shards"][3]["name"], manifest["shards"][5]["name"]
    (out / torn).write_bytes((out / torn).read_bytes()[:3000])  # a shard cut short
    (out / gone).unlink()
    (out / f".{torn}.1234.tmp").write_bytes(b"half a tar")  # a killed writer's temporary file
    (out / MANIFEST).unlink()
    assert shard.run(synthetic_root, out, shard_size=SMALL, progress=False) == manifest
    assert sha256(out / torn) == manifest["shards"][3]["sha256"] and (out / gone).is_file()
    assert not list(out.glob(".*.tmp"))
    rewritten = {p.name for p in out.glob("*.tar") if p.stat().st_mtime_ns != stamps[p.name]}
    assert rewritten == {torn, gone}


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the process group ``pgid`` (one we started), until none is left."""
    for _ in range(100):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def test_killed_run_then_rerun_gives_the_clean_manifest(synthetic_root, clean, ray_local, tmp_path):
    """The job's driver, a real process on this worker's Ray (``--address``, as a job on a running cluster),
    killed once it has written a tar; run again, the shards are those of a clean run."""
    _, manifest = clean
    out = tmp_path / "killed"
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.shard", "--data-root", str(synthetic_root), "--out", str(out),
         "--shard-size", str(SMALL), "--quiet", "--address", address],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # the driver dies mid-run, as a killed job does
        proc.wait()
    finally:
        _kill_group(proc.pid)  # whatever is left of its session (its tasks end with it: Ray ends a dead job's workers)
    written = list(out.glob("*.tar"))
    assert written and not (out / MANIFEST).exists(), "the run finished before it could be killed"
    assert len(written) < len(manifest["shards"])
    assert shard.run(synthetic_root, out, shard_size=SMALL, progress=False) == manifest
    assert json.loads((out / MANIFEST).read_text()) == manifest


def test_verify_catches_a_flipped_byte(clean, tmp_path, capsys, monkeypatch):
    src, manifest = clean
    out = tmp_path / "shards"
    shutil.copytree(src, out)
    assert verify(out) == {"shards": len(manifest["shards"]), "samples": manifest["samples"]}
    name = manifest["shards"][2]["name"]
    data = bytearray((out / name).read_bytes())
    data[len(data) // 3] ^= 0x01
    (out / name).write_bytes(bytes(data))
    proc = in_process(shard.main, ["--out", str(out), "--verify"], capsys, monkeypatch)
    assert_one_line_error(proc, name, "sha256", "1 of")


@pytest.fixture(scope="module")
def truncated(synthetic_root, tmp_path_factory) -> tuple[Path, dict, str]:
    """A copy with one JPEG cut in half: (root, its annotation, its file name)."""
    root = tmp_path_factory.mktemp("truncated") / "mp100"
    shutil.copytree(synthetic_root, root)
    ann, image = single_instance_annotations(root)[4]
    path = root / "images" / image["file_name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root, ann, image["file_name"]


def test_truncated_jpeg_stops_the_job_with_one_line_and_nothing_damaged(truncated, ray_local, tmp_path, capsys,
                                                                        monkeypatch):
    root, ann, file_name = truncated
    out = tmp_path / "shards"
    proc = in_process(shard.main, ["--data-root", str(root), "--out", str(out), "--shard-size", str(SMALL)],
                      capsys, monkeypatch)
    assert_one_line_error(proc, file_name, f"annotation {ann['id']}", "--skip-bad")
    assert not (out / MANIFEST).exists()
    assert not list(out.glob(".*.tmp"))
    key = f"a{ann['id']:09d}"
    for path in out.glob("*.tar"):  # whatever was written is complete and does not hold the bad sample
        side = json.loads((out / f".{path.name}.json").read_text())
        assert sha256(path) == side["sha256"]
        with tarfile.open(path) as tf:
            assert len(tf.getmembers()) == 2 * side["count"]
            assert not any(m.name.startswith(key) for m in tf.getmembers())


def test_skip_bad_skips_and_lists_the_bad_samples(truncated, clean, tmp_path):
    root, ann, file_name = truncated
    _, clean_manifest = clean
    out = tmp_path / "shards"
    manifest = shard.run(root, out, shard_size=SMALL, skip_bad=True, progress=False)
    assert [(s["ann_id"], s["file_name"], s["kind"]) for s in manifest["skipped"]] == \
        [(ann["id"], file_name, "corrupt image")]
    assert manifest["samples"] == clean_manifest["samples"] - 1
    index = ShardIndex(out)
    assert ann["id"] not in {s.ann_id for s in index.samples}
    with pytest.raises(DataError, match=f"annotation {ann['id']}"):  # without --skip-bad it still stops
        shard.run(root, out, shard_size=SMALL, progress=False)


def test_malformed_annotation_file_gets_the_data_layer_error(synthetic_root, ray_local, tmp_path, capsys,
                                                             monkeypatch):
    root = tmp_path / "mp100"
    shutil.copytree(synthetic_root, root)
    path = annotation_path(root, 2, "val")
    data = json.loads(path.read_text())
    data["categories"][0]["skeleton"].append([0, 77])
    path.write_text(json.dumps(data))
    proc = in_process(shard.main, ["--data-root", str(root), "--out", str(tmp_path / "out")], capsys, monkeypatch)
    cid = data["categories"][0]["id"]
    assert_one_line_error(proc, str(path), f"category {cid}", "skeleton index out of range")


def test_mixed_formats_odd_folders_and_ids_shard_and_read_back(synthetic_root, ray_local, tmp_path):
    root = tmp_path / "mp100"
    made = make_variety_copy(synthetic_root, root)
    manifest = shard.run(root, tmp_path / "shards", progress=False)
    assert manifest["samples"] == len(cleaned_union(root))
    index = ShardIndex(tmp_path / "shards")
    by_file = {s.file_name: s for s in index.samples}
    for new in made["renamed"].values():
        s = by_file[new]
        assert index.members[f"a{s.ann_id:09d}"].ext == ("png" if new.endswith(".png") else "jpg")
        assert np.array_equal(index.load_image(s), read_image(str(root / "images" / new)))
    assert any(s.file_name.startswith("Odd Folder (ü) #1/") for s in index.samples)
    assert index.categories[made["no_skeleton"]].skeleton == ()
