"""ONNX export (``jobs.export``, :mod:`capenext.export`) and ``Predictor(runtime="onnx")`` on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from capenext.checkpoint import save_checkpoint
from capenext.cli import run_main
from capenext.config import load_preset
from capenext.export import TOLERANCE, OnnxModel, export
from capenext.files import file_sha256
from capenext.models import build_model
from capenext.predict import Predictor, Query
from jobs import export as export_job

NAMES = ["nose", "left eye", "right eye", "left ear", "tail base", "left front paw", "right hind paw"]
SKELETON = [[0, 1], [0, 2], [1, 3], [4, 5], [4, 6]]


def _checkpoint(path: Path, seed: int = 0, **model) -> Path:
    cfg = load_preset("tiny")
    cfg.model.clip_checkpoint = "random"
    for key, value in model.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(seed)
    save_checkpoint(path, build_model(cfg.model), cfg)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, export folder, the job's JSON line) of the tiny preset at random weights."""
    base = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(base / "tiny.pt")
    out = base / "onnx"
    with pytest.raises(SystemExit) as exit_:
        run_main(export_job.main, ["--checkpoint", str(ckpt), "--out", str(out)])
    assert exit_.value.code == 0
    return ckpt, out


def _photo_like(h: int = 190, w: int = 250) -> np.ndarray:
    """Smooth colour gradients, blurred blobs and sensor noise."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.4 * np.sin(3 * xx + 1), 0.4 + 0.3 * yy, 0.6 - 0.3 * xx * yy], -1)
    for _ in range(4):
        cy, cx, r = rng.random() * h, rng.random() * w, 10 + rng.random() * 40
        blob = np.exp(-(((np.arange(h)[:, None] - cy) ** 2 + (np.arange(w)[None] - cx) ** 2) / (2 * r * r)))
        img += blob[..., None] * (rng.random(3) - 0.5)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _drawing_like(h: int = 160, w: int = 140) -> np.ndarray:
    """Black strokes on white paper: a stick figure."""
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((50, 10, 90, 50), outline="black", width=3)
    d.line((70, 50, 70, 110), fill="black", width=3)
    d.line((70, 70, 30, 90), fill="black", width=3)
    d.line((70, 70, 115, 60), fill="black", width=3)
    d.line((70, 110, 45, 150), fill="black", width=3)
    d.line((70, 110, 100, 150), fill="black", width=3)
    return np.asarray(im)


def _max_px(a: list[dict], b: list[dict]) -> float:
    assert [p["name"] for p in a] == [p["name"] for p in b]
    return max(max(abs(p["x"] - q["x"]), abs(p["y"] - q["y"])) for p, q in zip(a, b))


def test_export_writes_a_verified_onnx_set_with_its_metadata(exported, capfd):
    ckpt, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["clip_image.onnx", "clip_text.onnx", "model.json", "pose.onnx"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    meta = json.loads((out / "model.json").read_text())
    assert meta["checkpoint_sha256"] == file_sha256(ckpt)
    assert meta["opset"] == 17
    assert meta["files"] == {"pose": "pose.onnx", "clip_image": "clip_image.onnx", "clip_text": "clip_text.onnx"}
    assert meta["config"]["model"]["backbone"] == "tiny" and meta["config"]["data"]["image_size"] == 128
    pre = meta["preprocessing"]
    assert pre["crop_size"] == 128 and pre["keypoint_slots"] == 100 and pre["tokenizer"] == "tiny"
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and len(pre["clip_input_size"]) == 2
    assert meta["inputs"]["pose"] == ["img", "kp_emb", "kp_mask", "adj", "cls_emb", "img_emb"]
    sessions = OnnxModel(out).sessions
    assert [i.name for i in sessions["pose"].get_inputs()] == meta["inputs"]["pose"]
    assert all(i.shape[0] == "batch" for i in sessions["pose"].get_inputs())  # dynamic batch
    assert sessions["clip_text"].get_inputs()[0].shape == ["texts", 77]
    deltas = meta["max_abs_delta"]
    assert set(deltas) == {"pose", "clip_image", "clip_text"}
    assert set(deltas["pose"]) == {"points", "sim"}
    assert all(0 <= d < 1e-3 for part in deltas.values() for d in part.values())


def test_exported_pose_network_takes_any_batch_and_keypoint_count(exported):
    """B = 3 (the export traced B = 2), keypoint counts 1, 9 and 100: the valid slots match PyTorch's forward."""
    ckpt, out = exported
    predictor = Predictor(ckpt)
    model = OnnxModel(out, checkpoint_sha256=file_sha256(ckpt))
    g = torch.Generator().manual_seed(3)
    b, k, c = 3, 100, predictor.model.clip.embed_dim
    counts = (1, 9, 100)
    mask = torch.zeros(b, k, dtype=torch.bool)
    for i, n in enumerate(counts):
        mask[i, :n] = True
    batch = {"img": torch.randn(b, 3, 128, 128, generator=g),
             "kp_emb": torch.nn.functional.normalize(torch.randn(b, k, c, generator=g), dim=-1) * mask[..., None],
             "kp_mask": mask, "adj": (torch.rand(b, k, k, generator=g) < 0.05).float(),
             "cls_emb": torch.nn.functional.normalize(torch.randn(b, c, generator=g), dim=-1)}
    with torch.no_grad():
        batch["img_emb"] = predictor.model.clip.encode_image(batch["img"])
        ref = predictor.model(batch)
    got = model.pose({name: v.numpy() for name, v in batch.items()})
    assert got["points"].shape == tuple(ref["points"].shape) and got["sim"].shape == tuple(ref["sim"].shape)
    for i, n in enumerate(counts):
        np.testing.assert_allclose(got["points"][:, i, :n], ref["points"][:, i, :n].numpy(), atol=1e-5)
        np.testing.assert_allclose(got["sim"][i, :n], ref["sim"][i, :n].numpy(),
                                   atol=TOLERANCE * float(ref["sim"].abs().max()))


def test_onnx_predictor_gives_pytorch_points_on_dataset_photo_and_drawing(exported, synthetic_root):
    ckpt, out = exported
    torch_pred = Predictor(ckpt)
    onnx_pred = Predictor(ckpt, runtime="onnx", onnx_dir=out)
    assert onnx_pred.runtime == "onnx" and torch_pred.runtime == "torch"
    ann = json.loads((synthetic_root / "annotations" / "mp100_split1_test.json").read_text())
    sample = ann["annotations"][0]
    image = next(im for im in ann["images"] if im["id"] == sample["image_id"])
    category = next(c for c in ann["categories"] if c["id"] == sample["category_id"])
    dataset_image = synthetic_root / "images" / image["file_name"]
    cases = [
        (dataset_image, category["keypoints"], category["name"], [list(e) for e in category["skeleton"]],
         sample["bbox"]),
        (_photo_like(), NAMES, "cat", SKELETON, None),
        (_drawing_like(), NAMES[:4], "person", SKELETON[:3], [20, 5, 100, 150]),
    ]
    for img, names, cls, skeleton, bbox in cases:
        a = torch_pred.predict(img, names, cls, skeleton, bbox)
        b = onnx_pred.predict(img, names, cls, skeleton, bbox)
        assert _max_px(a, b) < 0.5
        assert max(abs(p["score"] - q["score"]) for p, q in zip(a, b)) < 1e-3
    queries = [Query(img, names, cls, skeleton, bbox) for img, names, cls, skeleton, bbox in cases]
    for a, b in zip(torch_pred.predict_many(queries), onnx_pred.predict_many(queries)):  # one batch of 3
        assert _max_px(a, b) < 0.5


@pytest.mark.parametrize("ablation, image_embedding", [("baseline", "precomputed"), ("img_only", "online")])
def test_other_ablations_export_and_predict_alike(tmp_path, ablation, image_embedding):
    ckpt = _checkpoint(tmp_path / "m.pt", ablation=ablation, image_embedding=image_embedding)
    record = export(ckpt, tmp_path / "onnx")
    expected = ["img", "kp_emb", "kp_mask", "adj"] + (["img_emb"] if ablation == "img_only" else [])
    assert record["inputs"]["pose"] == expected
    img = _photo_like(120, 160)
    a = Predictor(ckpt).predict(img, NAMES, None, SKELETON)
    b = Predictor(ckpt, runtime="onnx", onnx_dir=tmp_path / "onnx").predict(img, NAMES, None, SKELETON)
    assert _max_px(a, b) < 0.5


def _run_export(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        run_main(export_job.main, argv)
    cap = capsys.readouterr()
    return exit_.value.code, cap.out, cap.err


def test_a_backbone_the_exporter_cannot_trace_is_one_line_and_nothing_is_written(exported, tmp_path, capsys,
                                                                                monkeypatch):
    from capenext.models.backbone import TinyBackbone

    features = TinyBackbone.features

    def untraceable(self, img):  # the same numbers in PyTorch, an op without an ONNX form in the graph
        return features(self, img) + 0 * torch.lgamma(img.abs() + 1).mean()

    monkeypatch.setattr(TinyBackbone, "features", untraceable)
    ckpt, _ = exported
    code, out, err = _run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "onnx")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: cannot export the pose network")
    assert "backbone 'tiny'" in lines[0] and "ablation 'full'" in lines[0] and "lgamma" in lines[0]
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


@pytest.mark.parametrize("opset, fragment", [(9, "opset 9"), (99, "--opset 99")])
def test_an_opset_that_cannot_express_the_model_is_one_line(exported, tmp_path, capsys, opset, fragment):
    ckpt, _ = exported
    code, out, err = _run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "onnx"), "--opset", str(opset)],
                                 capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_outputs_over_the_tolerance_are_refused_and_nothing_is_written(exported, tmp_path, monkeypatch):
    import capenext.export

    monkeypatch.setattr(capenext.export, "TOLERANCE", 1e-12)  # any float rounding is now too much
    ckpt, _ = exported
    with pytest.raises(ValueError, match=r"pose.onnx: onnxruntime differs from PyTorch on points by max") as err:
        export(ckpt, tmp_path / "onnx")
    assert "nothing written" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_export_over_an_earlier_export_replaces_it_and_refuses_a_foreign_folder(exported, tmp_path, capsys):
    ckpt, _ = exported
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = _run_export(["--checkpoint", str(ckpt), "--out", str(other)], capsys)
    assert code == 2 and "not an earlier export" in err and (other / "notes.txt").read_text() == "mine"
    again = tmp_path / "again"
    export(ckpt, again)
    (again / "model.json").write_text((again / "model.json").read_text().replace(file_sha256(ckpt), "0" * 64))
    export(ckpt, again)
    assert json.loads((again / "model.json").read_text())["checkpoint_sha256"] == file_sha256(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_onnx_folder_of_another_checkpoint_is_refused_in_one_line(exported, tmp_path):
    _, out = exported
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(ValueError, match="exported from another checkpoint") as err:
        Predictor(other, runtime="onnx", onnx_dir=out)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="onnx_dir"):
        Predictor(other, runtime="onnx")
    with pytest.raises(ValueError, match="runtime"):
        Predictor(other, runtime="tensorrt")
    with pytest.raises(FileNotFoundError, match="model.json"):
        Predictor(other, runtime="onnx", onnx_dir=tmp_path)


def test_predict_job_with_onnx_runtime_prints_the_pytorch_points(exported, tmp_path, capsys):
    from jobs import predict as predict_job

    ckpt, out = exported
    image = tmp_path / "photo.png"
    Image.fromarray(_photo_like()).save(image)
    records = {}
    for runtime in ("torch", "onnx"):
        argv = ["--checkpoint", str(ckpt), "--image", str(image), "--keypoints", ",".join(NAMES), "--class", "cat",
                "--out", str(tmp_path / f"{runtime}.png"), "--runtime", runtime]
        with pytest.raises(SystemExit) as exit_:
            run_main(predict_job.main, argv + (["--onnx", str(out)] if runtime == "onnx" else []))
        assert exit_.value.code == 0
        records[runtime] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (tmp_path / f"{runtime}.png").is_file()
    assert _max_px(records["torch"]["keypoints"], records["onnx"]["keypoints"]) < 0.5


def test_predict_job_refuses_an_onnx_folder_of_another_checkpoint_and_writes_nothing(exported, tmp_path, capsys):
    """The export of another checkpoint (its model.json's sha256 is not this checkpoint's): one error line naming
    the folder, exit 2, no JSON on stdout, no picture, and the folder as it was."""
    from jobs import predict as predict_job

    _, out = exported
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    image = tmp_path / "photo.png"
    Image.fromarray(_photo_like()).save(image)
    picture = tmp_path / "pictures" / "photo.keypoints.png"
    with pytest.raises(SystemExit) as exit_:
        run_main(predict_job.main, ["--checkpoint", str(other), "--image", str(image), "--keypoints", ",".join(NAMES),
                                    "--class", "cat", "--runtime", "onnx", "--onnx", str(out), "--out", str(picture)])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert exit_.value.code == 2 and cap.out == "" and len(lines) == 1, cap.err
    assert lines[0].startswith(f"error: {out}: exported from another checkpoint"), lines[0]
    assert not picture.parent.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_runtime_names_are_the_predictors():
    from capenext import options, predict

    assert options.RUNTIMES == predict.RUNTIMES  # spelled twice so that --help imports no torch


@pytest.mark.parametrize("job", ["predict", "serve"])
@pytest.mark.parametrize("extra, fragment", [(["--runtime", "onnx"], "needs --onnx DIR"),
                                             (["--onnx", "somewhere"], "add --runtime onnx"),
                                             (["--runtime", "onnx", "--onnx", "somewhere", "--device", "cuda"],
                                              "runs on CPU (onnxruntime): drop --device cuda")])
def test_runtime_flags_are_checked_alike_in_predict_and_serve(exported, tmp_path, capsys, job, extra, fragment):
    """One vocabulary: --runtime and --onnx come from capenext.options in both commands, with the same checks,
    made before anything loads or starts."""
    from jobs import predict as predict_job
    from jobs import serve as serve_job

    ckpt, _ = exported
    image = tmp_path / "photo.png"
    Image.fromarray(_photo_like()).save(image)
    argv = ["--checkpoint", str(ckpt)]
    if job == "predict":
        argv += ["--image", str(image), "--keypoints", "nose"]
    with pytest.raises(SystemExit) as exit_:
        run_main((predict_job if job == "predict" else serve_job).main, argv + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and fragment in err[0], err
