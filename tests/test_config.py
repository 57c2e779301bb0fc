"""The config layer (presets, ``--set`` parsing, resolution), the learning-rate schedule, the PCK protocol's
names and seeds, and the noise registry: small pure functions every job relies on."""

from __future__ import annotations

import pytest
import torch

from capenext.config import OptimCfg, default_preset, load_preset, override, parse_sets, resolve
from capenext.engine import lr_factor, make_optimizer
from capenext.metrics import PCKAccumulator, episode_seed, metric_keys, pck, pck_norm
from capenext.noise import NoiseKind, Variant, get_noise, noise_kinds, register_noise


def test_set_items_parse_into_dotted_keys_with_spaces_trimmed():
    assert parse_sets(["optim.lr=2e-5", " model.ablation = no_hcmi ", "data.descriptions=a=b.json"]) == {
        "optim.lr": "2e-5", "model.ablation": "no_hcmi", "data.descriptions": "a=b.json"}


@pytest.mark.parametrize("item", ["optim.lr", "=3", ""])
def test_a_set_item_without_key_and_value_is_refused(item):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sets([item])


def test_resolve_applies_preset_then_named_options_then_sets():
    cfg = resolve(None, {"model.backbone": "tiny", "optim.epochs": 3, "optim.seed": None},
                  ["optim.epochs=5", "model.clip_quick_gelu=false", "optim.lr_steps=0.5,0.75"])
    assert cfg.model.backbone == "tiny" and cfg.data.image_size == load_preset("tiny").data.image_size
    assert cfg.optim.epochs == 5  # --set wins over the named option
    assert cfg.optim.seed == 0  # None leaves the preset's value
    assert cfg.model.clip_quick_gelu is False
    assert cfg.optim.lr_steps == (0.5, 0.75)
    assert default_preset("tiny") == "tiny" and default_preset(None) == default_preset("hrnet_w32") == "swinv2_t"


def test_unknown_keys_and_bad_values_name_what_is_wrong():
    cfg = load_preset("tiny")
    with pytest.raises(KeyError, match="unknown config key 'model.nope'"):
        override(cfg, {"model.nope": "1"})
    with pytest.raises(ValueError, match="model.clip_quick_gelu.*true/false"):
        override(cfg, {"model.clip_quick_gelu": "maybe"})
    with pytest.raises(ValueError, match="optim.epochs"):
        override(cfg, {"optim.epochs": "many"})
    with pytest.raises(KeyError, match="preset 'nope' not found"):
        resolve("nope", {}, [])


def test_lr_warms_up_linearly_then_drops_tenfold_at_each_step():
    o = OptimCfg(warmup_iters=100, warmup_ratio=0.001, epochs=10, lr_steps=(0.8, 0.9))
    assert lr_factor(0, 0, o) == pytest.approx(0.001)
    assert lr_factor(50, 0, o) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(100, 0, o) == lr_factor(5000, 7, o) == 1.0
    assert lr_factor(5000, 8, o) == pytest.approx(0.1)  # epoch 8 = 80 % of 10
    assert lr_factor(5000, 9, o) == pytest.approx(0.01)
    assert lr_factor(10, 9, o) == pytest.approx((0.001 + 0.999 * 0.1) * 0.01)  # both at once


def test_metric_names_and_episode_seeds_are_the_protocols():
    assert metric_keys("test") == ["test/pck_0.05", "test/pck_0.1", "test/pck_0.15", "test/pck_0.2",
                                   "test/pck_0.25", "test/pck_mean"]
    assert metric_keys("floor", (0.2,), mean=False) == ["floor/pck_0.2"]
    assert (episode_seed(7, "val"), episode_seed(7, "test")) == (8, 9)
    assert pck_norm([3.0, 4.0, 10.0, 25.0]) == 25.0


def test_accumulator_over_batches_equals_pck_of_everything():
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(10, 6, 2, generator=g) * 50, torch.rand(10, 6, 2, generator=g) * 50
    vis = torch.rand(10, 6, generator=g) > 0.3
    vis[3] = False  # a sample with nothing visible scores 0 and counts
    norm = torch.full((10,), 60.0)
    acc = PCKAccumulator()
    for lo in range(0, 10, 4):
        acc.update(pred[lo:lo + 4], gt[lo:lo + 4], vis[lo:lo + 4], norm[lo:lo + 4])
    whole = pck(pred, gt, vis, norm)
    got = acc.result()
    assert got["count"] == 10
    assert got["pck_0.2"] == pytest.approx(whole[0.2]) and got["pck_mean"] == pytest.approx(whole["mean"])


def test_noise_registry_gives_rows_and_takes_new_kinds():
    assert noise_kinds()[:5] == ["none", "class", "class_per_category", "typo", "template"]
    (per_query,) = get_noise("class").variants()
    assert per_query.per_query and not get_noise("class_per_category").variants()[0].per_query
    (row,) = get_noise("typo").variants(rate=0.3, seed=1)
    assert row.name == "typo@0.3" and row.text("left eye") != "left eye"
    assert get_noise("typo").in_tables(row, {"typo_rates": [0.3], "noise_seed": 1}, 1)
    assert not get_noise("typo").in_tables(row, {"typo_rates": [0.3], "noise_seed": 0}, 1)
    names = [v.name for v in get_noise("template").variants()]
    assert "template:paw-foreleg" in names
    with pytest.raises(KeyError, match="unknown noise kind 'shout'"):
        get_noise("shout")
    kind = register_noise(NoiseKind("shout_test", "keypoints", "upper case",
                                    lambda **_: [Variant("shout_test", "shout", str.upper)], lambda v, m, s: False))
    try:
        assert "shout_test" in noise_kinds() and kind.variants()[0].text("nose") == "NOSE"
        with pytest.raises(ValueError, match="registered already"):
            register_noise(kind)
    finally:
        from capenext import noise

        noise._NOISE.pop("shout_test")


def test_fused_adam_makes_the_reference_adams_update():
    """optim.fused_adam (the default) steps as torch.optim.Adam does, to float rounding."""
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    weights = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make_optimizer(params, OptimCfg(lr=1e-2, weight_decay=1e-4, fused_adam=fused))
        assert opt.defaults["fused"] is fused
        for step in range(5):
            opt.zero_grad()
            (params[0].sin().sum() * (step + 1) + params[1].pow(2).sum()).backward()
            opt.step()
        weights[fused] = params
    assert OptimCfg().fused_adam is True
    for plain, fused in zip(weights[False], weights[True]):
        assert not torch.equal(plain, start[0] if plain.ndim == 2 else start[1])
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
