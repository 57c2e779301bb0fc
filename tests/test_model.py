"""The CapeNext model: every preset x the tiny config, real backbones, CLIP, gates, graph, overfit.

All on CPU with random init and tiny inputs; the real backbones run one image each.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from capenext.config import ModelCfg, load_preset
from capenext.losses import CapeNextLoss
from capenext.metrics import pck
from capenext.models import (
    FrozenCLIP,
    available_ablations,
    available_backbones,
    build_model,
    create_backbone,
    get_ablation,
    parameter_counts,
)
from capenext.models.backbone import WITHOUT_DROP_PATH
from capenext.models.clip import IMAGENET_MEAN, IMAGENET_STD
from capenext.models.encoder import SinePositionalEncoding
from capenext.models.graph_decoder import fix_all_masked, normalized_adjacency
from capenext.models.proposal import ProposalGenerator
from tests.conftest import assert_one_line_error, in_process

REPO = Path(__file__).resolve().parents[1]
K = 100  # keypoint slots
ABLATIONS = available_ablations()
# the paper's ablations (Tables 2 and 3): streams, HCMI, fusion, gates
PAPER_ABLATIONS = {
    "full": (("img", "cls"), True, "dsfr", True),
    "no_hcmi": (("img", "cls"), False, "dsfr", True),
    "no_dsfr": (("img", "cls"), True, "projection", False),
    "no_lw": (("img", "cls"), True, "dsfr", False),
    "baseline": ((), False, None, False),
    "img_only": (("img",), True, "dsfr", True),
    "cls_only": (("cls",), True, "dsfr", True),
}



def tiny_cfg(**changes) -> ModelCfg:
    return dataclasses.replace(load_preset("tiny").model, **changes)


def random_batch(c: int, b: int = 2, size: int = 128, valid: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the data layer makes it: ``valid`` support-visible slots with a chain skeleton."""
    g = torch.Generator().manual_seed(seed)
    kp_mask = torch.zeros(b, K, dtype=torch.bool)
    kp_mask[:, :valid] = True
    adj = torch.zeros(b, K, K)
    adj[:, torch.arange(valid - 1), torch.arange(1, valid)] = 1
    return {
        "img": torch.randn(b, 3, size, size, generator=g),
        "kp_emb": F.normalize(torch.randn(b, K, c, generator=g), dim=-1) * kp_mask[..., None],
        "kp_mask": kp_mask,
        "adj": adj,
        "cls_emb": F.normalize(torch.randn(b, c, generator=g), dim=-1),
        "img_emb": F.normalize(torch.randn(b, c, generator=g), dim=-1),
    }


def loss_of(model, batch, out=None) -> dict[str, torch.Tensor]:
    out = model(batch) if out is None else out
    b = batch["img"].shape[0]
    g = torch.Generator().manual_seed(1)
    w = batch["kp_mask"].float()
    return CapeNextLoss()(out, torch.rand(b, K, 32, 32, generator=g), torch.rand(b, K, 2, generator=g), w, w)


def test_ablation_registry_holds_the_paper_presets_as_the_paper_defines_them():
    assert set(PAPER_ABLATIONS) <= set(available_ablations())
    for name, (streams, hcmi, fusion, gated) in PAPER_ABLATIONS.items():
        ab = get_ablation(name)
        assert (tuple(ab.streams), ab.hcmi, ab.fusion, ab.gated) == (streams, hcmi, fusion, gated), name
    assert {"swinv2_t", "hrnet_w32", "vit_b16", "dinov2_vits", "tiny"} <= set(available_backbones())


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_preset_runs_forward_and_backward_on_tiny(ablation):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(ablation=ablation)).train()
    batch = random_batch(model.clip.embed_dim)
    out = model(batch)
    assert out["sim"].shape == (2, K, 8, 8)  # 128 / 16
    assert out["proposal"].shape == out["proposal_local"].shape == (2, K, 2)
    assert out["points"].shape == (3, 2, K, 2)
    for key in ("proposal", "proposal_local", "points"):
        assert ((out[key] >= 0) & (out[key] <= 1)).all(), key
    losses = loss_of(model, batch, out)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_clip_gets_no_gradient_and_every_other_parameter_does():
    # online mode runs the CLIP image tower inside forward; it still must get no gradient
    torch.manual_seed(0)
    model = build_model(tiny_cfg(image_embedding="online")).train()
    batch = random_batch(model.clip.embed_dim)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # the offset heads' last layer starts at zero (reference init), so the decoder gets gradient
    # from the second step on: take one step, then check a fresh backward
    for step in range(2):
        opt.zero_grad()
        loss_of(model, batch)["loss"].backward()
        if step == 0:
            opt.step()
    clip_params = list(model.clip.parameters())
    assert clip_params and all(not p.requires_grad and p.grad is None for p in clip_params)
    clip_ids = {id(p) for p in clip_params}
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in clip_ids]
    assert all(p.requires_grad for _, p in others)
    no_grad = [n for n, p in others if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_clip_stays_frozen_and_in_eval_mode_when_the_model_trains():
    model = build_model(tiny_cfg())
    model.train()
    assert model.training and model.backbone.training
    assert not model.clip.training and not any(m.training for m in model.clip.modules())
    counts = parameter_counts(model)
    assert counts["frozen"] == sum(p.numel() for p in model.clip.parameters())


def test_gates_stay_in_unit_interval():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    batch = random_batch(model.clip.embed_dim, b=3)
    batch["cls_emb"] = batch["cls_emb"] * 50  # far outside the normal range
    with torch.no_grad():
        out = model(batch)
    for key in ("gate_img", "gate_cls"):
        assert out[key].shape == (3, K)
        assert ((out[key] >= 0) & (out[key] <= 1)).all()
    assert not torch.allclose(out["gate_img"], out["gate_cls"])


def _groups(model) -> set[str]:
    """Trainable parameter groups: top-level parts, and DSFR's/fusion's per-stream pieces."""
    groups = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] in ("dsfr", "projection"):
            groups.add(".".join(parts[:3] if parts[1] in ("attn", "gate", "proj") else parts[:2]))
        else:
            groups.add(parts[0])
    return groups


CORE = {"backbone", "joint_proj", "encoder", "proposal", "decoder", "offset_heads"}
DSFR_SHARED = {"dsfr.ffn", "dsfr.norm_w", "dsfr.norm_out"}


def expected_groups(ablation: str) -> set[str]:
    """The parameter groups an ablation's definition implies."""
    ab = get_ablation(ablation)
    groups = set(CORE) | ({"hcmi"} if ab.hcmi else set())
    if ab.fusion == "dsfr":
        groups |= DSFR_SHARED | {f"dsfr.attn.{s}" for s in ab.streams}
        groups |= {f"dsfr.gate.{s}" for s in ab.streams} if ab.gated else set()
    elif ab.fusion == "projection":
        groups |= {f"projection.proj.{s}" for s in ab.streams}
    return groups


def test_paper_presets_have_the_parameter_groups_of_their_definitions():
    assert expected_groups("full") == CORE | {"hcmi"} | DSFR_SHARED | {
        "dsfr.attn.img", "dsfr.attn.cls", "dsfr.gate.img", "dsfr.gate.cls"}
    assert expected_groups("no_dsfr") == CORE | {"hcmi", "projection.proj.img", "projection.proj.cls"}
    assert expected_groups("baseline") == CORE


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_preset_has_exactly_its_parameter_groups(ablation):
    model = build_model(tiny_cfg(ablation=ablation))
    assert _groups(model) == expected_groups(ablation)
    streams = get_ablation(ablation).streams
    assert (model.needs_image_embedding, model.needs_class_embedding) == ("img" in streams, "cls" in streams)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_an_ablation_asks_only_for_the_embeddings_it_uses(ablation):
    model = build_model(tiny_cfg(ablation=ablation)).eval()
    batch = random_batch(model.clip.embed_dim)
    if not model.needs_image_embedding:
        batch.pop("img_emb")
    if not model.needs_class_embedding:
        batch.pop("cls_emb")
    with torch.no_grad():
        out = model(batch)
    ab = get_ablation(ablation)
    gated = ab.fusion == "dsfr" and ab.gated
    assert ("gate_img" in out) == (gated and "img" in ab.streams)
    assert ("gate_cls" in out) == (gated and "cls" in ab.streams)
    if model.needs_image_embedding:
        batch.pop("img_emb")
        with pytest.raises(KeyError, match="img_emb"):
            model(batch)


def test_embeddings_change_the_prediction_only_where_the_ablation_uses_them():
    torch.manual_seed(0)
    results = {}
    for ablation in ("baseline", "full"):
        model = build_model(tiny_cfg(ablation=ablation)).eval()
        batch = random_batch(model.clip.embed_dim)
        other = dict(batch, img_emb=batch["img_emb"].flip(0), cls_emb=batch["cls_emb"].flip(0))
        with torch.no_grad():
            results[ablation] = (model(batch)["points"], model(other)["points"])
    assert torch.equal(*results["baseline"])
    assert not torch.allclose(*results["full"])


def test_online_image_embedding_equals_the_precomputed_one():
    torch.manual_seed(0)
    online = build_model(tiny_cfg(image_embedding="online")).eval()
    precomputed = build_model(tiny_cfg(image_embedding="precomputed")).eval()
    precomputed.load_state_dict(online.state_dict())
    batch = random_batch(online.clip.embed_dim)
    with torch.no_grad():
        batch["img_emb"] = online.clip.encode_image(batch["img"])
        a = online(dict(batch, img_emb=torch.zeros_like(batch["img_emb"])))  # online ignores the input
        b = precomputed(batch)
    torch.testing.assert_close(a["points"], b["points"])


def test_padded_slots_do_not_change_the_valid_keypoints():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    model.trim_slots = False  # compute all 100 slots, as the reference
    batch = random_batch(model.clip.embed_dim, valid=5)
    noisy = dict(batch)
    noisy["kp_emb"] = batch["kp_emb"].clone()
    noisy["kp_emb"][:, 5:] = torch.randn_like(noisy["kp_emb"][:, 5:])  # junk in padded slots
    noisy["adj"] = batch["adj"].clone()
    noisy["adj"][:, 2, 50] = noisy["adj"][:, 70, 3] = 1  # edges to padded slots
    with torch.no_grad():
        a, b = model(batch), model(noisy)
    torch.testing.assert_close(a["points"][:, :, :5], b["points"][:, :, :5])
    torch.testing.assert_close(a["sim"][:, :5], b["sim"][:, :5])


def test_trimming_padded_slots_keeps_valid_outputs_and_zero_fills_the_rest():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    batch = random_batch(model.clip.embed_dim, valid=5)
    batch["kp_mask"][0, 7] = True  # sample 0 has one more valid slot, after an invisible one
    batch["kp_emb"][0, 7] = F.normalize(torch.randn(model.clip.embed_dim), dim=0)
    assert model.active_slots(batch["kp_mask"]) == 8
    with torch.no_grad():
        trimmed = model(batch)
        model.trim_slots = False
        full = model(batch)
    assert trimmed.keys() == full.keys()
    for name, value in trimmed.items():
        assert value.shape == full[name].shape, name
        slot = (slice(None),) * (2 if name == "points" else 1)
        torch.testing.assert_close(value[slot + (slice(0, 8),)], full[name][slot + (slice(0, 8),)],
                                   atol=1e-5, rtol=1e-4, msg=name)
        assert (value[slot + (slice(8, None),)] == 0).all(), name


def test_a_sample_without_valid_keypoints_gives_finite_outputs():
    model = build_model(tiny_cfg()).eval()
    batch = random_batch(model.clip.embed_dim)
    batch["kp_mask"][1] = False
    batch["kp_emb"][1] = 0
    with torch.no_grad():
        out = model(batch)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert fix_all_masked(batch["kp_mask"])[1].tolist() == [True] + [False] * (K - 1)


def test_adjacency_is_symmetric_row_normalised_and_masked():
    g = torch.Generator().manual_seed(0)
    adj = (torch.rand(2, 10, 10, generator=g) < 0.25).float()
    adj[0] = 0
    adj[0, 0, 1] = adj[0, 1, 2] = adj[0, 4, 3] = 1  # directed edges
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    mask[0, 2] = False
    kernels = normalized_adjacency(adj, mask)
    assert kernels.shape == (2, 2, 10, 10)
    torch.testing.assert_close(kernels[:, 0], torch.diag_embed(mask.float()))
    a = kernels[:, 1]
    assert torch.equal(a > 0, (a > 0).transpose(1, 2))  # symmetric support
    assert (a[~mask] == 0).all() and (a.transpose(1, 2)[~mask] == 0).all()  # masked rows and columns
    rows = a.sum(-1)
    has_neighbour = (a > 0).any(-1)
    torch.testing.assert_close(rows[has_neighbour], torch.ones_like(rows[has_neighbour]))
    assert (rows[~has_neighbour] == 0).all()
    # sample 0 by hand: edge 1-2 is gone (2 masked), 0-1 and 3-4 survive both ways
    expected = torch.zeros(10, 10)
    expected[0, 1] = expected[1, 0] = expected[3, 4] = expected[4, 3] = 1
    torch.testing.assert_close(a[0], expected)


def test_sine_encoding_orders_y_then_x_and_matches_point_encoding():
    enc = SinePositionalEncoding(16)
    h, w = 4, 6
    grid = enc(h, w)  # (1, 32, h, w)
    assert grid.shape == (1, 32, h, w)
    # the map uses (i + 1) / h per axis; the point encoding of those coordinates must agree
    pts = torch.tensor([[[(j + 1) / w, (i + 1) / h] for i in range(h) for j in range(w)]])
    from_points = enc.coordinates(pts)[0].T.reshape(32, h, w)
    torch.testing.assert_close(grid[0], from_points, atol=1e-4, rtol=0)
    assert torch.allclose(grid[0, :16, :, 0], grid[0, :16, :, -1])  # y half constant along x
    assert torch.allclose(grid[0, 16:, 0, :], grid[0, 16:, -1, :])  # x half constant along y


def test_proposals_read_the_whole_map_and_the_window_around_the_peak():
    h = w = 4
    gen = ProposalGenerator(dim=16)
    with torch.no_grad():
        for lin in (gen.support_proj, gen.query_proj):
            lin.weight.copy_(torch.eye(16))
            lin.bias.zero_()
        gen.dynamic_proj[2].weight.zero_()
        gen.dynamic_proj[2].bias.zero_()  # tanh(0) = 0: fs = kp
    memory = torch.eye(16)[None]  # one token per cell → sim = kp
    logits = torch.full((16,), -30.0)
    logits[1 * w + 1] = 5.0 + torch.log(torch.tensor(3.0))  # the argmax, at row 1, column 1
    logits[1 * w + 2] = 5.0  # its right neighbour, a third of its mass
    logits[3 * w + 0] = 6.0  # a strong bump outside the 3x3 window around the argmax
    sim, proposal, local = gen(memory, logits[None, None], (h, w))
    assert sim.shape == (1, 1, h, w)
    p = torch.softmax(logits, 0)
    centres = torch.tensor([[(j + 0.5) / w, (i + 0.5) / h] for i in range(h) for j in range(w)])
    torch.testing.assert_close(proposal[0, 0], p @ centres)
    # argmax is (1, 1): window rows 0-2, columns 0-2 keeps (1, 1) and (1, 2) with mass 3:1
    torch.testing.assert_close(local[0, 0], torch.tensor([(0.75 * 1.5 + 0.25 * 2.5) / 4, 1.5 / 4]))


BACKBONE_MAPS = {  # name → trunk channels, map side at a 256 crop (docs/model.md)
    "swinv2_t": (768, 16),
    "hrnet_w32": (512, 16),
    "vit_b16": (768, 14),
    "dinov2_vits": (384, 16),
}


@pytest.mark.parametrize("name", [b for b in available_backbones() if b != "tiny"])  # tiny: the tests' own
def test_every_registered_backbone_builds_with_its_documented_map(name):
    assert name in BACKBONE_MAPS, f"backbone {name!r} is registered but its map is not documented here"
    channels, side = BACKBONE_MAPS[name]
    backbone = create_backbone(name, dim=256).eval()
    assert backbone.trunk_channels == channels
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 256, side, side)
    if name == "hrnet_w32":
        assert backbone.branch_channels == 32
        with torch.no_grad():
            assert backbone.trunk(torch.randn(1, 3, 256, 256))[0].shape == (1, 32, 64, 64)


def test_backbone_checkpoint_loads_from_a_local_file(tmp_path):
    source = create_backbone("dinov2_vits", dim=8)
    path = tmp_path / "dinov2.pth"
    torch.save(source.trunk.state_dict(), path)
    loaded = create_backbone("dinov2_vits", dim=8, checkpoint=str(path))
    for (name, a), b in zip(source.trunk.state_dict().items(), loaded.trunk.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_checkpoints_and_unknown_names_fail_with_the_options():
    with pytest.raises(FileNotFoundError, match="backbone_checkpoint"):
        create_backbone("swinv2_t", checkpoint="/no/such/file.pth")
    with pytest.raises(KeyError, match="available: .*swinv2_t"):
        create_backbone("resnet9000")
    with pytest.raises(KeyError, match="available: .*no_hcmi"):
        build_model(tiny_cfg(ablation="nope"))
    with pytest.raises(ValueError, match="--clip-checkpoint"):
        build_model(tiny_cfg(clip_checkpoint=None))
    with pytest.raises(FileNotFoundError, match="--clip-checkpoint /no/such/clip.pt: no such file"):
        build_model(tiny_cfg(clip_checkpoint="/no/such/clip.pt"))
    with pytest.raises(KeyError, match="tiny"):
        build_model(tiny_cfg(clip_model="ViT-Z-99"))
    with pytest.raises(ValueError, match="online"):
        build_model(tiny_cfg(image_embedding="sometimes"))


def test_clip_checkpoint_file_is_loaded(tmp_path):
    a = FrozenCLIP("tiny", "random")
    path = tmp_path / "tiny_clip.pt"
    torch.save(a.model.state_dict(), path)
    b = FrozenCLIP("tiny", str(path))
    torch.testing.assert_close(a.encode_text(["left eye"]), b.encode_text(["left eye"]))


def test_clip_encodes_prompts_and_normalised_embeddings():
    clip = FrozenCLIP("tiny", "random")
    texts = clip.encode_text(["left front paw", "nose"])
    assert texts.shape == (2, clip.embed_dim)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(clip.encode_class(["sofa_bed"]), clip.encode_text(["a photo of sofa bed"]))
    assert not torch.allclose(clip.encode_class(["nose"]), clip.encode_text(["nose"]))
    assert clip.encode_text([]).shape == (0, clip.embed_dim)


def test_clip_image_embedding_uses_clip_normalisation_at_clip_size():
    clip = FrozenCLIP("tiny", "random")
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 3, 96, 96, generator=g)  # pixels in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    emb = clip.encode_image((raw - mean) / std)
    cmean = torch.tensor(clip.model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073))[:, None, None]
    cstd = torch.tensor(clip.model.visual.image_std or (0.26862954, 0.26130258, 0.27577711))[:, None, None]
    x = F.interpolate((raw - cmean) / cstd, size=clip.image_size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = F.normalize(clip.model.encode_image(x), dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-4)


def _documented_counts() -> dict[str, int]:
    text = (REPO / "docs" / "model.md").read_text()
    counts = {}
    for key in ("trainable", "frozen"):
        m = re.search(rf"^\|\s*{key}\b[^|]*\|\s*([\d,]+)\s*\|", text, flags=re.MULTILINE | re.IGNORECASE)
        assert m, f"docs/model.md has no '| {key} | N |' row"
        counts[key] = int(m.group(1).replace(",", ""))
    return counts


def test_documented_parameter_counts_match_the_built_model():
    cfg = dataclasses.replace(load_preset("swinv2_t").model, clip_checkpoint="random")
    assert (cfg.ablation, cfg.backbone, cfg.clip_model) == ("full", "swinv2_t", "ViT-B-32")
    assert parameter_counts(build_model(cfg)) == _documented_counts()


def _blob_task(c: int, n: int = 8, k: int = 5, size: int = 128, hm: int = 32, seed: int = 0):
    """n images with k coloured discs; keypoint j is disc j, named by a fixed random text embedding."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1.0]])[:k]
    pts = 0.1 + 0.8 * torch.rand(n, k, 2, generator=g)  # (n, k, 2) in [0, 1]
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    imgs = torch.full((n, 3, size, size), 0.5)
    for i in range(n):
        for j in range(k):
            disc = (((xx - pts[i, j, 0] * size) ** 2 + (yy - pts[i, j, 1] * size) ** 2) < 36).float()
            imgs[i] = imgs[i] * (1 - disc) + colours[j][:, None, None] * disc
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    names = F.normalize(torch.randn(k, c, generator=g), dim=-1)
    kp_mask = torch.zeros(n, K, dtype=torch.bool)
    kp_mask[:, :k] = True
    kp_emb = torch.zeros(n, K, c)
    kp_emb[:, :k] = names
    adj = torch.zeros(n, K, K)
    adj[:, torch.arange(k - 1), torch.arange(1, k)] = 1
    batch = {
        "img": (imgs - mean) / std, "kp_emb": kp_emb, "kp_mask": kp_mask, "adj": adj,
        "cls_emb": F.normalize(torch.randn(1, c, generator=g), dim=-1).expand(n, c),
        "img_emb": F.normalize(torch.randn(n, c, generator=g), dim=-1),
    }
    points = torch.zeros(n, K, 2)
    points[:, :k] = pts
    hy, hx = torch.meshgrid(torch.arange(hm).float(), torch.arange(hm).float(), indexing="ij")
    centre = pts * hm - 0.5
    heatmap = torch.zeros(n, K, hm, hm)
    heatmap[:, :k] = torch.exp(-((hx - centre[..., 0, None, None]) ** 2 + (hy - centre[..., 1, None, None]) ** 2) / 2)
    return batch, points, heatmap


def test_tiny_model_overfits_eight_synthetic_samples():
    torch.manual_seed(0)
    cfg = load_preset("tiny")
    model = build_model(cfg.model)
    size = cfg.data.image_size
    batch, points, heatmap = _blob_task(model.clip.embed_dim, size=size, hm=cfg.data.heatmap_size)
    n = batch["img"].shape[0]
    weight = batch["kp_mask"].float()
    loss_fn = CapeNextLoss(heatmap_weight=cfg.optim.heatmap_weight)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    warmup = cfg.optim.warmup_iters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    norm = torch.full((n,), float(size))  # the crop is the bbox here

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(batch)["points"][-1]
        model.train()
        return pck(pred * size, points * size, batch["kp_mask"], norm)[0.2]

    start, max_steps, score, steps = time.monotonic(), 250, evaluate(), 0
    assert score < 0.9  # not solved at init
    while steps < max_steps and score < 0.9:
        for _ in range(25):
            loss = loss_fn(model(batch), heatmap, points, weight, weight)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        steps += 25
        score = evaluate()
    assert score >= 0.9, f"PCK@0.2 {score:.3f} after {steps} steps ({time.monotonic() - start:.0f} s)"


def _benchmark(argv: list[str], capsys, monkeypatch) -> SimpleNamespace:
    """``python -m jobs.benchmark ARGV`` in this process: exit code, stdout, stderr. (The entry point's one
    real process is tests/test_bench_gpu.py's ``gpu-suite`` run.) The global RNG the benchmark seeds is
    restored after; the torch thread count it sets, by the ``one_cpu_thread`` fixture."""
    from jobs import benchmark

    with torch.random.fork_rng(devices=[]):
        return in_process(benchmark.main, argv, capsys, monkeypatch)


def test_benchmark_model_prints_ratios_against_the_backbone(capsys, monkeypatch):
    proc = _benchmark(["model", "--preset", "tiny", "--backbone", "tiny", "--batch-size", "2", "--device", "cpu",
                       "--steps", "1", "--rounds", "1", "--warmup", "0", "--threads", "1"], capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    speeds, ratios = result["train_img_per_s"], result["ratio_vs_backbone"]
    assert set(speeds) == {"backbone_only", "full_precomputed", "full_online"}
    assert all(v > 0 for v in speeds.values())
    for name in ("full_precomputed", "full_online"):
        assert ratios[name] == pytest.approx(speeds[name] / speeds["backbone_only"], rel=0.01)
    assert set(result["peak_memory_mb"]) == set(speeds)
    assert result["goal_met"] == (ratios["full_precomputed"] >= 0.85)
    bad = _benchmark(["model", "--preset", "tiny", "--backbone", "resnet9000", "--device", "cpu"], capsys, monkeypatch)
    assert_one_line_error(bad, "resnet9000", "swinv2_t")
    assert bad.returncode == 2 and bad.stdout == ""


def test_clip_image_norm_imagenet_feeds_the_crop_as_the_reference_does():
    """``clip_image_norm="imagenet"`` (converted official checkpoints) gives CLIP the ImageNet-normalised crop
    unchanged; the default re-normalises it with CLIP's own statistics, so the two differ."""
    import torch.nn.functional as F

    from capenext.models.clip import FrozenCLIP

    ours, ref = FrozenCLIP("tiny", "random"), FrozenCLIP("tiny", "random", image_norm="imagenet")
    crop = torch.randn(2, 3, 64, 64)
    size = ref.image_size
    with torch.no_grad():
        raw = F.normalize(ref.model.encode_image(F.interpolate(crop, size=size, mode="bilinear",
                                                               align_corners=False)).float(), dim=-1)
    assert torch.allclose(ref.encode_image(crop), raw, atol=1e-6)
    assert not torch.allclose(ours.encode_image(crop), raw, atol=1e-3)
    with pytest.raises(ValueError, match="clip_image_norm"):
        FrozenCLIP("tiny", "random", image_norm="other")


def _largest_drop_path(module: torch.nn.Module) -> float:
    from timm.layers import DropPath

    return max((m.drop_prob for m in module.modules() if isinstance(m, DropPath)), default=0.0)


@pytest.mark.parametrize("name", [b for b in available_backbones() if b not in WITHOUT_DROP_PATH])
def test_drop_path_reaches_every_backbone_that_has_one(name):
    backbone = create_backbone(name, dim=16, drop_path=0.3)
    assert _largest_drop_path(backbone) == pytest.approx(0.3)  # timm's rate rises to the value at the last block


def test_drop_path_defaults_are_the_references():
    assert _largest_drop_path(create_backbone("swinv2_t", dim=16)) == pytest.approx(0.2)
    assert _largest_drop_path(create_backbone("dinov2_vits", dim=16)) == 0.0
    assert load_preset("swinv2_t").model.drop_path is None  # None: the backbone's own reference value


@pytest.mark.parametrize("name", WITHOUT_DROP_PATH)
def test_a_backbone_without_drop_path_refuses_a_nonzero_value(name):
    with pytest.raises(ValueError, match=f"backbone '{name}' has no drop path"):
        create_backbone(name, dim=16, drop_path=0.1)
    create_backbone(name, dim=16, drop_path=0.0)
