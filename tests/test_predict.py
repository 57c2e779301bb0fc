"""capenext.predict and jobs.predict: your image + keypoint names → points, a JSON line and a picture.

Uses the tiny model trained once per session by ``test_evaluate.trained_run`` (synthetic split 1); the
images predicted on are held-out test-category images the model never trained on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capenext.baselines import mean_positions
from capenext.cli import run_main
from capenext.data import make_item
from capenext.data.shards import ShardIndex
from capenext.data.transforms import affine_matrix, apply_affine, box_center_scale, invert_affine
from capenext.predict import Predictor
from jobs import predict as predict_job
from capenext.data.embeddings import load_bank
from tests.conftest import assert_one_line_error, run_cli
from tests.test_evaluate import trained_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> dict:
    return trained_run(tmp_path_factory, prepared)


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return Predictor(trained["checkpoint"])


@pytest.fixture(scope="module")
def data(trained):
    index = ShardIndex(trained["shards"])
    return index, index.subset(1, "train"), index.subset(1, "test")


def _held_out(test, per_category: int = 3):
    """The first ``per_category`` samples of each test category."""
    out = []
    for cid, idx in sorted(test.by_category().items()):
        out += [test.samples[i] for i in idx[:per_category]]
    return out


def _pck(pred: np.ndarray, sample, thr: float = 0.2) -> float:
    vis = sample.visible
    dist = np.linalg.norm(pred - sample.keypoints[:, :2], axis=1) / max(sample.bbox[2], sample.bbox[3])
    return float((dist[vis] < thr).mean())


def test_predictions_on_held_out_images_are_close_to_ground_truth(predictor, data):
    """PCK@0.2 of ``Predictor.predict`` with the true names, class, skeleton and box, on 12 images of the 4
    unseen test categories, beats the per-name mean-position baseline (which knows every training
    position) by a clear margin."""
    index, train, test = data
    means, overall = mean_positions(train, predictor.cfg.data)
    ours, floor = [], []
    for s in _held_out(test):
        cat = test.categories[s.category_id]
        points = predictor.predict(index.load_image(s), list(cat.keypoints), cat.name, cat.skeleton, s.bbox)
        assert [p["name"] for p in points] == list(cat.keypoints)
        assert all(0.0 <= p["score"] <= 1.0 for p in points)
        ours.append(_pck(np.array([[p["x"], p["y"]] for p in points]), s))
        center, side = box_center_scale(s.bbox, predictor.cfg.data.bbox_scale)
        unit = np.stack([means.get(n, overall) for n in cat.keypoints])  # [0, 1] crop coordinates
        floor.append(_pck(apply_affine(unit, invert_affine(affine_matrix(center, side, 0.0, 1))), s))
    print(f"PCK@0.2 on {len(ours)} held-out images: model {np.mean(ours):.3f}, baseline {np.mean(floor):.3f}")
    assert np.mean(ours) >= 0.6, (np.mean(ours), np.mean(floor))
    assert np.mean(ours) > np.mean(floor) + 0.1, (np.mean(ours), np.mean(floor))


def test_predictor_feeds_the_model_what_the_test_protocol_feeds_it(predictor, data, trained):
    """Same crop, adjacency and points as the evaluation path; keypoint, class and image embeddings equal
    the tables of pipelines.embed (a precomputed-image-embedding model gets the embedding job's crop)."""
    index, _, test = data
    bank = load_bank(trained["emb"])
    s = _held_out(test, 1)[1]
    cat = test.categories[s.category_id]
    k = cat.num_keypoints
    image = index.load_image(s)
    batch, _ = predictor.batch(image, list(cat.keypoints), cat.name, cat.skeleton, s.bbox)
    support = replace(s, keypoints=np.concatenate([s.keypoints[:, :2], np.full((k, 1), 2, np.float32)], 1))
    item = make_item(image, s, support, cat, predictor.cfg.data)
    assert torch.equal(batch["img"][0], item["img"]) and torch.equal(batch["adj"][0], item["adj"])
    assert torch.equal(batch["kp_mask"][0], item["kp_mask"])
    assert torch.allclose(batch["kp_emb"][0, :k], bank.keypoints[cat.id], atol=1e-5)
    assert torch.allclose(batch["cls_emb"][0], bank.classes[cat.id], atol=1e-5)
    assert torch.allclose(batch["img_emb"][0], bank.images[s.ann_id], atol=1e-5)

    eval_batch = bank.fill({kk: v.unsqueeze(0) for kk, v in item.items()}, predictor.slots, True, True)
    with torch.no_grad():
        expected = predictor.model(eval_batch)["points"][-1, 0, :k]  # (k, 2) in [0, 1]
    got = predictor.predict(image, list(cat.keypoints), cat.name, cat.skeleton, s.bbox)
    inv = item["inverse"].double().numpy()
    expected_px = apply_affine(expected.double().numpy() * predictor.image_size, inv)
    assert np.allclose([[p["x"], p["y"]] for p in got], expected_px, atol=1e-2)


def test_cli_prints_json_and_writes_a_picture(trained, predictor, data, tmp_path):
    """As a user runs it: a subprocess, one image, names, class, skeleton, box."""
    index, _, test = data
    s = _held_out(test, 1)[0]
    cat = test.categories[s.category_id]
    image = tmp_path / "query.png"
    Image.fromarray(index.load_image(s)).save(image)
    out = tmp_path / "pred.png"
    skeleton = ",".join(f"{a}-{b}" for a, b in cat.skeleton)
    proc = run_cli("jobs.predict", "--checkpoint", trained["checkpoint"], "--image", str(image), "--keypoints",
                   ",".join(cat.keypoints), "--class", cat.name, "--skeleton", skeleton, "--bbox",
                   ",".join(f"{v:g}" for v in s.bbox), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    record = json.loads(line)
    assert record["picture"] == str(out) and record["class"] == cat.name
    assert [p["name"] for p in record["keypoints"]] == list(cat.keypoints)
    api = predictor.predict(index.load_image(s), list(cat.keypoints), cat.name, cat.skeleton, s.bbox)
    assert [v for p in record["keypoints"] for v in (p["x"], p["y"], p["score"])] == pytest.approx(
        [v for p in api for v in (p["x"], p["y"], p["score"])], abs=0.01)  # JSON: 0.01 px, 1e-4 score
    with Image.open(out) as im:  # upscaled for readable names (synthetic images are 128-256 px)
        assert im.format == "PNG" and min(im.size) >= 512


def test_folder_of_images_with_a_keypoints_file_and_no_box(trained, data, tmp_path, capsys, monkeypatch):
    """--images DIR: one JSON line and one picture per image; without --bbox the whole image is the box."""
    index, _, test = data
    cat = test.categories[_held_out(test, 1)[0].category_id]
    folder = tmp_path / "photos"
    folder.mkdir()
    samples = [s for s in test.samples if s.category_id == cat.id][:2]
    for i, s in enumerate(samples):
        Image.fromarray(index.load_image(s)).save(folder / f"img{i}.{'jpg' if i else 'png'}")
    (folder / "notes.txt").write_text("not an image")
    spec = tmp_path / "kp.json"
    spec.write_text(json.dumps({"class": cat.name, "names": list(cat.keypoints),
                                "skeleton": [list(e) for e in cat.skeleton]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_main(predict_job.main, ["--checkpoint", trained["checkpoint"], "--images", str(folder),
                                    "--keypoints-file", str(spec)])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    records = [json.loads(line) for line in out.out.strip().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["img0.png", "img1.jpg"]
    for r, s in zip(records, samples):
        assert r["bbox"] == [0, 0, s.width, s.height]
        assert len(r["keypoints"]) == cat.num_keypoints
        xy = np.array([[p["x"], p["y"]] for p in r["keypoints"]])
        # the whole image, padded by bbox_scale, is the crop: points stay within it
        assert (xy > -0.25 * max(s.width, s.height)).all() and (xy < 1.25 * max(s.width, s.height)).all()
        with Image.open(r["picture"]) as im:
            assert im.format == "PNG" and Path(r["picture"]).resolve().parent == (tmp_path / "predictions").resolve()


def _unknown_config(trained, tmp_path: Path, what: str) -> Path:
    ckpt = torch.load(trained["checkpoint"], weights_only=True)
    if what == "key":
        ckpt["config"]["model"]["shiny_new_field"] = 1
    else:
        ckpt["config"]["model"]["backbone"] = "resnet9000"
    path = tmp_path / f"unknown_{what}.pt"
    torch.save(ckpt, path)
    return path


BAD = {
    "unreadable_image": (lambda t, p: {"--image": str(p / "broken.jpg")}, "cannot read image"),
    "missing_image": (lambda t, p: {"--image": str(p / "none.jpg")}, "image not found"),
    "empty_names": (lambda t, p: {"--keypoints": " , "}, "no keypoint names"),
    "too_many_names": (lambda t, p: {"--keypoints": ",".join(f"k{i}" for i in range(101))},
                       "101 keypoint names given, the model has 100 keypoint slots"),
    "skeleton_out_of_range": (lambda t, p: {"--skeleton": "0-1,1-3"}, "skeleton index out of range in edge 1-3"),
    "skeleton_syntax": (lambda t, p: {"--skeleton": "0:1"}, "skeleton edge '0:1' is not of the form A-B"),
    "bbox_outside": (lambda t, p: {"--bbox": "100,10,500,20"}, "lies outside the"),
    "bbox_syntax": (lambda t, p: {"--bbox": "1,2,3"}, "is not four numbers"),
    "unknown_config_key": (lambda t, p: {"--checkpoint": str(_unknown_config(t, p, "key"))},
                           "checkpoint of an unknown config"),
    "unknown_backbone": (lambda t, p: {"--checkpoint": str(_unknown_config(t, p, "backbone"))},
                         "checkpoint of an unknown config"),
    "not_a_checkpoint": (lambda t, p: {"--checkpoint": str(p / "broken.jpg")}, "not a PyTorch checkpoint"),
    "no_class": (lambda t, p: {"--class": None}, "reads a class name: pass --class"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_exit_2(trained, tmp_path, capsys, monkeypatch, case):
    image = tmp_path / "ok.png"
    Image.fromarray(np.full((64, 80, 3), 127, np.uint8)).save(image)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    opts = {"--checkpoint": trained["checkpoint"], "--image": str(image), "--keypoints": "nose,left eye,right eye",
            "--class": "cat"}
    change, fragment = BAD[case]
    opts.update(change(trained, tmp_path))
    argv = [x for k, v in opts.items() if v is not None for x in (k, v)]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_main(predict_job.main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert not list(tmp_path.glob("*.keypoints.png"))


def test_cli_error_is_one_line_in_a_real_process(trained, tmp_path):
    proc = run_cli("jobs.predict", "--checkpoint", trained["checkpoint"], "--image", str(tmp_path / "none.jpg"),
                   "--keypoints", "nose", "--class", "cat", cwd=tmp_path)
    assert_one_line_error(proc, "image not found", "none.jpg")


def test_api_accepts_pil_images_and_arrays_alike(predictor, data):
    index, _, test = data
    s = _held_out(test, 1)[2]
    cat = test.categories[s.category_id]
    array = index.load_image(s)
    a = predictor.predict(array, list(cat.keypoints), cat.name, bbox=s.bbox)
    b = predictor.predict(Image.fromarray(array), list(cat.keypoints), cat.name, bbox=s.bbox)
    assert a == b
    with pytest.raises(ValueError, match="names must be a list"):
        predictor.predict(array, "nose,left eye", cat.name)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor.predict(array.astype(np.float32), ["nose"], cat.name)


@pytest.mark.parametrize("ablation,image_embedding", [("baseline", "precomputed"), ("img_only", "online"),
                                                      ("full", "online")])
def test_every_ablation_and_image_embedding_mode_predicts(tmp_path, ablation, image_embedding):
    """An untrained checkpoint of other configs: the baseline needs no class name; an online model
    computes its image embedding inside the forward, and gets the same points as from the precomputed
    path of the same weights."""
    from capenext.checkpoint import save_checkpoint
    from capenext.config import load_preset, override
    from capenext.models import build_model

    cfg = override(load_preset("tiny"), {"model.ablation": ablation, "model.image_embedding": image_embedding})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model(cfg.model), cfg)
    pred = Predictor(tmp_path / "m.pt")
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    names = ["nose", "left eye", "right eye"]
    cls = None if ablation in ("baseline", "img_only") else "cat"
    points = pred.predict(image, names, cls, skeleton=[(0, 1), (0, 2)], bbox=(10, 5, 80, 70))
    assert [p["name"] for p in points] == names
    if image_embedding == "online":
        batch, _ = pred.batch(image, names, cls, [(0, 1), (0, 2)], (10, 5, 80, 70))
        assert "img_emb" not in batch
        pred.model.image_embedding = "precomputed"
        again = pred.predict(image, names, cls, [(0, 1), (0, 2)], (10, 5, 80, 70))
        assert [v for p in again for v in (p["x"], p["y"], p["score"])] == pytest.approx(
            [v for p in points for v in (p["x"], p["y"], p["score"])], abs=1e-4)


# --- the inputs, as the command line and the server read them (no model) ------------------------------


@pytest.mark.parametrize("text,json_list,expected", [
    ("nose, left eye ,right_eye", False, ["nose", "left eye", "right_eye"]),
    ('["nose", " left eye"]', True, ["nose", "left eye"]),
    ('["nose"]', False, ['["nose"]']),  # the command line reads no JSON: a name that starts with [
])
def test_names_parse_alike_for_predict_and_serve(text, json_list, expected):
    from capenext.inputs import parse_names

    assert parse_names(text, "--keypoints", json_list=json_list) == expected


@pytest.mark.parametrize("call,fragment", [
    (lambda f: f.parse_names(None, "'keypoints'", json_list=True), "no keypoint names: 'keypoints' is empty"),
    (lambda f: f.parse_names(" , ", "--keypoints"), "no keypoint names: --keypoints holds only separators"),
    (lambda f: f.parse_names("a,,b", "--keypoints"), "--keypoints has an empty name at position 1: 'a,,b'"),
    (lambda f: f.parse_names('["a", 1]', "'keypoints'", json_list=True), "'keypoints' as JSON must be a list of str"),
    (lambda f: f.parse_skeleton("[[0, 1], ", "'skeleton'", json_list=True),
     "'skeleton' starts like a JSON list but is not valid JSON"),
    (lambda f: f.parse_skeleton("0:1"), "skeleton edge '0:1' is not of the form A-B"),
    (lambda f: f.parse_bbox("1,2,3"), "bbox '1,2,3' is not four numbers"),
    (lambda f: f.check_class_name(" _ ", True, "full", "pass --class NAME"),
     "the 'full' model reads a class name: pass --class NAME"),
])
def test_bad_inputs_are_one_line_value_errors(call, fragment):
    import capenext.inputs

    with pytest.raises(ValueError) as err:
        call(capenext.inputs)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_absent_skeleton_box_and_class_are_defaults():
    from capenext.inputs import check_class_name, parse_bbox, parse_skeleton

    assert parse_skeleton(None) == [] and parse_skeleton(" ") == [] and parse_skeleton("0-1, 1-2") == [(0, 1), (1, 2)]
    assert parse_skeleton("[[0, 1]]", json_list=True) == [[0, 1]]
    assert parse_bbox(None) is None and parse_bbox(" 1, 2,3 ,4") == (1.0, 2.0, 3.0, 4.0)
    assert check_class_name("  ", False, "baseline") is None and check_class_name(" cat ", True, "full") == "cat"


def test_keypoints_file_gives_names_class_and_skeleton(tmp_path):
    from capenext.inputs import read_keypoints_file

    path = tmp_path / "kp.json"
    path.write_text(json.dumps({"name": "chair", "keypoints": ["seat", "leg"], "skeleton": [[0, 1]], "id": 7}))
    assert read_keypoints_file(path) == {"class": "chair", "names": ["seat", "leg"], "skeleton": [[0, 1]],
                                         "supercategory": "", "id": 7}
    path.write_text(json.dumps({"names": "seat"}))
    with pytest.raises(ValueError, match="'names' must be a list of strings"):
        read_keypoints_file(path)


def test_clip_precision_swap_refuses_fp16_off_cuda_and_keeps_a_matching_clip():
    from capenext.config import load_preset
    from capenext.models import build_model
    from capenext.predict import set_clip_precision

    cfg = load_preset("tiny")
    model = build_model(cfg.model)
    clip = model.clip
    assert set_clip_precision(model, cfg, "cpu") is False and model.clip is clip
    cfg.model.clip_precision = "fp16"
    with pytest.raises(ValueError, match="fp16 runs on a CUDA device only"):
        set_clip_precision(model, cfg, "cpu")
    assert model.clip is clip
