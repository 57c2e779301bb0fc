"""The MP-100 data layer on real files: reading and cleaning, the crop, targets, pairs and episodes."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from capenext.config import DataCfg
from capenext.data import (
    SPLITS,
    SUBSETS,
    DataError,
    PairDataset,
    annotation_path,
    episodes,
    load_split,
    load_subset,
    training_pairs,
)
from capenext.data.dataset import make_item
from capenext.data.mp100 import Category, Sample
from capenext.data.transforms import clean_bbox
from capenext.data.transforms import apply_affine, crop, heatmap_targets, target_weights
from tests.conftest import assert_one_line_error, in_process


def _expected_clean_count(path: Path) -> int:
    """Cleaned annotations counted straight from the json, independently of the reader."""
    data = json.loads(path.read_text())
    images = {im["id"]: im for im in data["images"]}
    n = 0
    for a in data["annotations"]:
        kp = np.asarray(a["keypoints"], dtype=float)
        im = images[a["image_id"]]
        if a["num_keypoints"] == 0 or kp.max() <= 0 or a["area"] <= 0:
            continue
        x, y, w, h = a["bbox"]
        x1, y1 = max(0, x), max(0, y)
        x2, y2 = min(im["width"] - 1, x1 + max(0, w - 1)), min(im["height"] - 1, y1 + max(0, h - 1))
        n += x2 > x1 and y2 > y1
    return n


@pytest.mark.parametrize("split", SPLITS)
def test_reader_sample_counts_match_json_after_cleaning(synthetic_root, split):
    for subset in SUBSETS:
        path = annotation_path(synthetic_root, split, subset)
        data = load_split(synthetic_root, split, subset)
        raw = json.loads(path.read_text())
        assert len(data.samples) == _expected_clean_count(path)
        assert len(data.samples) + sum(data.dropped.values()) == len(raw["annotations"])
        assert set(data.categories) == {c["id"] for c in raw["categories"]}
        for s in data.samples:
            assert s.keypoints.shape == (data.categories[s.category_id].num_keypoints, 3)
            assert set(np.unique(s.keypoints[:, 2])) <= {0.0, 1.0}
            assert data.image_path(s).is_file()


def test_splits_are_category_disjoint_and_tests_cover_every_category(synthetic_root):
    every = set()
    tests = set()
    for split in SPLITS:
        cats = {s: set(load_split(synthetic_root, split, s).categories) for s in SUBSETS}
        assert not cats["train"] & cats["val"] and not cats["train"] & cats["test"]
        assert not cats["val"] & cats["test"]
        total = sum(len(c) for c in cats.values())
        assert [len(cats[s]) for s in SUBSETS] == [round(total * 0.7), round(total * 0.1), round(total * 0.2)]
        every |= cats["train"] | cats["val"] | cats["test"]
        tests |= cats["test"]
    assert tests == every


def test_keypoint_and_class_text_use_spaces_for_underscores(tmp_path, synthetic_root):
    desc = {}
    data = load_split(synthetic_root, 1, "test")
    cat = next(iter(data.categories.values()))
    desc[cat.name] = [f"part_{i}_of_it" for i in range(cat.num_keypoints)]
    (tmp_path / "desc.json").write_text(json.dumps(desc))
    again = load_split(synthetic_root, 1, "test", descriptions=tmp_path / "desc.json")
    assert again.categories[cat.id].keypoints[0] == "part 0 of it"
    assert "_" not in again.categories[cat.id].class_text


def test_clean_bbox_follows_the_reference():
    assert clean_bbox([-5, 10, 20, 30], 100, 100) == (0.0, 10.0, 19.0, 29.0)
    assert clean_bbox([90, 90, 50, 50], 100, 100) == (90.0, 90.0, 9.0, 9.0)
    assert clean_bbox([10, 10, 1, 30], 100, 100) is None  # x2 == x1
    assert clean_bbox([200, 10, 10, 10], 100, 100) is None


@pytest.mark.parametrize("rot", [0.0, 25.0, -30.0])
@pytest.mark.parametrize("scale", [0.85, 1.0, 1.15])
def test_crop_then_inverse_transform_is_within_half_a_pixel(rot, scale):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(180, 240, 3), dtype=np.uint8)
    bbox = (30.0, 40.0, 120.0, 70.0)
    pts = np.stack([rng.uniform(30, 150, 50), rng.uniform(40, 110, 50)], axis=1)
    c = crop(image, bbox, 256, scale=scale, rot_deg=rot)
    back = apply_affine(apply_affine(pts, c.matrix), c.inverse)
    assert np.abs(back - pts).max() < 0.5
    # the box centre lands on the crop centre
    assert np.allclose(apply_affine(np.array([90.0, 75.0]), c.matrix), [128, 128])


def test_crop_content_follows_the_transform():
    """A bright pixel in the image appears where the affine map sends it."""
    image = np.zeros((200, 200, 3), dtype=np.uint8)
    image[60:63, 120:123] = 255  # centre (121, 61)
    c = crop(image, (50.0, 30.0, 100.0, 100.0), 128, rot_deg=20.0)
    x, y = apply_affine(np.array([121.0, 61.0]), c.matrix)
    plane = c.image[0]
    iy, ix = np.unravel_index(plane.argmax(), plane.shape)
    assert abs(ix - x) <= 1.5 and abs(iy - y) <= 1.5


def test_heatmap_peaks_sit_at_the_keypoints():
    pts = np.array([[10.0, 20.0], [100.3, 200.7], [251.0, 0.0], [-40.0, 50.0], [50.0, 50.0]])
    vis = np.array([True, True, True, True, False])
    heat, weight = heatmap_targets(pts, vis, image_size=256, heatmap_size=64, sigma=1.0)
    assert heat.shape == (5, 64, 64)
    assert weight.tolist() == [1, 1, 1, 0, 0]  # far outside, or invisible → weight 0
    for j in range(3):
        iy, ix = np.unravel_index(heat[j].argmax(), heat[j].shape)
        assert heat[j].max() == pytest.approx(1.0)
        assert (ix, iy) == (int(pts[j, 0] / 4 + 0.5), int(pts[j, 1] / 4 + 0.5))
    assert heat[3].max() == 0 and heat[4].max() == 0


def test_items_carry_targets_in_padded_slots(synthetic_root):
    data = load_split(synthetic_root, 1, "train")
    cfg = DataCfg(image_size=128, heatmap_size=32)
    pairs = training_pairs(data.by_category(), seed=0, epoch=0)[:4]
    ds = PairDataset(data, pairs, cfg)
    item = ds[0]
    q = data.samples[int(pairs[0, 0])]
    k = data.categories[q.category_id].num_keypoints
    assert item["img"].shape == (3, 128, 128)
    assert item["heatmap"].shape == (100, 32, 32)
    assert not item["kp_mask"][k:].any() and item["query_weight"][k:].sum() == 0
    # the target points, mapped back to image pixels, are the annotation's keypoints
    xy = item["points"][:k].double().numpy() * 128
    back = apply_affine(xy, item["inverse"].double().numpy())
    vis = q.visible
    assert np.abs(back[vis] - q.keypoints[vis, :2]).max() < 0.05
    # heatmap peaks of weighted slots sit at the target points
    for j in np.flatnonzero(item["query_weight"].numpy()):
        iy, ix = np.unravel_index(int(item["heatmap"][j].argmax()), (32, 32))
        assert abs(ix - item["points"][j, 0] * 32) <= 0.5 + 1e-6
        assert abs(iy - item["points"][j, 1] * 32) <= 0.5 + 1e-6


def test_training_items_are_deterministic_per_seed_epoch_index(synthetic_root):
    data = load_split(synthetic_root, 1, "train")
    cfg = DataCfg(image_size=64, heatmap_size=16)
    pairs = training_pairs(data.by_category(), seed=3, epoch=0)[:6]
    a = PairDataset(data, pairs, cfg, train=True, seed=3)
    b = PairDataset(data, pairs, cfg, train=True, seed=3)
    for key in ("img", "support_weight", "kp_mask", "support_masked"):
        assert all(torch.equal(a[i][key], b[i][key]) for i in range(6)), key
    b.set_epoch(1)
    assert not all(torch.equal(a[i]["img"], b[i]["img"]) for i in range(6))


# --- the support mask: the reference's target weight of the support after its own augmented crop ------


def reference_rule(points: np.ndarray, visible: np.ndarray, image_size: int, heatmap_size: int,
                   sigma: float) -> np.ndarray:
    """TopDownGenerateTargetFewShot's MSRA target weight, vectorised: visibility, zeroed where the
    (6σ+1)² patch around the heatmap position rounded by ``int(x + 0.5)`` (truncation) misses the map."""
    mu = np.trunc(points / (image_size / heatmap_size) + 0.5)  # (K, 2)
    upper_left, bottom_right = np.trunc(mu - 3 * sigma), np.trunc(mu + 3 * sigma + 1)
    off = (upper_left >= heatmap_size).any(1) | (bottom_right < 0).any(1)
    return (visible & ~off).astype(np.float32)


def mmpose_affine(center: np.ndarray, scale: np.ndarray, rot: float, size: int) -> np.ndarray:
    """mmpose 0.29 ``get_affine_transform(center, scale, rot, (size, size))``: three points, float32."""
    src_w = scale[0] * 200.0
    a = np.pi * rot / 180
    src_dir = np.array([-np.sin(a) * src_w * -0.5, np.cos(a) * src_w * -0.5])

    def third(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        d = p - q
        return q + np.array([-d[1], d[0]], dtype=np.float32)

    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0], src[1] = center, center + src_dir
    src[2] = third(src[0], src[1])
    dst[0], dst[1] = [size * 0.5, size * 0.5], [size * 0.5, size * 0.5 - size * 0.5]
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def spread_pair(k: int = 12) -> tuple[Category, Sample, Sample]:
    """A category and a (query, support) pair whose support keypoints run from its bbox centre to far
    outside it (the last one invisible), so that the rule keeps some and drops others."""
    cat = Category(1, "thing", "things", tuple(f"part {i}" for i in range(k)), ((0, 1),))
    t = np.linspace(0, 1, k)
    kp = np.stack([60 + 110 * t, 50 + 90 * t ** 2, np.ones(k)], 1).astype(np.float32)
    kp[-1, 2] = 0
    support = Sample(2, 2, 1, "s.jpg", 240, 200, (40.0, 30.0, 40.0, 40.0), kp)
    query = Sample(1, 1, 1, "q.jpg", 160, 120, (20.0, 10.0, 100.0, 90.0), kp.copy())
    return cat, query, support


def test_target_weight_rule_matches_the_reference_written_another_way():
    rng = np.random.default_rng(0)
    edges = np.array([-25.0, -22.4, -21.0, -18.3, -18.0, -17.9, -2.0, -0.1, 0.0, 255.9, 256.0, 265.9, 266.0,
                      267.9, 268.0, 270.1, 290.0])  # crop pixels either side of where the patch leaves
    pts = np.concatenate([np.stack(np.meshgrid(edges, edges), -1).reshape(-1, 2),
                          rng.uniform(-60, 320, (400, 2))])
    vis = rng.random(len(pts)) > 0.2
    for image_size, heatmap_size, sigma in ((256, 64, 1.0), (128, 32, 1.0), (256, 64, 2.0), (256, 48, 1.5)):
        ours = target_weights(pts, vis, image_size, heatmap_size, sigma)
        expected = reference_rule(pts, vis, image_size, heatmap_size, sigma)
        assert np.array_equal(ours, expected), (image_size, heatmap_size, sigma)
        assert 0 < (vis & (ours == 0)).sum() < vis.sum()  # the rule drops some visible points, not all
        assert np.array_equal(heatmap_targets(pts, vis, image_size, heatmap_size, sigma)[1], expected)


def test_heatmaps_are_the_references_pasted_gaussian_patches():
    rng = np.random.default_rng(1)
    pts = np.concatenate([rng.uniform(-30, 290, (300, 2)), [[-17.0, 100.0], [270.0, -16.0], [0.0, 0.0]]])
    vis = rng.random(len(pts)) > 0.1
    for heatmap_size, sigma in ((64, 1.0), (32, 2.0), (48, 1.0)):  # integer σ, as the reference's configs
        heat, weight = heatmap_targets(pts, vis, 256, heatmap_size, sigma, slots=len(pts) + 7)
        assert heat.shape == (len(pts) + 7, heatmap_size, heatmap_size) and not heat[len(pts):].any()
        tmp = sigma * 3  # TopDownGenerateTargetFewShot, MSRA: a (2·tmp+1)² patch pasted around the rounded point
        size = int(2 * tmp + 1)
        g = np.exp(-((np.arange(size)[None] - size // 2) ** 2 + (np.arange(size)[:, None] - size // 2) ** 2)
                   / (2 * sigma ** 2))
        for j in range(len(pts)):
            expected = np.zeros((heatmap_size, heatmap_size))
            if weight[j]:
                mu = np.trunc(pts[j] / (256 / heatmap_size) + 0.5).astype(int)
                ul = np.trunc(mu - tmp).astype(int)
                for dy in range(size):
                    for dx in range(size):
                        y, x = ul[1] + dy, ul[0] + dx
                        if 0 <= y < heatmap_size and 0 <= x < heatmap_size:
                            expected[y, x] = g[dy, dx]
            assert np.allclose(heat[j], expected, atol=1e-6), (heatmap_size, sigma, j)


def test_training_support_mask_is_the_reference_rule_after_the_supports_own_draw():
    cat, query, support = spread_pair()
    cfg = DataCfg(image_size=128, heatmap_size=32)
    image = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    k, masked_counts = cat.num_keypoints, []
    for seed in range(40):
        item = make_item(image, query, support, cat, cfg, np.random.default_rng([seed, 0, 3]))
        draws = np.random.default_rng([seed, 0, 3])
        per = []
        for _ in range(2):  # mmpose's TopDownGetRandomScaleRotation, query first, then the support
            s_factor = np.clip(draws.normal() * 0.15 + 1, 0.85, 1.15)
            r_factor = np.clip(draws.normal() * 15, -30, 30)
            per.append((s_factor, r_factor if draws.random() <= 0.6 else 0.0))
        s_factor, rot = per[1]
        x, y, w, h = support.bbox
        scale = np.array([max(w, h), max(w, h)]) / 200.0 * 1.25 * s_factor  # _xywh2cs, aspect 1
        m = mmpose_affine(np.array([x + 0.5 * w, y + 0.5 * h]), scale, rot, 128)
        pts = support.keypoints[:, :2] @ m[:, :2].T + m[:, 2]
        expected = reference_rule(pts, support.visible, 128, 32, 1.0)
        assert np.array_equal(item["support_weight"][:k].numpy(), expected), seed
        assert np.array_equal(item["kp_mask"][:k].numpy(), expected > 0)
        assert not item["kp_mask"][k:].any() and item["support_weight"][k:].sum() == 0
        assert int(item["support_masked"]) == int(support.visible.sum() - expected.sum())
        masked_counts.append(int(item["support_masked"]))
        # the query's crop is the first draw, as without the support's
        c = crop(image, query.bbox, 128, cfg.bbox_scale, *per[0])
        assert torch.equal(item["img"], torch.from_numpy(c.image))
    # the draw changes which support keypoints survive
    assert len(set(masked_counts)) > 1 and min(masked_counts) >= 0


def test_evaluation_support_mask_is_the_reference_rule_on_the_test_crop():
    """At evaluation the support goes through its own un-augmented test crop and the reference's target-weight
    rule, as its test pipeline does: the far keypoints of this support are masked in the model's input, and
    still scored (the PCK mask stays query AND support annotation visibility)."""
    cat, query, support = spread_pair()
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    item = make_item(image, query, support, cat, DataCfg(image_size=128, heatmap_size=32))
    k = cat.num_keypoints
    x, y, w, h = support.bbox
    m = mmpose_affine(np.array([x + 0.5 * w, y + 0.5 * h]), np.array([w, w]) / 200 * 1.25, 0.0, 128)
    expected = reference_rule(support.keypoints[:, :2] @ m[:, :2].T + m[:, 2], support.visible, 128, 32, 1.0)
    assert expected.sum() < support.visible.sum()  # the rule drops some visible keypoints of this support
    assert np.array_equal(item["support_weight"][:k].numpy(), expected)
    assert np.array_equal(item["kp_mask"][:k].numpy(), expected > 0)
    assert int(item["support_masked"]) == int(support.visible.sum() - expected.sum())
    assert np.array_equal(item["visible"][:k].numpy(), query.visible & support.visible)


def test_training_pairs_are_deterministic_and_class_balanced(synthetic_root):
    data = load_split(synthetic_root, 1, "train")
    groups = data.by_category()
    p0 = training_pairs(groups, seed=0, epoch=0)
    assert np.array_equal(p0, training_pairs(groups, seed=0, epoch=0))
    assert not np.array_equal(p0, training_pairs(groups, seed=0, epoch=1))
    largest = max(len(v) for v in groups.values())
    per_cat = Counter(data.samples[q].category_id for q, _ in p0)
    assert set(per_cat.values()) == {largest}
    assert set(per_cat) == {c for c, v in groups.items() if v}
    for q, s in p0:
        assert data.samples[q].category_id == data.samples[s].category_id
        assert q != s


def test_training_pairs_balance_uneven_categories():
    groups = {1: [0, 1, 2, 3, 4, 5], 2: [6, 7], 3: [8]}
    pairs = training_pairs(groups, seed=1, epoch=0)
    cat_of = {i: c for c, idx in groups.items() for i in idx}
    assert Counter(cat_of[int(q)] for q, _ in pairs) == {1: 6, 2: 6, 3: 6}
    assert Counter(int(q) for q, _ in pairs if cat_of[int(q)] == 2) == {6: 3, 7: 3}


def test_episodes_are_fixed_for_a_seed(synthetic_root):
    data = load_split(synthetic_root, 1, "test")
    groups = data.by_category()
    e = episodes(groups, num_episodes=5, queries=15, seed=0)
    assert np.array_equal(e, episodes(groups, num_episodes=5, queries=15, seed=0))
    assert not np.array_equal(e, episodes(groups, num_episodes=5, queries=15, seed=1))
    per_cat = Counter(data.samples[q].category_id for q, _ in e)
    for cat, idx in groups.items():
        assert per_cat[cat] == 5 * min(15, len(idx) - 1)
    # within an episode: one support, distinct queries, none equal to the support
    for block in np.split(e, len(e) // 15):
        assert len(set(block[:, 1])) == 1 and block[0, 1] not in block[:, 0]
        assert len(set(block[:, 0])) == 15
    # a category's episodes do not depend on the other categories
    one = next(iter(groups))
    alone = episodes({one: groups[one]}, num_episodes=5, queries=15, seed=0)
    assert np.array_equal(alone, e[: len(alone)])


# --- malformed input: one clear line, naming the file, the record and the problem -------------------


def _write_minimal(tmp_path: Path, mutate) -> Path:
    """A valid one-annotation file (and its image), then ``mutate(data)``."""
    from PIL import Image

    (tmp_path / "images" / "cat").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "cat" / "a.jpg")
    data = {
        "images": [{"id": 7, "file_name": "cat/a.jpg", "width": 64, "height": 48}],
        "categories": [{"id": 3, "name": "tabby_cat", "supercategory": "animal",
                        "keypoints": ["left_eye", "right eye", "nose"], "skeleton": [[0, 1], [1, 2]]}],
        "annotations": [{"id": 11, "image_id": 7, "category_id": 3, "bbox": [4, 4, 30, 30], "area": 900,
                         "keypoints": [10, 10, 2, 20, 10, 2, 15, 20, 1], "num_keypoints": 3, "iscrowd": 0}],
    }
    mutate(data)
    path = tmp_path / "annotations" / "mp100_split1_train.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return path


MALFORMED = {
    "keypoint list of the wrong length": (
        lambda d: d["annotations"][0].update(keypoints=[1, 2, 2]), ["annotation 11", "3 x 3"]),
    "skeleton index out of range": (
        lambda d: d["categories"][0].update(skeleton=[[0, 5]]), ["category 3", "skeleton index out of range"]),
    "unknown category": (
        lambda d: d["annotations"][0].update(category_id=99), ["annotation 11", "category_id 99"]),
    "unknown image": (
        lambda d: d["annotations"][0].update(image_id=8), ["annotation 11", "image_id 8"]),
    "missing image file": (
        lambda d: d["images"][0].update(file_name="dog/a.jpg"), ["annotation 11", "dog/a.jpg", "not found"]),
    "bad bbox": (
        lambda d: d["annotations"][0].update(bbox=[1, 2]), ["annotation 11", "bbox"]),
    "missing list": (lambda d: d.pop("annotations"), ["'annotations'"]),
    # hostile files (issue 25): a file_name outside the image folder, a box that is not numbers
    "absolute file_name": (
        lambda d: d["images"][0].update(file_name="/etc/hostname"), ["image 7", "'/etc/hostname'", "is absolute"]),
    "file_name climbing out": (
        lambda d: d["images"][0].update(file_name="cat/../../outside.jpg"), ["image 7", "'..' component"]),
    "NaN bbox": (
        lambda d: d["annotations"][0].update(bbox=[float("nan"), 4, 30, 30]), ["annotation 11", "non-finite"]),
    "infinite bbox": (
        lambda d: d["annotations"][0].update(bbox=[4, 4, float("inf"), 30]), ["annotation 11", "non-finite"]),
    # the optional polysemous keypoint list: distinct integer indices of the category's keypoints
    "polysemous keypoint out of range": (
        lambda d: d["categories"][0].update(polysemous_keypoints=[0, 3]),
        ["category 3", "'polysemous_keypoints'", "0..2", "[0, 3]"]),
    "polysemous keypoints not integers": (
        lambda d: d["categories"][0].update(polysemous_keypoints=["nose"]), ["category 3", "'polysemous_keypoints'"]),
    "polysemous keypoints not a list": (
        lambda d: d["categories"][0].update(polysemous_keypoints=1), ["category 3", "'polysemous_keypoints'"]),
    "polysemous keypoint twice": (
        lambda d: d["categories"][0].update(polysemous_keypoints=[1, 1]), ["category 3", "distinct"]),
    "polysemous keypoint a bool": (
        lambda d: d["categories"][0].update(polysemous_keypoints=[True]), ["category 3", "'polysemous_keypoints'"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_gives_one_line_naming_file_and_record(tmp_path, case):
    mutate, fragments = MALFORMED[case]
    path = _write_minimal(tmp_path, mutate)
    with pytest.raises(DataError) as err:
        load_subset(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    for frag in fragments:
        assert frag in msg


@pytest.mark.parametrize("where", ["absolute", "dotdot", "windows"])
def test_file_name_outside_the_image_folder_never_becomes_a_sample(tmp_path, where):
    """An image that exists outside ``images/``, named absolutely or with ``..``: refused in one line naming the
    file and the image id (raised by default; collected, with its annotations skipped, by an audit)."""
    from PIL import Image

    outside = tmp_path / "outside" / "secret.jpg"
    outside.parent.mkdir()
    Image.new("RGB", (64, 48)).save(outside)
    name = {"absolute": str(outside), "dotdot": "../outside/secret.jpg",
            "windows": "cat\\..\\..\\outside\\secret.jpg"}[where]
    path = _write_minimal(tmp_path, lambda d: d["images"][0].update(file_name=name))
    with pytest.raises(DataError) as err:
        load_subset(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "image 7" in msg and repr(name) in msg
    problems: list[DataError] = []
    data = load_subset(path, problems=problems)
    assert data.samples == [] and len(problems) == 1 and problems[0].kind == "image record"


def test_clean_bbox_refuses_non_finite_values():
    for bad in ([float("nan"), 0, 10, 10], [0, 0, float("inf"), 10], [0, float("-inf"), 10, 10]):
        with pytest.raises(ValueError, match="non-finite"):
            clean_bbox(bad, 64, 48)
    assert clean_bbox([4, 4, 30, 30], 64, 48) == (4.0, 4.0, 29.0, 29.0)


def test_valid_minimal_file_reads_and_cleans(tmp_path):
    path = _write_minimal(tmp_path, lambda d: None)
    data = load_subset(path)
    (s,) = data.samples
    assert s.bbox == (4.0, 4.0, 29.0, 29.0)
    assert s.keypoints[:, 2].tolist() == [1, 1, 1]
    assert data.categories[3].keypoints == ("left eye", "right eye", "nose")
    assert data.categories[3].class_text == "tabby cat"


def test_polysemous_keypoints_round_trip_through_the_reader_the_shard_json_and_descriptions(tmp_path):
    from capenext.data.shards import category_from_json, category_json

    path = _write_minimal(tmp_path, lambda d: d["categories"][0].update(polysemous_keypoints=[2, 0]))
    problems: list[DataError] = []
    cat = load_subset(path, problems=problems).categories[3]
    assert problems == [] and cat.polysemous == (0, 2)  # sorted
    stored = json.loads(json.dumps(category_json(cat)))
    assert stored["polysemous_keypoints"] == [0, 2] and category_from_json(stored) == cat
    described = load_subset(path, descriptions={"tabby_cat": ["a", "b", "c"]}).categories[3]
    assert described.keypoints == ("a", "b", "c") and described.polysemous == (0, 2)

    plain = load_subset(_write_minimal(tmp_path, lambda d: None)).categories[3]
    assert plain.polysemous == () and "polysemous_keypoints" not in category_json(plain)  # MP-100: as before
    assert category_from_json(category_json(plain)) == plain


def test_missing_image_can_be_skipped_and_listed(tmp_path):
    path = _write_minimal(tmp_path, lambda d: d["images"][0].update(file_name="dog/a.jpg"))
    data = load_subset(path, missing="skip")
    assert data.samples == [] and data.missing == [(11, "dog/a.jpg")]


def test_cli_reports_malformed_data_in_one_line(tmp_path, synthetic_root, capsys, monkeypatch):
    """``python -m jobs.quickstart`` in this process (its real-process run is tests/test_quickstart.py)."""
    from jobs import quickstart

    monkeypatch.chdir(tmp_path)  # the default --workdir ./quickstart_out lands here, not in the checkout
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root / "annotations", root / "annotations")
    (root / "images").symlink_to(synthetic_root / "images")
    path = annotation_path(root, 1, "val")
    data = json.loads(path.read_text())
    bad = data["annotations"][0]
    bad["keypoints"] = bad["keypoints"][:-3]
    path.write_text(json.dumps(data))
    proc = in_process(quickstart.main, ["--data-root", str(root), "--workdir", str(tmp_path / "work")], capsys,
                      monkeypatch)
    assert_one_line_error(proc, str(path), f"annotation {bad['id']}", "keypoints has")
    assert proc.returncode == 2

    proc = in_process(quickstart.main, ["--data-root", str(root), "--split", "9"], capsys, monkeypatch)
    assert_one_line_error(proc, "unknown split 9")
    assert proc.returncode == 2


def test_benchmarks_reference_style_affine_and_targets_equal_ours():
    """``jobs.bench_loader``'s mmpose-0.29-style parts do the work of ours (so its timings compare)."""
    from capenext.data.transforms import affine_matrix
    from jobs.benchmarks.loader import get_affine_transform, msra_target

    rng = np.random.default_rng(3)
    for _ in range(20):
        center, side, rot = rng.uniform(50, 900, 2), rng.uniform(40, 1500), rng.uniform(-30, 30)
        ref = get_affine_transform(center.astype(np.float32), np.array([side, side]) / 200, rot,
                                   np.array([256, 256]))
        ours = affine_matrix(center, side, rot, 256)
        assert np.allclose(ref[:, :2], ours[:, :2], rtol=1e-5, atol=1e-6)
        assert np.allclose(ref[:, 2], ours[:, 2], atol=5e-3 * max(1.0, 256 / side))  # float32 points
    pts = rng.uniform(-20, 270, (100, 2))
    vis = np.zeros((100, 3), dtype=np.float32)
    vis[:, :2] = (rng.random(100) > 0.3)[:, None]
    target, weight = msra_target(pts, vis, np.array([256, 256]), np.array([64, 64]), 1.0)
    heat, ours_w = heatmap_targets(pts, vis[:, 0] > 0, 256, 64, 1.0)
    assert np.array_equal(weight[:, 0], ours_w) and np.allclose(target, heat, atol=1e-6)
