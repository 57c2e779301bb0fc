"""Importing plain COCO keypoint files: the three ways to split, what real exports differ in, what is
refused (one line, nothing written), and every pipeline running on the imported root.

The plain COCO file is made here from the session's synthetic set: four categories, their images copied
into one flat folder, ``file_name`` without sub-folders.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from capenext.cli import run_main
from capenext.data.mp100 import SPLITS, SUBSETS, annotation_path, load_split
from pipelines import import_coco
from pipelines.validate import validate
from tests.conftest import assert_one_line_error, run_cli

CATEGORIES = ("ketchup_bottle", "dress_shirt", "dog_face", "round_table")


def export_plain(root: Path, names: tuple[str, ...], out: Path) -> Path:
    """The categories ``names`` of an MP-100 root as one COCO file ``out/coco.json``, images flat in
    ``out/images``; returns the json's path."""
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    seen: dict[str, set] = {key: set() for key in coco}
    for k in SPLITS:
        for subset in SUBSETS:
            data = json.loads(annotation_path(root, k, subset).read_text())
            cats = {c["id"] for c in data["categories"] if c["name"] in names}
            anns = [a for a in data["annotations"] if a["category_id"] in cats]
            used = {a["image_id"] for a in anns}
            for key, records in (("categories", [c for c in data["categories"] if c["id"] in cats]),
                                 ("annotations", anns), ("images", [i for i in data["images"] if i["id"] in used])):
                for r in records:
                    if r["id"] not in seen[key]:
                        seen[key].add(r["id"])
                        coco[key].append(copy.deepcopy(r))
    (out / "images").mkdir(parents=True)
    for im in coco["images"]:
        flat = Path(im["file_name"]).name
        shutil.copy(root / "images" / im["file_name"], out / "images" / flat)
        im["file_name"] = flat
    (out / "coco.json").write_text(json.dumps(coco))
    return out / "coco.json"


@pytest.fixture(scope="module")
def plain(synthetic_root, tmp_path_factory) -> Path:
    """``plain/coco.json`` and ``plain/images/`` (flat); tests must not modify them."""
    return export_plain(synthetic_root, CATEGORIES, tmp_path_factory.mktemp("plain")).parent


def _import(plain: Path, out: Path, *mode: str, coco: Path | None = None) -> dict:
    args = import_coco.parse_args(["--coco", str(coco or plain / "coco.json"), "--images", str(plain / "images"),
                                   "--out", str(out), *mode])
    return import_coco.import_coco(args)


def _file(root: Path, k: int, subset: str) -> dict:
    return json.loads(annotation_path(root, k, subset).read_text())


def _names(root: Path, k: int, subset: str) -> set[str]:
    return {c["name"] for c in _file(root, k, subset)["categories"]}


def _source(plain: Path) -> dict:
    return json.loads((plain / "coco.json").read_text())


def test_test_categories_import_holds_exactly_those_categories_and_validates(plain, tmp_path, capsys):
    root = tmp_path / "own"
    _import(plain, root, "--test-categories", "dog_face", "--val-categories", "round table")
    printed = capsys.readouterr().out
    assert "splits 2-5: copies of split 1" in printed
    assert any(line.split()[:2] == ["1", "test"] and line.endswith("dog_face") for line in printed.splitlines())
    assert _names(root, 1, "test") == {"dog_face"}
    assert _names(root, 1, "val") == {"round_table"}
    assert _names(root, 1, "train") == {"ketchup_bottle", "dress_shirt"}
    src = _source(plain)
    total = sum(len(_file(root, 1, s)["annotations"]) for s in SUBSETS)
    assert total == len(src["annotations"])
    for k in SPLITS[1:]:  # one split given: the other four are copies of it
        for s in SUBSETS:
            copied, first = _file(root, k, s), _file(root, 1, s)
            assert copied.pop("info")["copy_of_split"] == 1 and "copy_of_split" not in first.pop("info")
            assert copied == first
    image = next(p for p in (root / "images").iterdir())
    assert image.is_symlink() and image.resolve() == (plain / "images" / image.name).resolve()
    report = validate(root, progress=False)
    assert report["ok"] and report["errors"] == 0, report["problems"]


def test_test_categories_without_val_give_the_test_subset_as_val(plain, tmp_path):
    root = tmp_path / "own"
    _import(plain, root, "--test-categories", "dog_face,round_table")
    val, test = _file(root, 1, "val"), _file(root, 1, "test")
    assert val.pop("info")["subset"] == "val" and test.pop("info")["subset"] == "test"
    assert val == test
    assert validate(root, progress=False)["ok"]


def test_split_file_writes_each_given_split_and_copies_split_1_into_the_rest(plain, tmp_path):
    spec = tmp_path / "splits.json"
    spec.write_text(json.dumps([
        {"test": ["dog_face"], "val": ["round_table"]},
        {"train": ["dog_face", "round_table"], "val": ["ketchup_bottle"], "test": ["dress_shirt"]},
    ]))
    root = tmp_path / "own"
    summary = _import(plain, root, "--split-file", str(spec))
    assert set(summary) == {"1", "2"}
    assert _names(root, 1, "train") == {"ketchup_bottle", "dress_shirt"}  # no "train": the rest
    assert (_names(root, 2, "train"), _names(root, 2, "val"), _names(root, 2, "test")) == \
        ({"dog_face", "round_table"}, {"ketchup_bottle"}, {"dress_shirt"})
    for k in (3, 4, 5):
        assert _names(root, k, "test") == {"dog_face"}
    assert validate(root, progress=False)["ok"]


def test_by_image_holds_out_images_of_the_same_categories_seeded(plain, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, "0"), (b, "0"), (c, "1")):
        _import(plain, root, "--by-image", "--test-fraction", "0.3", "--val-fraction", "0.2", "--seed", seed,
                *(["--copy"] if root == c else []))
    images = {s: {im["file_name"] for im in _file(a, 1, s)["images"]} for s in SUBSETS}
    assert not images["train"] & images["test"] and not images["train"] & images["val"]
    assert not images["val"] & images["test"]
    assert set().union(*images.values()) == {im["file_name"] for im in _source(plain)["images"]}
    assert len(images["test"]) == 4 * round(0.3 * 30) and len(images["val"]) == 4 * round(0.2 * 30)
    ids = {s: {cat["id"] for cat in _file(a, 1, s)["categories"]} for s in SUBSETS}
    assert not ids["train"] & ids["test"] and not ids["val"] & ids["test"]  # one id per subset
    assert all(_names(a, 1, s) == set(CATEGORIES) for s in SUBSETS)
    test = load_split(a, 1, "test")
    assert {cat.keypoints for cat in test.categories.values()} == \
        {cat.keypoints for cat in load_split(a, 1, "train").categories.values()}
    assert annotation_path(a, 1, "test").read_bytes() == annotation_path(b, 1, "test").read_bytes()
    assert _file(c, 1, "test")["images"] != _file(a, 1, "test")["images"]
    assert not any(p.is_symlink() for p in (c / "images").iterdir())  # --copy
    assert validate(a, progress=False)["ok"]


def test_real_export_variants_are_normalised(plain, tmp_path):
    """Two exports with overlapping image ids, visibility 0/1 and 0/1/2, no num_keypoints, area, bbox or
    image size, names with '_', file names in sub-folders, a 1-based skeleton."""
    src = _source(plain)
    images = tmp_path / "images"
    shutil.copytree(plain / "images", images / "batch one")
    files = []
    for n, names in enumerate((CATEGORIES[:2], CATEGORIES[2:])):
        cats = [copy.deepcopy(c) for c in src["categories"] if c["name"] in names]
        ids = {c["id"] for c in cats}
        anns = [copy.deepcopy(a) for a in src["annotations"] if a["category_id"] in ids]
        used = sorted({a["image_id"] for a in anns})
        renumber = {old: i + 1 for i, old in enumerate(used)}  # both files count their images from 1
        ims = [{"id": renumber[im["id"]], "file_name": f"batch one/{im['file_name']}"}
               for im in src["images"] if im["id"] in renumber]
        for a in anns:
            a["image_id"] = renumber[a["image_id"]]
            for key in ("num_keypoints", "area") + (("bbox",) if n else ()):
                a.pop(key, None)
            if n == 0:  # visibility 0/1
                a["keypoints"][2::3] = [min(1, v) for v in a["keypoints"][2::3]]
        if n == 1:
            for c in cats:
                c["keypoints"] = [k.replace(" ", "_") for k in c["keypoints"]]
                c["skeleton"] = [[i + 1, j + 1] for i, j in c["skeleton"]]
        files.append(tmp_path / f"export{n}.json")
        files[-1].write_text(json.dumps({"images": ims, "annotations": anns, "categories": cats}))
    root = tmp_path / "own"
    args = import_coco.parse_args(["--coco", str(files[0]), "--coco", str(files[1]), "--images", str(images),
                                   "--out", str(root), "--test-categories", "dog_face"])
    import_coco.import_coco(args)
    ours = {s: load_split(root, 1, s) for s in SUBSETS}
    assert sum(len(ours[s].samples) for s in ("train", "test")) == len(src["annotations"])
    assert len({s.image_id for sub in ours.values() for s in sub.samples}) == len(src["images"])
    assert all(s.file_name.startswith("batch one/") for s in ours["test"].samples)
    dog = next(c for c in ours["test"].categories.values())
    original = next(c for c in src["categories"] if c["name"] == "dog_face")
    assert [list(e) for e in dog.skeleton] == original["skeleton"]  # 1-based read back as 0-based
    assert list(dog.keypoints) == original["keypoints"]  # '_' read as spaces
    assert validate(root, progress=False)["ok"]


def test_imported_root_runs_shard_embed_train_evaluate(plain, ray_local, tmp_path, monkeypatch, capsys):
    from capenext.config import load_preset
    from jobs import evaluate, train
    from pipelines.embed import run as embed
    from pipelines.shard import run as shard

    root = tmp_path / "own"
    _import(plain, root, "--by-image", "--test-fraction", "0.3", "--val-fraction", "0.2")
    shard(root, tmp_path / "shards", progress=False)
    embed(tmp_path / "shards", tmp_path / "emb", load_preset("tiny"), batch_size=64, progress=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = ["--shards", str(tmp_path / "shards"), "--embeddings", str(tmp_path / "emb")]
    with pytest.raises(SystemExit) as exc:
        run_main(train.main, ["--split", "1", *data, "--backbone", "tiny", "--clip-model", "tiny",
                              "--clip-checkpoint", "random", "--epochs", "1", "--max-steps", "2", "--local",
                              "--val-episodes", "1", "--episodes", "2", "--queries", "4",
                              "--run-name", "own"])
    assert exc.value.code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["test/pck_0.2"] <= 1.0
    with pytest.raises(SystemExit) as exc:
        run_main(evaluate.main, ["--checkpoint", "runs/own/artifacts/final.pt", *data, "--episodes", "2",
                                 "--queries", "4", "--pictures", "0", "--no-mlflow", "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert rows[0]["test/pck_0.2"] == pytest.approx(result["test/pck_0.2"])  # the run's own test protocol


# ---------------------------------------------------------------- refusals


def _edit(src: dict, case: str) -> tuple[dict, list[str], list[str]]:
    """A broken copy of the export, the split options, and what the one line must name."""
    data = copy.deepcopy(src)
    cat, ann, im = data["categories"][0], data["annotations"][0], data["images"][0]
    mode = ["--test-categories", "dog_face"]
    if case == "no keypoint names":
        cat["keypoints"] = []
        return data, mode, [f"category {cat['id']}", "no keypoint names"]
    if case == "skeleton out of range":
        cat["skeleton"] = [[0, len(cat["keypoints"]) + 3]]
        return data, mode, [f"category {cat['id']}", "skeleton index out of range"]
    if case == "skeleton fits neither numbering":
        cat["skeleton"] = [[0, 1], [1, len(cat["keypoints"])]]
        return data, mode, [f"category {cat['id']}", "skeleton index out of range", "1-based"]
    if case == "keypoint length":
        ann["keypoints"] = ann["keypoints"][:-3]
        return data, mode, [f"annotation {ann['id']}", "keypoints has"]
    if case == "missing image":
        im["file_name"] = "not_there.jpg"
        return data, mode, [f"image {im['id']}", "not_there.jpg", "not found"]
    if case == "NaN bbox":  # json.loads reads NaN and Infinity; they must not reach the written json
        ann["bbox"] = [float("nan"), 1.0, 10.0, 10.0]
        return data, mode, [f"annotation {ann['id']}", "bbox must be 4 finite numbers"]
    if case == "infinite bbox":
        ann["bbox"] = [1.0, 1.0, float("inf"), 10.0]
        return data, mode, [f"annotation {ann['id']}", "bbox must be 4 finite numbers"]
    if case == "infinite area":
        ann["area"] = float("-inf")
        return data, mode, [f"annotation {ann['id']}", "area must be a finite number"]
    if case == "unknown category":
        return data, ["--test-categories", "zebra"], ["zebra", "no category", "dog_face"]
    if case == "category in two subsets":
        return data, ["--test-categories", "dog_face", "--val-categories", "dog_face"], \
            ["dog_face", "both test and val"]
    raise AssertionError(case)


BAD = ("no keypoint names", "skeleton out of range", "skeleton fits neither numbering", "keypoint length",
       "missing image", "NaN bbox", "infinite bbox", "infinite area", "unknown category", "category in two subsets")


@pytest.mark.parametrize("case", BAD)
def test_bad_export_is_one_line_and_writes_nothing(plain, tmp_path, capsys, case):
    data, mode, fragments = _edit(_source(plain), case)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "own"
    with pytest.raises(SystemExit) as exc:
        run_main(import_coco.main, ["--coco", str(bad), "--images", str(plain / "images"), "--out", str(out), *mode])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    if case not in ("unknown category", "category in two subsets"):
        assert str(bad) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # no root, no temporary folder


def test_refusal_from_the_command_line_is_one_line(plain, tmp_path):
    data, mode, fragments = _edit(_source(plain), "keypoint length")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    proc = run_cli("pipelines.import_coco", "--coco", str(bad), "--images", str(plain / "images"),
                   "--out", str(tmp_path / "own"), *mode)
    assert proc.returncode == 2
    assert_one_line_error(proc, str(bad), *fragments)
    assert not (tmp_path / "own").exists()


@pytest.mark.parametrize("link", ["file", "folder"])
def test_image_symlinked_out_of_images_is_one_line_and_writes_nothing(plain, tmp_path, capsys, link):
    """A file (or a sub-folder) under --images that links outside it is refused, naming the file and the image
    id: the import would otherwise copy or link whatever it points at into the root (and then the shards)."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    shutil.copytree(plain / "images", images)
    outside.mkdir()
    data = _source(plain)
    im = data["images"][0]
    shutil.move(images / im["file_name"], outside / im["file_name"])  # a real image, just not under --images
    if link == "file":
        (images / im["file_name"]).symlink_to(outside / im["file_name"])
    else:
        (images / "sub").symlink_to(outside, target_is_directory=True)
        im["file_name"] = f"sub/{im['file_name']}"
    src = tmp_path / "coco.json"
    src.write_text(json.dumps(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    for copy_flag in ([], ["--copy"]):
        with pytest.raises(SystemExit) as exc:
            run_main(import_coco.main, ["--coco", str(src), "--images", str(images), "--out", str(tmp_path / "own"),
                                        "--test-categories", "dog_face", *copy_flag])
        err = capsys.readouterr().err
        assert exc.value.code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        for frag in (str(src), f"image {im['id']}", im["file_name"], "outside --images"):
            assert frag in lines[0], (frag, lines[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no root, no temporary folder
