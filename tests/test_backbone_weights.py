"""HRNet-W32 ImageNet weights in the reference's layout (mmpose's hrnet_w32-36af842e.pth) → our hrnet_w32.

The file's names and shapes are written down here from the HRNet code's module tree (mmpose 0.29
``mmpose/models/backbones/hrnet.py`` and ``resnet.py``: ``HRNet``, ``HRModule``, ``Bottleneck``,
``BasicBlock``), not derived from our timm model, so the test checks timm's names against mmpose's.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from capenext.models.backbone import create_backbone

WIDTHS = (32, 64, 128, 256)  # HRNet-W32's branch widths, highest resolution first
STAGES = {2: (1, 2), 3: (4, 3), 4: (3, 4)}  # stage → (HRModules, branches); 4 BasicBlocks per branch
HEAD_PLANES = (32, 64, 128, 256)  # the ImageNet head's Bottleneck widths per branch (x4 out)


def _conv(out: dict, name: str, cout: int, cin: int, k: int, bias: bool = False) -> None:
    out[f"{name}.weight"] = (cout, cin, k, k)
    if bias:
        out[f"{name}.bias"] = (cout,)


def _bn(out: dict, name: str, c: int) -> None:  # mmcv build_norm_layer(BN): running stats + counter
    for field in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{field}"] = (c,)
    out[f"{name}.num_batches_tracked"] = ()


def _bottleneck(out: dict, name: str, cin: int, mid: int) -> None:  # conv1x1-bn, conv3x3-bn, conv1x1-bn (x4)
    _conv(out, f"{name}.conv1", mid, cin, 1)
    _bn(out, f"{name}.bn1", mid)
    _conv(out, f"{name}.conv2", mid, mid, 3)
    _bn(out, f"{name}.bn2", mid)
    _conv(out, f"{name}.conv3", 4 * mid, mid, 1)
    _bn(out, f"{name}.bn3", 4 * mid)
    if cin != 4 * mid:  # the first block changes the width: 1x1 conv + BN on the identity
        _conv(out, f"{name}.downsample.0", 4 * mid, cin, 1)
        _bn(out, f"{name}.downsample.1", 4 * mid)


def _basic(out: dict, name: str, c: int) -> None:  # conv3x3-bn, conv3x3-bn
    for i in (1, 2):
        _conv(out, f"{name}.conv{i}", c, c, 3)
        _bn(out, f"{name}.bn{i}", c)


def trunk_shapes() -> dict[str, tuple]:
    """Every trunk tensor of the ImageNet file in mmpose's HRNet names (all fuse rows: the classifier used
    every resolution)."""
    out: dict[str, tuple] = {}
    _conv(out, "conv1", 64, 3, 3)  # stem: two conv3x3/2 + BN
    _bn(out, "bn1", 64)
    _conv(out, "conv2", 64, 64, 3)
    _bn(out, "bn2", 64)
    for k in range(4):  # layer1: 4 Bottlenecks, 64 → 256
        _bottleneck(out, f"layer1.{k}", 64 if k == 0 else 256, 64)
    prev = [256]
    for n, (modules, branches) in STAGES.items():
        cur = list(WIDTHS[:branches])
        for i, c in enumerate(cur):  # transition{n-1}: re-width a kept branch, or one conv3x3/2 for the new one
            if i < len(prev) and prev[i] != c:
                _conv(out, f"transition{n - 1}.{i}.0", c, prev[i], 3)
                _bn(out, f"transition{n - 1}.{i}.1", c)
            elif i >= len(prev):
                _conv(out, f"transition{n - 1}.{i}.0.0", c, prev[-1], 3)
                _bn(out, f"transition{n - 1}.{i}.0.1", c)
        for m in range(modules):
            for b, c in enumerate(cur):
                for k in range(4):
                    _basic(out, f"stage{n}.{m}.branches.{b}.{k}", c)
            for i in range(branches):
                for j in range(branches):
                    fuse = f"stage{n}.{m}.fuse_layers.{i}.{j}"
                    if j > i:  # lower resolution into i: 1x1 conv + BN (then nearest upsampling)
                        _conv(out, f"{fuse}.0", cur[i], cur[j], 1)
                        _bn(out, f"{fuse}.1", cur[i])
                    for k in range(i - j):  # higher resolution into i: i - j conv3x3/2 + BN
                        c_out = cur[i] if k == i - j - 1 else cur[j]
                        _conv(out, f"{fuse}.{k}.0", c_out, cur[j], 3)
                        _bn(out, f"{fuse}.{k}.1", c_out)
        prev = cur
    return out


def head_shapes(layout: str) -> dict[str, tuple]:
    """The ImageNet classification head: ``head`` (the reference's file: mmpose's load log lists
    ``head.0.{i}.0.*`` Bottlenecks) or HRNet-Image-Classification's / timm's names."""
    out: dict[str, tuple] = {}
    incre = "head.0" if layout == "head" else "incre_modules"
    for i, (c, planes) in enumerate(zip(WIDTHS, HEAD_PLANES)):
        _bottleneck(out, f"{incre}.{i}.0", c, planes)
    if layout == "head":
        return out
    for i in range(3):
        _conv(out, f"downsamp_modules.{i}.0", 4 * HEAD_PLANES[i + 1], 4 * HEAD_PLANES[i], 3, bias=True)
        _bn(out, f"downsamp_modules.{i}.1", 4 * HEAD_PLANES[i + 1])
    _conv(out, "final_layer.0", 2048, 1024, 1, bias=True)
    _bn(out, "final_layer.1", 2048)
    out["classifier.weight"], out["classifier.bias"] = (1000, 2048), (1000,)
    return out


def unbuilt(key: str) -> bool:
    """The last module's fuse rows into the lower resolutions: not built by the reference's HRNet."""
    return re.match(r"stage4\.2\.fuse_layers\.[123]\.", key) is not None


def random_state(shapes: dict[str, tuple], seed: int = 0, counters: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            if counters:
                state[key] = torch.tensor(1000 + i)
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    """(path, state) of a file as mmpose's hrnet_w32-36af842e.pth: a bare state dict, head named ``head``."""
    state = random_state({**trunk_shapes(), **head_shapes("head")})
    path = tmp_path_factory.mktemp("hrnet") / "hrnet_w32-36af842e.pth"
    torch.save(state, path)
    return path, state


def test_the_reference_file_fills_every_tensor_of_our_trunk_under_its_own_name(reference_file):
    path, state = reference_file
    backbone = create_backbone("hrnet_w32", dim=8, checkpoint=str(path))
    ours = backbone.trunk.state_dict()
    kept = {k for k in state if not k.startswith("head.") and not unbuilt(k)}
    assert set(ours) == kept  # mmpose's names, as written above, are exactly our trunk's
    for key in kept:
        assert torch.equal(ours[key], state[key]), key
    assert backbone.weights.loaded == len(ours)
    assert sorted(backbone.weights.dropped) == sorted(k for k in state if k.startswith("head.") or unbuilt(k))
    assert any(unbuilt(k) for k in backbone.weights.dropped)
    assert "stage4.2.fuse_layers.1.*" in backbone.weights.summary() and "head.0.*" in backbone.weights.summary()


def test_an_mmcv_checkpoint_with_the_classification_names_and_no_counters_loads(tmp_path):
    state = random_state({**trunk_shapes(), **head_shapes("classification")}, seed=1, counters=False)
    path = tmp_path / "hrnet_w32_mmcv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()},
                "meta": {"mmcv_version": "1.7.2", "epoch": 100}}, path)
    backbone = create_backbone("hrnet_w32", dim=8, checkpoint=str(path))
    ours = backbone.trunk.state_dict()
    for key, value in state.items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    assert backbone.weights.counters_kept == sum(k.endswith("num_batches_tracked") for k in ours)
    assert {k.split(".")[1] for k in backbone.weights.dropped if not unbuilt(k[len("module."):])} == {
        "incre_modules", "downsamp_modules", "final_layer", "classifier"}


@pytest.mark.parametrize("change, named", [
    ("missing", "1 missing (first: stage3.1.branches.2.3.bn2.running_var)"),
    ("unexpected", "1 unexpected (first: stage2.0.branches.0.0.conv3.weight)"),
    ("shape", "1 of another shape (first: layer1.0.conv1.weight (64, 64, 3, 3) (ours (64, 64, 1, 1)))"),
], ids=["missing", "unexpected", "shape"])
def test_a_file_that_does_not_fit_is_refused_in_one_line_naming_the_tensor(reference_file, tmp_path, change, named):
    _, state = reference_file
    state = dict(state)
    if change == "missing":
        del state["stage3.1.branches.2.3.bn2.running_var"]
    elif change == "unexpected":
        state["stage2.0.branches.0.0.conv3.weight"] = torch.zeros(32, 32, 1, 1)
    else:
        state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    path = tmp_path / f"{change}.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        create_backbone("hrnet_w32", dim=8, checkpoint=str(path))
    message = str(err.value)
    assert "\n" not in message and named in message and "backbone_checkpoint" in message


def test_files_that_are_not_hrnet_weights_are_refused_in_one_line(tmp_path):
    swin = tmp_path / "swin.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}, swin)
    with pytest.raises(ValueError, match=r"not HRNet weights .*patch_embed\.proj\.weight"):
        create_backbone("hrnet_w32", dim=8, checkpoint=str(swin))
    numpy_meta = tmp_path / "numpy_meta.pth"  # refused by name, nothing of it unpickled
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 3, 3)}, "meta": {"best": np.float64(0.5)}},
               numpy_meta)
    with pytest.raises(ValueError, match=r"weights_only=True, it holds numpy"):
        create_backbone("hrnet_w32", dim=8, checkpoint=str(numpy_meta))


def test_our_hrnet_builds_only_what_the_reference_builds_and_trains_all_of_it():
    backbone = create_backbone("hrnet_w32", dim=8)
    assert len(backbone.trunk.stage4[-1].fuse_layers) == 1  # into the highest resolution only
    assert set(backbone.trunk.state_dict()) == {k for k in trunk_shapes() if not unbuilt(k)}
    backbone(torch.randn(1, 3, 64, 64)).sum().backward()
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []  # nothing unused under DDP


def test_jobs_train_refuses_a_file_that_does_not_fit_before_any_worker_or_run(prepared, tmp_path, capsys,
                                                                               monkeypatch):
    """The training pre-flight reads and maps ``--backbone-checkpoint`` once: a file that does not fit is one
    line, before any worker starts and before any MLflow run is made."""
    from capenext.cli import run_main
    from jobs import train

    swin = tmp_path / "swin.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}, swin)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit) as exc:
        run_main(train.main, ["--split", "1", "--shards", str(prepared / "shards"), "--embeddings",
                              str(prepared / "emb"), "--backbone", "hrnet_w32", "--backbone-checkpoint", str(swin),
                              "--clip-checkpoint", "random", "--local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --backbone-checkpoint {swin}: ") and "not HRNet weights" in err[0]
    assert not (tmp_path / "mlflow.db").exists()
