"""``python -m jobs.benchmark predict``: PyTorch against ONNX on the same inputs, in one run (``--quick``)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("onnxruntime")

from capenext.cli import run_main
from jobs import benchmark


def _bench(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        run_main(benchmark.main, ["predict", *argv])
    cap = capsys.readouterr()
    return exit_.value.code, cap.out, cap.err


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_benchmark_measures_both_runtimes_with_finite_ratios_and_agreeing_points(random_tiny_checkpoint,
                                                                                      capsys):
    code, out, err = _bench(["--checkpoint", str(random_tiny_checkpoint), "--quick"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["benchmark"] == "predict" and result["quick"] is True
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1
    assert set(result["runtimes"]) == {"torch", "onnx"}
    for figures in result["runtimes"].values():
        latency, batched = figures["latency_ms"], figures["batched"]
        assert _positive(latency["fastest"]) and latency["fastest"] <= latency["median"] <= latency["p90"]
        assert latency["calls"] == result["calls"]
        assert _positive(batched["queries_per_s"]) and batched["fastest_queries_per_s"] >= batched["queries_per_s"]
        assert batched["batch_size"] == result["batch_size"]
    for key in ("ratio_onnx_vs_torch", "ratio_onnx_vs_torch_fastest"):
        ratio = result[key]
        assert set(ratio) == {"latency", "throughput"} and all(_positive(v) for v in ratio.values()), (key, ratio)
    ratio = result["ratio_onnx_vs_torch"]
    assert result["points_agree"] is True and 0 <= result["max_point_diff_px"] <= 0.5
    assert _positive(result["export_s"])  # no --onnx: exported into a temp folder first
    faster = ratio["latency"] > 1 and ratio["throughput"] > 1
    assert result["serving_default"] == ("onnx" if faster else "torch")


def test_one_runtime_has_no_ratio_and_bad_flags_are_one_line(random_tiny_checkpoint, capsys):
    code, out, err = _bench(["--checkpoint", str(random_tiny_checkpoint), "--quick", "--runtime", "torch"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result["runtimes"]) == {"torch"} and result["export_s"] is None
    assert result["ratio_onnx_vs_torch"] is None and result["ratio_onnx_vs_torch_fastest"] is None
    assert result["serving_default"] == "torch"
    for argv, fragment in [(["--runtime", "torch,tensorrt"], "--runtime 'torch,tensorrt'"),
                           (["--calls", "0"], "--calls must be >= 1"),
                           (["--runtime", "torch", "--onnx", "somewhere"], "add onnx to --runtime")]:
        code, out, err = _bench(["--checkpoint", str(random_tiny_checkpoint), "--quick", *argv], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and fragment in lines[0], err
