"""``python -m jobs.benchmark {loader,embed,serve} --quick``: each benchmark's smoke run, in process, on the
session's data (``synthetic_root``, ``prepared``'s shards, ``random_tiny_checkpoint``) and Ray instance.

Each test checks that every key ``docs/benchmarks.md`` and ``docs/serving.md`` document is in the JSON, that
every ratio is finite and positive, and that the run had the sizes ``--quick`` promises. The figures
themselves mean nothing at these sizes.
"""

from __future__ import annotations

import json
import math

from jobs import benchmark


def _bench(argv: list[str], capsys) -> dict:
    """The JSON ``python -m jobs.benchmark ARGV`` prints: the object from its last line that is ``{``
    (Ray's driver may print a line of its own to stdout, e.g. when Serve's controller stops)."""
    assert benchmark.main(argv) == 0
    lines = capsys.readouterr().out.splitlines(keepends=True)
    start = max(i for i, line in enumerate(lines) if line.rstrip() == "{")
    result, _ = json.JSONDecoder().raw_decode("".join(lines[start:]))
    return result


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_loader_benchmark_times_every_loader_against_the_reference_style_one(synthetic_root, prepared,
                                                                                   capsys):
    result = _bench(["loader", "--quick", "--data-root", str(synthetic_root), "--shards",
                     str(prepared / "shards")], capsys)
    assert result["benchmark"] == "loader" and result["quick"] is True
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1
    assert result["data"]["items"] == 16 and result["data"]["rounds"] == 1
    assert result["data"]["shards"] == str(prepared / "shards")  # the session's shards, none made
    timed = ("reference_loader", "reference_loader_with_support_image", "shards", "shards_reduced_decode",
             "per_file", "shards_margin_crop", "make_item_only")
    for name in timed:
        figures = result[name]
        assert all(_positive(figures[k]) for k in ("img_s_per_core", "img_s_wall", "ms_per_img")), (name, figures)
    assert result["reference_loader"]["mean_abs_diff_normalised_crop_vs_shards"] == 0.0
    assert 0 <= result["shards_reduced_decode"]["share_of_items_reduced"] <= 1
    ratios = {"ratio_vs_reference_loader": {"shards", "shards_reduced_decode"},
              "ratio_vs_reference_loader_with_support_image": {"shards", "shards_reduced_decode"},
              "ratio_vs_per_file": {"shards", "shards_margin_crop"}}
    for key, names in ratios.items():
        assert set(result[key]) == names and all(_positive(v) for v in result[key].values()), (key, result[key])
    assert set(result["setup_s"]) == {"coco_index", "shard_index"}
    assert result["goal"] == 2.0 and isinstance(result["meets_goal"], bool)
    assert result["image_storage"] == "original"


def test_quick_embed_benchmark_times_the_job_and_a_bare_clip_on_the_same_images(prepared, capsys):
    from capenext.data.shards import ShardIndex

    shards = prepared / "shards"
    result = _bench(["embed", "--quick", "--shards", str(shards), "--clip-checkpoint", "random"], capsys)
    assert result["benchmark"] == "embed" and result["quick"] is True
    assert result["machine"]["cpu"] and result["device"] == "cpu" and result["actors"] >= 1
    assert (result["clip_model"], result["image_size"], result["encode_batch_size"]) == ("tiny", 128, 16)
    index = ShardIndex(shards)
    counts = [e["count"] for e in index.manifest["shards"]]
    # whole shards, the fewest holding 64 images: a few forwards on each side, not the whole set
    assert result["images"] == sum(counts[: result["shards"]]) >= 64 > sum(counts[: result["shards"] - 1])
    assert result["images"] < len(index)
    for key in ("embed_job_img_per_s", "bare_clip_img_per_s", "ratio"):
        assert _positive(result[key]), (key, result[key])
    assert result["goal_ratio_gpu"] == 0.5 and result["note"]


def test_quick_serve_benchmark_measures_batching_on_and_off_on_one_replica(random_tiny_checkpoint, ray_local,
                                                                          capsys):
    result = _bench(["serve", "--quick", "--checkpoint", str(random_tiny_checkpoint)], capsys)
    assert result["benchmark"] == "serve" and result["quick"] is True
    assert result["machine"]["cpu"] and result["device"] == "cpu"
    assert result["ray_instance"] == "the process's own, already running" and ray_local.is_initialized()
    assert result["replicas"] == 1 and result["replica_replaced"] is False  # one replica for both sides
    assert result["model"] == str(random_tiny_checkpoint)
    assert result["concurrency"] == [1, 8] and result["requests_per_level"] == 16 and result["rounds"] == 1
    assert result["warmup_requests"] == 4
    assert result["request"]["image"].startswith("320x240 JPEG")
    assert result["max_batch_size"] == {"batching_on": 16, "batching_off": 1}
    assert set(result["results"]) == {"batching_on", "batching_off"}
    for side, levels in result["results"].items():
        assert set(levels) == {"1", "8"}, (side, levels)
        for figures in levels.values():
            assert all(_positive(figures[k]) for k in ("requests_per_s", "p50_ms", "p95_ms", "mean_batch"))
            assert figures["p95_ms"] >= figures["p50_ms"]
    assert all(v["mean_batch"] == 1 for v in result["results"]["batching_off"].values())  # off is off
    ratio = result["throughput_ratio_on_vs_off"]
    assert set(ratio) == {"1", "8"} and all(_positive(v) for v in ratio.values()), ratio
    assert result["goal_ratio_at_32"] == 2.0 and result["goal_met"] is None  # concurrency 32 not measured


def test_text_prior_benchmark_quick(capsys):
    """Every encoder measured at the model's width, with the random CLIP as the baseline of the speed ratio."""
    assert benchmark.main(["text-prior", "--quick"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["categories"], out["supercategories"], out["model_width"]) == (20, 8, 64)
    assert set(out["encoders"]) == {"clip (tiny, random)", "wordllama", "e5"}
    for name in ("wordllama", "e5"):
        entry = out["encoders"][name]
        ratio = entry["texts_per_s_vs_clip"]
        assert math.isfinite(ratio) and ratio > 0
        for width in ("at_model_width", "native"):
            assert 0 <= entry[width]["class_kin_at1"] <= 1 and 0 <= entry[width]["name_kin_at1"] <= 1
    assert out["encoders"]["wordllama"]["identity"].startswith("wordllama:wordllama-")
