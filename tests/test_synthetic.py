"""Tests for pipelines.synthetic: layout, determinism, splits, vocabulary and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipelines import synthetic as syn, synthetic_categories as cat
from pipelines.synthetic_render import draw_scene
from tests.conftest import in_process

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The default dataset (20 categories x 30 images), generated once for the module."""
    out = tmp_path_factory.mktemp("synthetic")
    summary = syn.generate(out, seed=0, progress=False)
    files = {(split, subset): json.loads(syn.annotation_path(out, split, subset).read_text())
             for split in syn.SPLITS for subset in syn.SUBSETS}
    return out, summary, files


def _all(files: dict, key: str, split: int = 1) -> list[dict]:
    """Every entry of ``key`` over the three subsets of one split (which partition the data)."""
    return [entry for subset in syn.SUBSETS for entry in files[(split, subset)][key]]


def test_fifteen_annotation_files_in_mp100_layout(dataset):
    out, summary, files = dataset
    names = sorted(p.name for p in (out / "annotations").iterdir())
    assert names == sorted(f"mp100_split{s}_{t}.json" for s in range(1, 6) for t in syn.SUBSETS)
    assert summary["categories"] == 20 and summary["images"] == 600
    for split in syn.SPLITS:
        assert len(_all(files, "images", split)) == 600
        assert len(_all(files, "annotations", split)) == summary["annotations"]


def test_every_image_decodes_with_the_json_size(dataset):
    out, _, files = dataset
    for record in _all(files, "images"):
        assert not Path(record["file_name"]).is_absolute()
        folder, _ = record["file_name"].split("/")
        with Image.open(out / "images" / record["file_name"]) as image:
            image.load()
            assert image.format == "JPEG"
            assert image.size == (record["width"], record["height"])
        assert 128 <= record["width"] <= 256 and 128 <= record["height"] <= 256
        assert folder in {c["name"] for c in _all(files, "categories")}


def test_annotations_are_valid_coco_keypoints(dataset):
    _, _, files = dataset
    for (split, subset), data in files.items():
        categories = {c["id"]: c for c in data["categories"]}
        images = {r["id"]: r for r in data["images"]}
        for category in categories.values():
            k = len(category["keypoints"])
            assert 5 <= k <= 20 and len(set(category["keypoints"])) == k
            assert category["skeleton"]
            assert all(0 <= a < k and 0 <= b < k and a != b for a, b in category["skeleton"])
        for ann in data["annotations"]:
            category, image = categories[ann["category_id"]], images[ann["image_id"]]
            kps = ann["keypoints"]
            assert len(kps) == 3 * len(category["keypoints"])
            triples = [kps[i:i + 3] for i in range(0, len(kps), 3)]
            assert all(v in (0, 1, 2) for _, _, v in triples)
            assert all(t == [0, 0, 0] for t in triples if t[2] == 0)
            assert all(0 <= x < image["width"] and 0 <= y < image["height"]
                       for x, y, v in triples if v > 0)
            assert ann["num_keypoints"] == sum(v > 0 for _, _, v in triples) > 0
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= image["width"] + 1e-6 and y + h <= image["height"] + 1e-6
            assert ann["area"] > 0 and ann["iscrowd"] == 0


def test_ids_are_unique_and_non_contiguous(dataset):
    _, _, files = dataset
    for key in ("images", "annotations", "categories"):
        ids = [entry["id"] for entry in _all(files, key)]
        assert len(ids) == len(set(ids))
        assert max(ids) - min(ids) + 1 > len(ids), f"{key} ids have no gaps"


def test_each_file_holds_only_its_own_categories(dataset):
    _, _, files = dataset
    for data in files.values():
        category_ids = {c["id"] for c in data["categories"]}
        image_ids = {r["id"] for r in data["images"]}
        assert {a["category_id"] for a in data["annotations"]} == category_ids
        assert {a["image_id"] for a in data["annotations"]} == image_ids


def test_splits_are_category_disjoint_and_tests_cover_everything(dataset):
    _, _, files = dataset

    def members(split: int, subset: str) -> set[str]:
        return {c["name"] for c in files[(split, subset)]["categories"]}

    everything = set().union(*(members(1, subset) for subset in syn.SUBSETS))
    assert len(everything) == 20
    tests, vals = [], []
    for split in syn.SPLITS:
        train, val, test = (members(split, subset) for subset in syn.SUBSETS)
        assert (len(train), len(val), len(test)) == (14, 2, 4)
        assert not (train & val or train & test or val & test)
        supers = {s: {c["supercategory"] for c in files[(split, s)]["categories"]} for s in ("train", "test")}
        assert supers["train"] & supers["test"], "a test set has no supercategory seen in training"
        tests.append(test)
        vals.append(frozenset(val))
    assert set().union(*tests) == everything and sum(map(len, tests)) == 20
    assert len(set(vals)) == 5


def test_vocabulary_is_shared_polysemous_and_prompts_carry_meaning(dataset):
    _, _, files = dataset
    categories = _all(files, "categories")
    users = Counter(name for c in categories for name in c["keypoints"])
    assert max(users.values()) >= 3
    supers_of = defaultdict(set)
    for c in categories:
        for name in c["keypoints"]:
            supers_of[name].add(c["supercategory"])
        assert set(c["name"].split("_")) & set(c["supercategory"].split("_")), c["name"]
    polysemous = [name for name in cat.POLYSEMOUS if len(supers_of[name]) >= 2]
    assert polysemous
    for name in polysemous:
        glyphs = {cat.glyph_id(name, s) for s in supers_of[name]}
        assert len(glyphs) == len(supers_of[name]), f"{name} looks the same in several supercategories"
    assert cat.glyph_id("nose", "animal_face") == cat.glyph_id("nose", "animal_body")
    assert len(cat.GLYPH_KEYS) <= 12 * 8, "two names would share a glyph"


def test_categories_list_their_polysemous_keypoints_and_the_reader_keeps_them(dataset):
    from capenext.data.mp100 import load_split

    out, _, files = dataset
    for c in _all(files, "categories"):
        expected = [k for k, name in enumerate(c["keypoints"]) if name in cat.POLYSEMOUS]
        assert c.get("polysemous_keypoints", []) == expected, c["name"]
        assert "polysemous_keypoints" in c or not expected  # written only when there are some
    read = load_split(out, 1, "test").categories
    assert {cid: list(c.polysemous) for cid, c in read.items()} == {
        c["id"]: c.get("polysemous_keypoints", []) for c in files[(1, "test")]["categories"]}
    assert any(c.polysemous for c in read.values()) and not all(c.polysemous for c in read.values())


@pytest.fixture(scope="module")
def polysemy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default dataset's images and categories under ``--split-rule polysemy``."""
    out = tmp_path_factory.mktemp("polysemy")
    syn.generate(out, seed=0, progress=False, split_rule="polysemy")
    return out, {(split, subset): json.loads(syn.annotation_path(out, split, subset).read_text())
                 for split in syn.SPLITS for subset in syn.SUBSETS}


def test_polysemy_rule_holds_in_every_split(polysemy):
    """Every test category shares a polysemous name with a training category of another supercategory and
    has a training category of its own supercategory; read from the files, names from polysemous_keypoints."""
    _, files = polysemy

    def polysemous(c: dict) -> set[str]:
        return {c["keypoints"][k] for k in c.get("polysemous_keypoints", [])}

    tests = []
    for split in syn.SPLITS:
        train, val, test = (files[(split, subset)]["categories"] for subset in syn.SUBSETS)
        assert (len(train), len(val), len(test)) == (14, 2, 4)
        names = [{c["name"] for c in group} for group in (train, val, test)]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        assert len(set().union(*names)) == 20
        for c in test:
            others = [t for t in train if t["supercategory"] != c["supercategory"]]
            assert len(others) < len(train), f"split {split}: {c['name']}'s supercategory is not in training"
            assert any(polysemous(c) & polysemous(t) for t in others), f"split {split}: {c['name']}"
        assert all(files[(split, s)]["info"]["split_rule"] == "polysemy" for s in syn.SUBSETS)
        tests.append(frozenset(names[2]))
    assert len(set(tests)) == 5, "two splits test the same categories"


def test_polysemy_rule_changes_only_the_splits(polysemy, dataset):
    """Same images (bytes), annotations and categories as the default set; only membership and info differ."""
    out, files = polysemy
    default_out, _, default = dataset
    for key in ("images", "annotations", "categories"):
        ours = sorted(json.dumps(e, sort_keys=True) for e in _all(files, key))
        assert ours == sorted(json.dumps(e, sort_keys=True) for e in _all(default, key)), key
    assert _snapshot(out / "images") == _snapshot(default_out / "images")
    assert all("split_rule" not in data["info"] for data in default.values())  # the default files as before
    assert any(files[k]["categories"] != default[k]["categories"] for k in files)


def test_polysemy_split_is_deterministic_and_default_is_the_default(tmp_path):
    small = {"categories": 10, "images_per_category": 2, "progress": False}
    syn.generate(tmp_path / "a", seed=3, split_rule="polysemy", **small)
    syn.generate(tmp_path / "b", seed=3, split_rule="polysemy", **small)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    syn.generate(tmp_path / "c", seed=3, **small)
    syn.generate(tmp_path / "d", seed=3, split_rule="default", **small)
    assert _snapshot(tmp_path / "c") == _snapshot(tmp_path / "d")


def test_polysemy_split_without_enough_categories_is_one_line_naming_categories(tmp_path):
    plain = [c for c in cat.make_categories(0, 20) if not c.polysemous_names]  # faces and hands only
    with pytest.raises(ValueError, match=r"^[^\n]*\(--categories\)$"):
        syn._polysemy_splits(plain, 0)
    with pytest.raises(ValueError, match=r"\(--split-rule\)"):
        syn.generate(tmp_path, split_rule="random", progress=False)
    assert not list(tmp_path.iterdir())


def test_invisible_keypoints_and_multi_instance_images(dataset):
    _, _, files = dataset
    annotations = _all(files, "annotations")
    assert any(v == 0 for a in annotations for v in a["keypoints"][2::3])
    per_image = Counter(a["image_id"] for a in annotations)
    pairs = [i for i, n in per_image.items() if n == 2]
    assert pairs and max(per_image.values()) == 2
    by_image = defaultdict(set)
    for a in annotations:
        by_image[a["image_id"]].add(a["category_id"])
    assert all(len(by_image[i]) == 1 for i in pairs)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_rerun_overwrites(tmp_path):
    small = {"categories": 10, "images_per_category": 3, "progress": False}
    syn.generate(tmp_path / "a", seed=1, **small)
    first = _snapshot(tmp_path / "a")
    syn.generate(tmp_path / "a", seed=1, **small)
    assert _snapshot(tmp_path / "a") == first
    assert not [name for name in first if ".tmp" in name]
    syn.generate(tmp_path / "b", seed=2, **small)
    other = _snapshot(tmp_path / "b")
    json_name = "annotations/mp100_split1_train.json"
    assert other[json_name] != first[json_name]


def test_generate_rejects_out_of_range_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"\(--categories\)"):
        syn.generate(tmp_path, categories=9, progress=False)
    with pytest.raises(ValueError, match=r"\(--images-per-category\)"):
        syn.generate(tmp_path, images_per_category=1, progress=False)
    assert not list(tmp_path.iterdir())


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pipelines.synthetic ARGS`` as a user runs it: a real process."""
    return subprocess.run([sys.executable, "-m", "pipelines.synthetic", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _in_process(argv: list[str], capsys, monkeypatch) -> SimpleNamespace:
    """``python -m pipelines.synthetic ARGV`` in this process: exit code, stdout, stderr."""
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps help as in a real process whose output is a pipe
    return in_process(syn.main, argv, capsys, monkeypatch)


def test_cli_help_and_one_line_errors(tmp_path, capsys, monkeypatch):
    shown = _in_process(["--help"], capsys, monkeypatch)
    assert shown.returncode == 0 and "--full-size" in shown.stdout and "--mp100-sized" in shown.stdout
    assert "--split-rule {default,polysemy}" in shown.stdout
    # the entry point's one real process (the others run in this one): the one error line and exit code 2
    too_few = _cli("--out", str(tmp_path / "x"), "--categories", "5")
    assert too_few.returncode == 2
    assert too_few.stderr.strip().count("\n") == 0
    assert too_few.stderr.startswith("error: categories")
    assert too_few.stderr.strip().endswith("(--categories)")
    assert not (tmp_path / "x").exists()
    not_a_number = _in_process(["--out", str(tmp_path / "x"), "--categories", "five"], capsys, monkeypatch)
    assert not_a_number.returncode == 2 and "error:" in not_a_number.stderr
    assert not (tmp_path / "x").exists()


def test_template_file_schema():
    data = json.loads(cat.TEMPLATES_PATH.read_text())
    assert set(data) == {"polysemous", "templates", "glyph_shapes", "glyph_fills"}
    supers_of = defaultdict(set)
    for t in data["templates"]:
        assert {"supercategory", "head", "modifiers", "parts", "limb", "max_rotation"} <= set(t)
        assert set(t) <= set(cat.Template.__dataclass_fields__)
        assert t["supercategory"].endswith(t["head"])
        assert len(set(t["modifiers"])) == len(t["modifiers"]) >= 5
        names = [part["name"] for part in t["parts"]]
        assert len(set(names)) == len(names)
        assert t["parts"][0].get("parent") is None
        for k, part in enumerate(t["parts"][1:], start=1):
            assert set(part) <= set(cat.Part.__dataclass_fields__)
            assert part["parent"] in names[:k], f"{t['supercategory']}: {part['name']} before its parent"
            assert 0 <= part.get("joint", 0) <= 90
        required = [part for part in t["parts"] if not part.get("optional")]
        assert 6 <= len(required) and len(names) <= 16
        for polygon in t.get("polygons", []):
            assert len(polygon) >= 3 and set(polygon) <= set(names)
        assert all(a in names and b in names and a != b for a, b in t.get("extra_edges", []))
        assert all(name in names and radius > 0 for name, radius in t.get("discs", []))
        for name in names:
            supers_of[name].add(t["supercategory"])
    assert all(len(supers_of[name]) >= 2 for name in data["polysemous"])
    assert len(cat.GLYPH_KEYS) <= len(data["glyph_shapes"]) * len(data["glyph_fills"])
    for shape in syn.GLYPHS.shapes:
        assert shape.ndim == 2 and shape.shape[1] == 2 and len(shape) >= 3
        assert abs(shape).max() <= 1.5
    for fill in data["glyph_fills"]:
        colours = [fill["outer"]] + [c for _, c in fill.get("inner", []) + fill.get("bars", [])]
        assert set(colours) <= {"fg", "bg"}


def test_mp100_sized_images_are_camera_sized_with_valid_annotations(tmp_path):
    tiny = {"categories": 10, "images_per_category": 2, "mp100_sized": True, "progress": False}
    syn.generate(tmp_path / "a", **tiny)
    syn.generate(tmp_path / "b", **tiny)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    root = tmp_path / "a"
    files = [json.loads(syn.annotation_path(root, 1, subset).read_text()) for subset in syn.SUBSETS]
    images = {r["id"]: r for data in files for r in data["images"]}
    annotations = [a for data in files for a in data["annotations"]]
    assert len(images) == 20 and annotations
    for record in images.values():
        long_side, short_side = max(record["width"], record["height"]), min(record["width"], record["height"])
        assert 600 <= long_side <= 1600 and 1.0 <= long_side / short_side <= 1.8
        with Image.open(root / "images" / record["file_name"]) as image:
            assert image.format == "JPEG" and image.size == (record["width"], record["height"])
    assert len({(r["width"], r["height"]) for r in images.values()}) > 10
    for ann in annotations:
        image = images[ann["image_id"]]
        triples = [ann["keypoints"][i:i + 3] for i in range(0, len(ann["keypoints"]), 3)]
        assert all(0 <= x < image["width"] and 0 <= y < image["height"] for x, y, v in triples if v > 0)
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= image["width"] + 1e-6 and y + h <= image["height"] + 1e-6
    long_sides = sorted(max(a["bbox"][2:]) for a in annotations)
    assert long_sides[len(long_sides) // 2] > 256, "objects are small next to the 256-px model crop"


def test_draw_scene_is_deterministic_and_describes_each_instance():
    categories = cat.make_categories(seed=0, count=10)
    size = np.array([200, 150])
    scenes = [draw_scene(categories[0], categories, np.random.default_rng(7), size, syn.GLYPHS)
              for _ in range(2)]
    assert scenes[0].image.tobytes() == scenes[1].image.tobytes()
    for scene in scenes:
        assert scene.image.size == (200, 150)
        assert len(scene.instances) == len(scene.visible) == len(scene.masks) >= 1
        for instance, visible, mask in zip(scene.instances, scene.visible, scene.masks):
            assert instance.category is categories[0] and mask.size == scene.image.size
            shown = instance.points[list(instance.category.kept)][visible]
            assert np.all((shown >= 0) & (shown < size))
