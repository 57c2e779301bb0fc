"""The GPU suite at toy sizes on CPU: every section has numbers and every smoke passes (but ``serve`` and
``train_online``, which tests/test_serve.py and the online-image tests of test_model, test_protocol and
test_predict run: the suite skips them here, so they are not run twice). It runs on the test suite's own
synthetic set, shards and tables (``--data-root``, ``--shards``, ``--embeddings``), so it makes none and
runs neither the shard nor the embedding job (the ``embed`` smoke: tests/test_pipelines' embedding tests)
nor starts Ray."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _suite(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The suite as a user runs it (a real process: its own Ray, stopped at its end)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.benchmark", "gpu-suite", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_suite_quick_on_cpu(tmp_path, synthetic_root, prepared):
    out = tmp_path / "suite.json"
    proc = _suite("--device", "cpu", "--quick", "--out", str(out), "--skip-smokes", "serve,train_online",
                  "--data-root", str(synthetic_root), "--shards", str(prepared / "shards"),
                  "--embeddings", str(prepared / "emb"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # the same JSON on stdout and in --out

    assert result["benchmark"] == "gpu-suite" and result["device"] == "cpu" and result["quick"] is True
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1
    data = result["data"]
    assert data == {"data_root": str(synthetic_root), "shards": str(prepared / "shards"),
                    "embeddings": str(prepared / "emb"), "made": [], "synthetic": None,
                    "samples": data["samples"]}, data
    assert isinstance(data["samples"], int) and data["samples"] > 0
    assert result["ray"] == {"started": False, "needed_by": [], "start_seconds": None}  # nothing needed it

    model = result["model"]
    seen = {(r["batch_size"], r["variant"]) for r in model["runs"]}
    assert {"eager", "compile", "fused_adam"} == {v for _, v in seen}
    assert {b for b, _ in seen} == {2, 4}
    for r in model["runs"]:
        assert set(r["train_img_per_s"]) == {"backbone_only", "full_precomputed", "full_online"}
        assert all(_number(v) and v > 0 for v in r["train_img_per_s"].values()), r
        assert all(_number(v) and v > 0 for v in r["peak_memory_mb"].values()), r
        assert _number(r["ratio_full_precomputed_vs_backbone"]) and _number(r["ratio_full_online_vs_backbone"])
        assert r["goal_met"] == (r["ratio_full_precomputed_vs_backbone"] >= model["goal_full_precomputed_ratio"])

    training = result["training"]
    assert "status" not in training, training  # a failed section is {"status": "failed", "detail": ...}
    assert training["steps"] == training["epochs"] * training["steps_per_epoch"] >= 4
    assert len(training["epoch_img_per_s"]) == training["epochs"]
    for key in ("img_per_s", "cpu_cores_used_by_run", "cpu_cores_busy_machine", "projected_hours_200_epochs",
                "run_seconds"):
        assert _number(training[key]), (key, training[key])
    assert training["img_per_s"] > 0
    assert training["gpu_utilisation"] is None  # no GPU on a CPU run
    hours = 200 * 14_000 / training["img_per_s"] / 3600
    assert training["projected_hours_200_epochs"] == pytest.approx(hours, rel=1e-2)
    assert training["goal_met"] == (training["projected_hours_200_epochs"] <= 1.5)

    smokes = result["smoke"]
    assert set(smokes) == {"clip_fp16", "evaluate", "predict"}  # not embed: the tables were given
    assert result["skipped_smokes"] == ["embed", "serve", "train_online"]
    for name, smoke in smokes.items():
        assert smoke["status"] == "ok", (name, smoke)
        assert _number(smoke["seconds"])
    assert smokes["clip_fp16"]["detail"] == "fp16 refused on cpu, as documented"
    assert result["all_smokes_ok"] is True
    assert all(_number(v) for v in result["stage_seconds"].values())
    assert set(result["stage_seconds"]) == {"train", "evaluate", "predict"}  # no synthetic set, shard or embed job


def _one_line_refusal(capsys, *argv: str) -> str:
    """``jobs.benchmark`` in this process: exit code 2 and one ``error:`` line, returned."""
    from capenext.cli import run_main
    from jobs import benchmark

    with pytest.raises(SystemExit) as exc:
        run_main(benchmark.main, ["gpu-suite", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_gpu_suite_refuses_an_unknown_smoke_in_one_line(capsys):
    line = _one_line_refusal(capsys, "--device", "cpu", "--quick", "--skip-smokes", "serve,embed")
    assert "unknown smoke 'embed'; these can be skipped: clip_fp16, train_online, evaluate, predict, serve" in line
    assert "it is not run when --shards and --embeddings give existing ones" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpu_suite_cuda_without_gpu_is_one_line(capsys):
    assert _one_line_refusal(capsys, "--device", "cuda").startswith("error: --device cuda")


def test_gpu_suite_given_data_refusals_are_one_line(capsys, tmp_path, monkeypatch):
    """``--shards`` and ``--embeddings`` go together and need ``--data-root``, and a folder that is not
    there is named: one line and exit code 2 before anything starts (no model benchmark, no Ray)."""
    from jobs.benchmarks import gpu

    def started(*args, **kwargs):
        raise AssertionError("the suite started before refusing")

    monkeypatch.setattr(gpu, "model_section", started)
    monkeypatch.setattr(gpu.RayInstance, "need", started)
    root, shards, emb = (tmp_path / name for name in ("mp100", "shards", "emb"))
    for folder in (root / "images", root / "annotations", shards, emb):
        folder.mkdir(parents=True)
    quick = ("--device", "cpu", "--quick")

    line = _one_line_refusal(capsys, *quick, "--data-root", str(root), "--shards", str(shards))
    assert "--shards and --embeddings go together" in line
    line = _one_line_refusal(capsys, *quick, "--shards", str(shards), "--embeddings", str(emb))
    assert "--shards and --embeddings need --data-root" in line
    line = _one_line_refusal(capsys, *quick, "--data-root", str(root), "--shards", str(tmp_path / "gone"),
                             "--embeddings", str(emb))
    assert line == f"error: --shards {tmp_path / 'gone'}: no such folder"
    line = _one_line_refusal(capsys, *quick, "--data-root", str(tmp_path / "gone"))
    assert line == f"error: --data-root {tmp_path / 'gone'}: no such folder"
    line = _one_line_refusal(capsys, *quick, "--data-root", str(root), "--shards", str(shards), "--embeddings",
                             str(emb))
    assert line.startswith(f"error: --shards: {shards / 'manifest.json'}: no shard manifest")


def test_gpu_suite_refuses_tables_of_another_config_in_one_line(capsys, monkeypatch, synthetic_root, prepared):
    """Given tables are checked as jobs.train checks them, before anything starts: the test suite's tiny
    tables do not fit the full suite's config (Swin V2-T with ViT-B-32)."""
    from jobs.benchmarks import gpu

    def started(*args, **kwargs):
        raise AssertionError("the suite started before refusing")

    monkeypatch.setattr(gpu, "model_section", started)
    line = _one_line_refusal(capsys, "--device", "cpu", "--data-root", str(synthetic_root),
                             "--shards", str(prepared / "shards"), "--embeddings", str(prepared / "emb"))
    assert line.startswith(f"error: --embeddings: embeddings in {prepared / 'emb'} were made with "
                           "clip_model='tiny', this run uses 'ViT-B-32'"), line
    assert "--config swinv2_t --clip-checkpoint random" in line  # the command that makes tables that fit
