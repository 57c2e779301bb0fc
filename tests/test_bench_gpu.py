"""The GPU suite at toy sizes on CPU: every section has numbers and every smoke passes (but ``serve`` and
``train_online``, which tests/test_serve.py and the online-image tests of test_model, test_protocol and
test_predict run: the suite skips them here, so they are not run twice)."""

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


def test_gpu_suite_quick_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    proc = _suite("--device", "cpu", "--quick", "--out", str(out), "--skip-smokes", "serve,train_online")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # the same JSON on stdout and in --out

    assert result["benchmark"] == "gpu-suite" and result["device"] == "cpu" and result["quick"] is True
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1

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
    assert set(smokes) == {"clip_fp16", "embed", "evaluate", "predict"}
    assert result["skipped_smokes"] == ["serve", "train_online"]
    for name, smoke in smokes.items():
        assert smoke["status"] == "ok", (name, smoke)
        assert _number(smoke["seconds"])
    assert smokes["clip_fp16"]["detail"] == "fp16 refused on cpu, as documented"
    assert result["all_smokes_ok"] is True
    assert all(_number(v) for v in result["stage_seconds"].values())


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpu_suite_cuda_without_gpu_is_one_line(capsys):
    assert _one_line_refusal(capsys, "--device", "cuda").startswith("error: --device cuda")
