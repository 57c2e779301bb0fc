"""The packaged language priors (model.text_encoder): offline, cosine-keeping, recorded and checked like every
table field, refused in one line where they cannot go."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from capenext.checkpoint import save_checkpoint
from capenext.config import load_preset
from capenext.data.embeddings import META_FILE, check_tables, expected_metadata, read_metadata
from capenext.models import build_model
from capenext.models.clip import FrozenCLIP
from capenext.models.text_prior import PRIORS, PriorSpec, TextPrior, _package_folder, load_text_prior, projection
from capenext.recipe import departures

PAW, LEG, SPOUT = "left front paw", "left front leg", "tip of the spout"


def _cos(emb: torch.Tensor, i: int, j: int) -> float:
    return float(emb[i] @ emb[j])


def test_priors_load_and_encode_with_the_network_unreachable():
    code = textwrap.dedent(f"""
        import socket
        def refuse(*a, **k):
            raise OSError("network unreachable (test)")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from capenext.models.clip import FrozenCLIP
        for name in {list(PRIORS)!r}:
            clip = FrozenCLIP("tiny", "random", text_encoder=name)
            e = clip.encode_text(["{PAW}", "{LEG}", "{SPOUT}"])
            c = clip.encode_class(["office_chair"])
            print(name, tuple(e.shape), tuple(c.shape), round(float(e[0] @ e[1]), 3), round(float(e[0] @ e[2]), 3))
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(rows) == set(PRIORS)
    assert "(3, 64) (1, 64)" in rows["wordllama"] and "(3, 64) (1, 64)" in rows["e5"]
    _, _, _, _, _, near, far = rows["wordllama"].replace(",", "").split()
    assert float(near) > float(far) + 0.2  # a paw is a leg's kin, a spout is not


def test_wordllama_keeps_its_cosines_through_the_projection():
    prior = load_text_prior("wordllama")
    texts = [PAW, LEG, SPOUT, "neck", "a photo of office chair"]
    native = prior.encode(texts, 256)
    for width in (512, 1024):  # wider than 256: an isometry, every cosine kept
        wide = prior.encode(texts, width)
        assert torch.allclose(wide @ wide.T, native @ native.T, atol=1e-5)
    tiny = prior.encode(texts, 64)  # Matryoshka: the leading 64 dims, renormalised
    assert torch.allclose(tiny, F.normalize(native[:, :64] * native.norm(dim=1, keepdim=True), dim=-1), atol=1e-5)
    assert _cos(tiny, 0, 1) > _cos(tiny, 0, 2) + 0.2
    assert torch.allclose(tiny.norm(dim=1), torch.ones(len(texts)), atol=1e-5)


def test_projection_is_fixed_and_orthonormal_where_it_widens():
    p = projection(256, 512, matryoshka=False)
    assert torch.equal(p, projection(256, 512, matryoshka=False))  # seeded: every process the same map
    assert torch.allclose(p @ p.T, torch.eye(256), atol=1e-5)
    assert projection(384, 64, matryoshka=False).shape == (384, 64)
    assert torch.equal(projection(256, 64, matryoshka=True), torch.eye(256)[:, :64])


def test_unregistered_encoder_and_missing_package_are_one_line():
    with pytest.raises(ValueError, match=r"text_encoder='bert' is not registered; registered: \['clip', 'wordllama', 'e5'\]"):
        FrozenCLIP("tiny", "random", text_encoder="bert")
    spec = PriorSpec("x", "capenext_no_such_package", "w.bin", 8, False, lambda folder: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'capenext\[prior\]'") as err:
        _package_folder(spec)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a packaged prior"):
        TextPrior("clip")


def test_a_prior_is_a_named_departure_from_the_paper():
    cfg = load_preset("tiny")
    assert not any(line.startswith("model.text_encoder") for line in departures(cfg))
    cfg.model.text_encoder = "wordllama"
    assert "model.text_encoder wordllama (paper clip)" in departures(cfg)


def _tiny_checkpoint(path: Path, text_encoder: str) -> Path:
    cfg = load_preset("tiny")
    cfg.model.clip_checkpoint, cfg.model.text_encoder = "random", text_encoder
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg.model), cfg)
    return path


def test_predictor_encodes_with_the_checkpoints_prior_and_export_refuses_it(tmp_path):
    from capenext.export import export
    from capenext.predict import Predictor

    ckpt = _tiny_checkpoint(tmp_path / "prior.pt", "wordllama")
    predictor = Predictor(ckpt)
    emb = predictor.text_embeddings("keypoint", [PAW, LEG])
    assert torch.allclose(emb, load_text_prior("wordllama").encode([PAW, LEG], 64), atol=1e-6)
    assert predictor.model.clip.identity[-1].startswith("wordllama:wordllama-")
    image = torch.randint(0, 255, (96, 120, 3), dtype=torch.uint8).numpy()
    points = predictor.predict(image, [PAW, LEG, "nose"], "dog")
    assert [p["name"] for p in points] == [PAW, LEG, "nose"]
    with pytest.raises(ValueError, match=r"model.text_encoder='wordllama' is a packaged language prior") as err:
        export(ckpt, tmp_path / "onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "onnx").exists()


def test_tables_record_the_encoder_and_a_run_with_another_is_refused(prepared, tmp_path):
    from capenext.data.shards import ShardIndex
    from pipelines import embed

    digest = ShardIndex(prepared / "shards").digest
    clip_cfg, prior_cfg = load_preset("tiny"), load_preset("tiny")
    clip_cfg.model.clip_checkpoint = prior_cfg.model.clip_checkpoint = "random"
    prior_cfg.model.text_encoder = "wordllama"
    out = tmp_path / "emb-wordllama"
    embed.run(prepared / "shards", out, prior_cfg, batch_size=64, progress=False)
    meta = read_metadata(out)
    assert meta["text_encoder"] == load_text_prior("wordllama").identity
    check_tables(out, prior_cfg, digest)  # its own config: accepted
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "keypoints.parquet").to_pylist()
    clean = [r for r in rows if r["variant"] == "clean"][:3]
    want = FrozenCLIP("tiny", "random", text_encoder="wordllama").encode_text([r["text"] for r in clean])
    assert torch.allclose(torch.tensor([r["embedding"] for r in clean]), want, atol=1e-6)
    with pytest.raises(ValueError, match=r"made with text_encoder='wordllama:.*this run uses 'clip' \(--set model.text_encoder\)"):
        check_tables(out, clip_cfg, digest)
    with pytest.raises(ValueError, match=r"made with text_encoder='clip', this run uses 'wordllama:"):
        check_tables(prepared / "emb", prior_cfg, digest)
    # tables written before the field existed were CLIP's: read as 'clip', not refused
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("images.parquet", "classes.parquet", "keypoints.parquet"):
        (legacy / name).symlink_to(prepared / "emb" / name)
    old = {k: v for k, v in json.loads((prepared / "emb" / META_FILE).read_text()).items() if k != "text_encoder"}
    (legacy / META_FILE).write_text(json.dumps(old))
    check_tables(legacy, clip_cfg, digest)
    assert expected_metadata(clip_cfg)["text_encoder"] == "clip"


def test_quickstart_takes_a_prior_in_its_own_tables_and_run(tmp_path):
    from jobs import quickstart

    clip = quickstart.training_run(quickstart.parse_args(["--workdir", str(tmp_path)]), tmp_path, {}, "sqlite:///x")
    args = quickstart.parse_args(["--workdir", str(tmp_path), "--text-encoder", "wordllama"])
    prior = quickstart.training_run(args, tmp_path, {}, "sqlite:///x")
    assert (clip.embeddings.name, clip.run_name, clip.cfg.model.text_encoder) == (
        "embeddings", "quickstart-split1-full-tiny", "clip")
    assert (prior.embeddings.name, prior.run_name, prior.cfg.model.text_encoder) == (
        "embeddings-wordllama", "quickstart-split1-full-tiny-wordllama", "wordllama")
