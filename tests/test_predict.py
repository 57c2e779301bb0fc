"""capenext.predict and jobs.predict: your image + keypoint names → points, a JSON line and a picture.

Uses the tiny model trained once per session by ``test_evaluate.trained_run`` (synthetic split 1); the
images predicted on are held-out test-category images the model never trained on.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from capenext.baselines import mean_positions
from capenext.cli import run_main
from capenext.data import make_item
from capenext.data.shards import ShardIndex
from capenext.data.transforms import affine_matrix, apply_affine, box_center_scale, invert_affine
from capenext.predict import Predictor, Query
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


def _predict_cli(argv: list[str], capsys, monkeypatch, cwd: Path) -> SimpleNamespace:
    """``python -m jobs.predict ARGV`` in this process, from ``cwd``: exit code, stdout, stderr. (The entry
    point's one real process is in tests/test_quickstart.py, which runs the predict command it prints.)"""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what run_main sets: undone after the test
    with pytest.raises(SystemExit) as exc:
        run_main(predict_job.main, argv)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=exc.value.code, stdout=out.out, stderr=out.err)


def test_cli_prints_json_and_writes_a_picture(trained, predictor, data, tmp_path, capsys, monkeypatch):
    """As a user runs it (in this process): one image, names, class, skeleton, box."""
    index, _, test = data
    s = _held_out(test, 1)[0]
    cat = test.categories[s.category_id]
    image = tmp_path / "query.png"
    Image.fromarray(index.load_image(s)).save(image)
    out = tmp_path / "pred.png"
    skeleton = ",".join(f"{a}-{b}" for a, b in cat.skeleton)
    proc = _predict_cli(["--checkpoint", trained["checkpoint"], "--image", str(image), "--keypoints",
                         ",".join(cat.keypoints), "--class", cat.name, "--skeleton", skeleton, "--bbox",
                         ",".join(f"{v:g}" for v in s.bbox), "--out", str(out)], capsys, monkeypatch, tmp_path)
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
    """jobs.predict's one real process: nothing but the one line on stderr (no import-time warning either)."""
    proc = run_cli("jobs.predict", "--checkpoint", trained["checkpoint"], "--image", str(tmp_path / "none.jpg"),
                   "--keypoints", "nose", "--class", "cat", cwd=tmp_path)
    assert_one_line_error(proc, "image not found", "none.jpg")
    assert proc.returncode == 2 and proc.stdout == ""


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
    # issue 25: bounded in characters before anything reads them, no control characters, JSON that Python
    # cannot read refused in one line
    (lambda f: f.parse_names("nose," + "q" * 401, "--keypoints"), "--keypoints name 1 is 401 characters, over the "
                                                                 "limit of 400"),
    (lambda f: f.parse_names("a," * 140_000, "--keypoints"), "--keypoints is 280000 characters, over the limit"),
    (lambda f: f.parse_names("nose,left\teye", "--keypoints"), "--keypoints name 1 contains the control character "
                                                               "U+0009 at position 4"),
    (lambda f: f.parse_names('["a", "b\\u009b"]', "'keypoints'", json_list=True), "control character U+009B"),
    (lambda f: f.check_names(["nose", "x" * 500], 100), "keypoint name 1 is 500 characters"),
    (lambda f: f.check_names(["\x00class", "cat"], 100), "keypoint name 0 contains the control character U+0000"),
    (lambda f: f.check_class_name("c" * 401, True, "full"), "class name is 401 characters"),
    (lambda f: f.check_class_name("ca\x7ft", True, "full", field="--class"), "--class contains the control "
                                                                          "character U+007F"),
    (lambda f: f.parse_skeleton("0-1," * 6000), "skeleton is 24000 characters, over the limit of 20000"),
    (lambda f: f.parse_skeleton("0-" + "9" * 5000), "an index of more than 6 digits"),
    (lambda f: f.parse_skeleton("[" * 3000, "'skeleton'", json_list=True), "nested too deeply"),
    (lambda f: f.parse_skeleton("[[" + "9" * 4400 + ", 1]]", "'skeleton'", json_list=True),
     "holds a number with too many digits"),
    (lambda f: f.check_skeleton([[[[[[[[[[0]]]]]]]]]], 3), "skeleton edge [[[[...]]]] is not a pair"),
    (lambda f: f.parse_bbox("1," * 101), "bbox is 202 characters, over the limit of 200"),
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


# --- issue 25: the library's side of serving strangers (a random tiny model, no training) ---------------


@pytest.fixture(scope="module")
def tiny(random_tiny_checkpoint) -> Predictor:
    return Predictor(random_tiny_checkpoint)


def _image(seed: int = 0, h: int = 60, w: int = 90) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_text_cache_keys_by_kind_text_and_clip_so_a_name_cannot_poison_a_class(tiny):
    """Keypoints ["\\x00class", "cat"] were cached under the key of the class "cat" (string keys), and every
    later prediction with class cat failed. Keys are (kind, text, CLIP identity) now."""
    fresh = tiny.model.clip.encode_class(["cat"])  # (1, C)
    poison = tiny.text_embeddings("keypoint", ["\x00class", "cat"])  # bypasses check_names on purpose
    assert poison.shape == (2, fresh.shape[1])
    cls = tiny._encode_class("cat")
    assert cls.shape == fresh.shape and torch.allclose(cls, fresh, atol=1e-6)
    assert not torch.allclose(tiny._encode_text(["cat"]), cls)  # "cat" as a name is not "a photo of cat"
    keys = [k for k in tiny._text_cache if k[1] == "cat"]
    assert {k[0] for k in keys} == {"keypoint", "class"} and all(k[2] == tiny.model.clip.identity for k in keys)
    assert tiny.model.clip.identity[:2] == ("tiny", "random:0")
    points = tiny.predict(_image(), ["nose", "left eye"], "cat")
    assert [p["name"] for p in points] == ["nose", "left eye"]


def test_text_cache_is_bounded_and_least_recently_used_goes_first(tiny, monkeypatch):
    import capenext.predict as predict_module

    monkeypatch.setattr(predict_module, "TEXT_CACHE_SIZE", 5)
    tiny._text_cache.clear()
    tiny.text_embeddings("keypoint", [f"name {i}" for i in range(4)])
    tiny.text_embeddings("keypoint", ["name 0"])  # used again: the newest
    tiny.text_embeddings("keypoint", ["name 4", "name 5"])
    assert [k[1] for k in tiny._text_cache] == ["name 2", "name 3", "name 0", "name 4", "name 5"]


def test_tokenizer_word_cache_is_bounded(tiny, monkeypatch):
    """open_clip's BPE cache keeps every word it ever saw; random words from strangers would grow it forever."""
    import capenext.models.clip as clip_module

    monkeypatch.setattr(clip_module, "TOKENIZER_CACHE_WORDS", 50)
    clip = tiny.model.clip
    rng = np.random.default_rng(0)
    for _ in range(20):
        clip.check_texts([" ".join("".join(rng.choice(list("abcdefgh"), 6)) for _ in range(10))])
        assert len(clip.tokenizer.cache) <= 50 + 10
    assert "<start_of_text>" in clip.tokenizer.cache  # the special tokens stay
    assert torch.equal(clip.tokenize(["left eye", "nose"]), clip.tokenizer(["left eye", "nose"]))


def test_check_query_makes_every_check_short_of_the_model(tiny):
    image = _image()
    checked = tiny.check_query(Query(image, ["nose", "left_eye"], " cat ", [[0, 1]], None))
    assert checked.class_name == "cat" and checked.skeleton == [(0, 1)] and checked.image.shape == image.shape
    for query, fragment in [
        (Query(image, ["nose", "a " * 80], "cat"), "keypoint name 1 'a a a"),  # 82 tokens, no forward needed
        (Query(image, ["nose"], "a " * 80), "class prompt 'a photo of a a a"),
        (Query(image, ["nose"], "cat", [[0, 3]]), "skeleton index out of range"),
        (Query(image, ["nose"], "cat", None, (0, 0, 500, 10)), "lies outside the"),
        (Query(image, ["nose"], None), "reads a class name"),
        (Query(image, ["x" * 401], "cat"), "keypoint name 0 is 401 characters"),
    ]:
        with pytest.raises(ValueError, match="^") as err:
            tiny.check_query(query)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_predict_each_isolates_a_query_that_fails_in_the_batch(tiny):
    image = _image(1)
    good = [Query(image, ["nose", "left eye"], "cat"), Query(_image(2), ["tail"], "dog", None, (5, 5, 40, 30))]
    bad = Query(image, ["nose", "a " * 80], "cat")  # over CLIP's context: fails inside predict_many
    with pytest.raises(ValueError, match="query 1: keypoint name|query 1: text"):
        tiny.predict_many([good[0], bad, good[1]])
    results = tiny.predict_each([good[0], bad, good[1]])
    assert isinstance(results[1], ValueError) and "is 82 CLIP tokens" in str(results[1])
    assert not str(results[1]).startswith("query")
    for q, r in zip(good, (results[0], results[2])):
        alone = tiny.predict(q.image, q.names, q.class_name, q.skeleton, q.bbox)
        assert [v for p in r for v in (p["x"], p["y"], p["score"])] == pytest.approx(
            [v for p in alone for v in (p["x"], p["y"], p["score"])], abs=1e-4)
    assert tiny.predict_each(good) == tiny.predict_many(good)  # nothing failed: one forward, as predict_many


def test_points_off_the_image_are_clamped_and_flagged():
    from capenext.predict import _points

    xy = torch.tensor([[10.0, 20.0], [-0.4, 59.4], [-3.0, 30.0], [95.0, -7.0], [45.0, 61.0]])
    points = _points(["a", "b", "c", "d", "e"], xy, torch.full((5,), 0.5), (90, 60))
    assert [p["inside_image"] for p in points] == [True, True, False, False, False]
    assert [v for p in points for v in (p["x"], p["y"])] == pytest.approx(
        [10, 20, -0.4, 59.4, 0, 30, 89, 0, 45, 59])  # on the image: as predicted; off: clamped


def test_predictions_carry_the_inside_flag_and_stay_on_the_image(tiny):
    """Without a box, the crop is padded around the image (a wide image: above and below it), and a point
    can land in the padding: it comes back on the image, flagged."""
    image = _image(3, h=20, w=200)
    for points in (tiny.predict(image, ["nose", "left eye", "tail", "paw"], "cat"),
                   tiny.predict_many([Query(image, ["nose", "left eye", "tail", "paw"], "cat")])[0]):
        for p in points:
            assert isinstance(p["inside_image"], bool)
            if not p["inside_image"]:
                assert 0 <= p["x"] <= 199 and 0 <= p["y"] <= 19


def test_only_the_formats_we_read_are_opened(tmp_path):
    """An EPS file would have PIL run Ghostscript; PIL opens only JPEG, PNG, BMP, WEBP, TIFF and GIF."""
    from capenext.predict import IMAGE_FORMATS, load_image

    assert IMAGE_FORMATS == ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
    for fmt in ("EPS", "PPM", "TGA"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 12), (200, 10, 10)).save(buf, format=fmt)
        with pytest.raises(ValueError, match="not an image file in a format we read \\(JPEG, PNG"):
            load_image(buf.getvalue())
    for fmt in ("PNG", "BMP", "TIFF", "GIF", "WEBP", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 12), (200, 10, 10)).save(buf, format=fmt)
        assert load_image(buf.getvalue()).shape == (12, 16, 3), fmt


def test_a_point_off_the_image_is_drawn_as_a_ring():
    from capenext.viz import draw_keypoints, palette

    image = np.zeros((100, 100, 3), np.uint8)
    pic = np.asarray(draw_keypoints(image, [[30, 50], [70, 50]], inside=[True, False], min_side=100))
    colors = palette(2)
    assert tuple(pic[50, 30]) == colors[0]  # a disc: its colour at the centre
    assert tuple(pic[50, 70]) != colors[1] and (pic[40:61, 60:81] == colors[1]).all(-1).any()  # a ring: hollow
