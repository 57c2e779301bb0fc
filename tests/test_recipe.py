"""``--recipe paper``: every setting the reference's for the backbone, refused without the reference's texts, and
every run says how far it is from the paper (``recipe`` and ``paper_departures`` tags)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from capenext.cli import run_main
from capenext.config import load_preset, override
from capenext.data import load_split
from capenext.recipe import JobFacts, apply_recipe, departures, paper_settings

TINY = ["--backbone", "tiny", "--clip-model", "tiny", "--clip-checkpoint", "random", "--batch-size", "8",
        "--set", "model.dim=64", "--set", "model.heads=4", "--set", "model.ffn_dim=192", "--set",
        "model.fusion_ffn_dim=256", "--set", "model.fusion_heads=4", "--set", "data.image_size=128", "--set",
        "data.heatmap_size=32", "--set", "optim.warmup_iters=2"]


def _run(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def descriptions(synthetic_root, tmp_path_factory) -> Path:
    """A CapeX-style descriptions file for the synthetic set: one written-out text per keypoint."""
    texts = {}
    for subset in ("train", "val", "test"):
        for c in load_split(synthetic_root, 1, subset).categories.values():
            texts[c.name] = [f"the {k} of the {c.name.replace('_', ' ')}" for k in c.keypoints]
    path = tmp_path_factory.mktemp("texts") / "descriptions.json"
    path.write_text(json.dumps(texts))
    return path


def test_the_paper_recipe_of_a_paper_backbone_departs_only_in_what_was_not_given():
    cfg = apply_recipe(load_preset("swinv2_t"), "paper", "cuda")
    cfg = override(cfg, {"model.clip_checkpoint": "/w/ViT-B-32.pt", "model.backbone_checkpoint": "/w/swin.pth",
                         "data.descriptions": "/w/descriptions.json"})
    assert departures(cfg, JobFacts(device="cuda")) == []
    assert (cfg.model.image_embedding, cfg.model.clip_image_norm, cfg.model.clip_precision, cfg.model.precision,
            cfg.data.episodes, cfg.model.drop_path, cfg.optim.fused_adam) == \
        ("online", "imagenet", "fp16", "fp32", "reference", 0.2, False)
    on_cpu = departures(apply_recipe(cfg, "paper", "cpu"), JobFacts(device="cpu", val_every=1))
    assert on_cpu == ["model.clip_precision fp32 (paper fp16) (CLIP fp16 runs on CUDA only)",
                      "validation every 1 epochs (paper 25)"]
    assert paper_settings("vit_b16")["data.image_size"] == 224


def test_the_default_tiny_run_lists_every_difference():
    found = departures(load_preset("tiny"), JobFacts(device="cpu", val_every=1))
    for fragment in ("model.backbone tiny", "model.clip_checkpoint random", "data.descriptions none",
                     "model.image_embedding precomputed (paper online)", "model.clip_image_norm clip (paper imagenet)",
                     "data.episodes ours (paper reference)", "optim.batch_size 8 (paper 32)", "validation every 1"):
        assert any(d.startswith(fragment) for d in found), (fragment, found)
    hrnet = apply_recipe(load_preset("swinv2_t"), "paper", "cpu")
    hrnet.model.backbone, hrnet.model.drop_path = "hrnet_w32", None
    assert any(d.startswith("BatchNorm over 8 images per worker") for d in departures(hrnet, JobFacts(workers=4)))
    assert not any(d.startswith("BatchNorm") for d in departures(hrnet, JobFacts(workers=4, sync_batchnorm=True)))


@pytest.mark.parametrize("command", ["train", "embed", "quickstart"])
def test_paper_recipe_without_descriptions_stops_before_any_work(command, prepared, synthetic_root, capsys, tmp_path):
    from jobs import quickstart, train
    from pipelines import embed

    main, argv = {
        "train": (train.main, ["--split", 1, "--shards", prepared / "shards", "--embeddings", prepared / "emb",
                               "--recipe", "paper", "--data-root", synthetic_root, *TINY]),
        "embed": (embed.main, ["--shards", prepared / "shards", "--out", tmp_path / "emb", "--recipe", "paper",
                               "--backbone", "tiny", "--clip-model", "tiny", "--clip-checkpoint", "random"]),
        "quickstart": (quickstart.main, ["--workdir", tmp_path / "q", "--data-root", synthetic_root, "--recipe",
                                         "paper"]),
    }[command]
    code, _, err = _run(main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--descriptions" in err and "python -m pipelines.descriptions" in err
    assert not (tmp_path / "emb").exists() and not (tmp_path / "q").exists()


def test_paper_recipe_refuses_tables_made_under_the_default_recipe(prepared, synthetic_root, descriptions,
                                                                    tmp_path, capsys, monkeypatch):
    from jobs import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, _, err = _run(train.main, ["--split", 1, "--shards", prepared / "shards", "--embeddings", prepared / "emb",
                                     "--recipe", "paper", "--descriptions", descriptions, "--data-root", synthetic_root,
                                     "--local", *TINY], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "embeddings" in err and "pipelines.embed" in err and "--recipe" in err
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was made


def test_paper_recipe_trains_on_cpu_and_says_how_far_it_is(prepared, synthetic_root, descriptions, tmp_path, capsys,
                                                            monkeypatch):
    """The paper recipe on the synthetic set on CPU with tiny settings: tables and run made with the reference's
    texts, online ImageNet-normalised image embedding, the reference's test episodes, fp32; the tags say
    recipe=paper and list what still differs (the tiny parts, CLIP fp32 on a CPU)."""
    from jobs import train
    from pipelines import embed

    emb = tmp_path / "emb"
    code, _, err = _run(embed.main, ["--shards", prepared / "shards", "--out", emb, "--recipe", "paper",
                                     "--descriptions", descriptions, "--backbone", "tiny", "--clip-model", "tiny",
                                     "--clip-checkpoint", "random", "--set", "data.image_size=128",
                                     "--set", "data.heatmap_size=32"], capsys)
    assert code == 0, err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(train.main, ["--split", 1, "--shards", prepared / "shards", "--embeddings", emb,
                                       "--recipe", "paper", "--descriptions", descriptions, "--data-root",
                                       synthetic_root, "--local", "--epochs", 1, "--max-steps", 2, "--set",
                                       "data.val_episodes=1", "--episodes", 2, "--queries", 3, *TINY], capsys)
    assert code == 0, err[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("capenext").experiment_id])
    params, tags = run.data.params, run.data.tags
    assert (params["model.image_embedding"], params["model.clip_image_norm"], params["data.episodes"],
            params["model.precision"], params["model.clip_precision"]) == ("online", "imagenet", "reference", "fp32",
                                                                           "fp32")
    assert params["data.descriptions"] == str(descriptions) and params["job.recipe"] == "paper"
    assert tags["recipe"] == "paper"
    found = tags["paper_departures"].split("; ")
    assert "model.clip_precision fp32 (paper fp16) (CLIP fp16 runs on CUDA only)" in found
    assert any(d.startswith("model.backbone tiny") for d in found) and any(d.startswith("optim.epochs 1") for d in found)
    assert not any(d.startswith(("model.image_embedding", "model.clip_image_norm", "data.episodes",
                                 "data.descriptions")) for d in found), found
    assert run.info.status == "FINISHED" and run.data.metrics["test/queries"] > 0
    assert os.path.isfile(tmp_path / "runs" / "split1-full-tiny" / "artifacts" / "final.pt")


def test_precision_is_the_models_setting_where_the_forward_runs():
    """``model.precision`` is what every forward (training, the protocol, prediction) reads: fp32 by default as
    the reference, bf16 autocast only when asked and only on CUDA."""
    import warnings
    from contextlib import nullcontext

    import torch

    from capenext.engine import autocast, precision_of
    from capenext.models import build_model

    cfg = load_preset("tiny")
    assert precision_of(build_model(cfg.model)) == "fp32"
    cfg.model.precision = "bf16"
    model = build_model(cfg.model)
    assert precision_of(model) == "bf16"
    assert isinstance(autocast(torch.device("cpu"), precision_of(model)), nullcontext)
    assert isinstance(autocast(torch.device("cuda"), "fp32"), nullcontext)
    with warnings.catch_warnings():  # no CUDA here: torch warns that the context would be disabled
        warnings.simplefilter("ignore")
        bf16 = autocast(torch.device("cuda"), "bf16")
    assert isinstance(bf16, torch.autocast) and bf16.fast_dtype == torch.bfloat16
