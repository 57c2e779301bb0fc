"""The loss (Eq. 9-11 as the reference computes it) and PCK, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from capenext.losses import CapeNextLoss
from capenext.metrics import pck, pck_per_sample


# ---------------------------------------------------------------- PCK


def test_pck_counts_distances_strictly_below_threshold_times_norm():
    # one sample, norm 100: errors of 4, 10 (exactly 0.1 * norm), 12 and 30 pixels
    target = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[4.0, 0.0], [6.0, 8.0], [0.0, 12.0], [30.0, 0.0]]])
    visible = torch.ones(1, 4, dtype=torch.bool)
    result = pck(pred, target, visible, torch.tensor([100.0]))
    assert result[0.05] == pytest.approx(1 / 4)  # 4 < 5
    assert result[0.1] == pytest.approx(1 / 4)  # 10 is not strictly below 10
    assert result[0.15] == pytest.approx(3 / 4)  # 4, 10, 12
    assert result[0.2] == pytest.approx(3 / 4)
    assert result[0.25] == pytest.approx(3 / 4)  # 30 >= 25
    assert result["mean"] == pytest.approx((0.25 + 0.25 + 0.75 + 0.75 + 0.75) / 5)


def test_pck_ignores_invisible_keypoints_and_averages_over_samples():
    target = torch.zeros(2, 3, 2)
    pred = torch.tensor([
        [[1.0, 0.0], [500.0, 0.0], [0.0, 30.0]],  # visible: 1 px (ok), 30 px (wrong); middle invisible
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # all correct, only the first visible
    ])
    visible = torch.tensor([[True, False, True], [True, False, False]])
    norm = torch.tensor([100.0, 10.0])
    result = pck(pred, target, visible, norm, thresholds=(0.2,))
    assert result[0.2] == pytest.approx((1 / 2 + 1) / 2)
    assert result["mean"] == pytest.approx(0.75)
    assert set(result) == {0.2, "mean"}


def test_pck_scores_a_sample_without_visible_keypoints_as_zero():
    target = torch.zeros(2, 2, 2)
    pred = torch.zeros(2, 2, 2)  # perfect everywhere
    visible = torch.tensor([[True, True], [False, False]])
    per = pck_per_sample(pred, target, visible, torch.tensor([50.0, 50.0]), thresholds=(0.05, 0.2))
    assert per.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert pck(pred, target, visible, torch.tensor([50.0, 50.0]))[0.2] == pytest.approx(0.5)


def test_pck_normalises_each_sample_by_its_own_bbox():
    target = torch.zeros(2, 1, 2)
    pred = torch.tensor([[[15.0, 0.0]], [[15.0, 0.0]]])
    visible = torch.ones(2, 1, dtype=torch.bool)
    result = pck(pred, target, visible, torch.tensor([100.0, 50.0]), thresholds=(0.2,))
    assert result[0.2] == pytest.approx(0.5)  # 15 < 20 but 15 >= 10


# ---------------------------------------------------------------- loss


def _out(points_err: list[list[float]], layers: int = 3, k: int = 4, b: int = 2, h: int = 4) -> dict:
    """Outputs whose points differ from target (all 0.5) by ``points_err`` for sample 0, keypoint 0/1."""
    pts = torch.full((b, k, 2), 0.5)
    pts[0, 0] += torch.tensor(points_err[0])
    pts[0, 1] += torch.tensor(points_err[1])
    return {
        "sim": torch.zeros(b, k, h, h),
        "proposal": pts.clone(),
        "points": pts.unsqueeze(0).repeat(layers, 1, 1, 1),
    }


def test_offset_terms_are_l1_per_valid_keypoint_averaged_over_the_batch():
    b, k = 2, 4
    out = _out([[0.1, 0.0], [0.0, -0.2]])
    target = torch.full((b, k, 2), 0.5)
    query = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    support = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # keypoints 0, 1 valid in sample 0
    heat = torch.zeros(b, k, 4, 4)
    terms = CapeNextLoss()(out, heat, target, query, support)
    # sample 0: (0.1 + 0.2) / 2 valid; sample 1: no valid keypoint → 0 (normalizer 1); / B = 2
    expected = (0.3 / 2 + 0) / 2
    for name in ("proposal", "offset_layer0", "offset_layer1", "offset_layer2"):
        assert terms[name].item() == pytest.approx(expected, rel=1e-5), name


def test_heatmap_term_is_mse_of_sigmoid_against_peak_one_target():
    b, k, h = 1, 2, 4
    out = _out([[0.0, 0.0], [0.0, 0.0]], b=b, k=k, h=h)
    heat = torch.zeros(b, k, h, h)
    heat[0, 0, 1, 2] = 0.25  # renormalised to peak 1
    heat[0, 1, 3, 3] = 1.0
    w = torch.ones(b, k)
    terms = CapeNextLoss()(out, heat, torch.full((b, k, 2), 0.5), w, w)
    # sigmoid(0) = 0.5 against {0, 1}: every pixel costs 0.25; mean over pixels, sum over 2 keypoints / 2
    assert terms["heatmap"].item() == pytest.approx(0.25)
    confident = dict(out, sim=torch.where(heat > 0, 20.0, -20.0))  # ≈ target after sigmoid
    assert CapeNextLoss()(confident, heat, torch.full((b, k, 2), 0.5), w, w)["heatmap"].item() < 1e-6


def test_heatmap_target_is_resized_to_the_map_and_renormalised():
    b, k = 1, 1
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    gauss = torch.exp(-((xx - 30.3) ** 2 + (yy - 17.8) ** 2) / 2)[None, None]  # sigma 1 at 64x64
    w = torch.ones(b, k)
    out = _out([[0.0, 0.0], [0.0, 0.0]], b=b, k=2, h=16)
    out = {key: v[..., :1, :, :] if key == "sim" else v[..., :1, :] for key, v in out.items()}
    target = torch.full((b, k, 2), 0.5)
    a = CapeNextLoss()(out, gauss, target, w, w)["heatmap"]
    scaled = CapeNextLoss()(out, 0.3 * gauss, target, w, w)["heatmap"]
    torch.testing.assert_close(a, scaled)  # the peak is renormalised to 1
    # with sim = 0 the loss is mean((0.5 - t)^2) over the 16x16 resized target
    t = torch.nn.functional.interpolate(gauss, size=(16, 16), mode="bilinear", align_corners=False)
    t = t / t.max()
    assert a.item() == pytest.approx(((0.5 - t) ** 2).mean().item(), rel=1e-5)


def test_total_is_weighted_sum_of_named_terms():
    out = _out([[0.1, 0.1], [0.0, 0.3]])
    heat = torch.rand(2, 4, 4, 4)
    w = torch.ones(2, 4)
    loss_fn = CapeNextLoss(heatmap_weight=2.0)
    terms = loss_fn(out, heat, torch.full((2, 4, 2), 0.5), w, w)
    assert set(terms) == {"heatmap", "proposal", "offset_layer0", "offset_layer1", "offset_layer2", "loss"}
    assert loss_fn.weights["heatmap"] == 2.0
    total = 2.0 * terms["heatmap"] + terms["proposal"] + sum(terms[f"offset_layer{i}"] for i in range(3))
    assert terms["loss"].item() == pytest.approx(total.item())
    assert math.isfinite(terms["loss"].item())


def test_loss_masks_by_query_and_support_weights():
    out = _out([[0.4, 0.0], [0.0, 0.4]])
    target = torch.full((2, 4, 2), 0.5)
    heat = torch.zeros(2, 4, 4, 4)
    ones = torch.ones(2, 4)
    only_second = ones.clone()
    only_second[0, 0] = 0  # keypoint 0 of sample 0 invisible in the support
    a = CapeNextLoss()(out, heat, target, ones, only_second)
    b = CapeNextLoss()(out, heat, target, only_second, ones)
    # sample 0: keypoint 1 alone is valid (error 0.4) over 3 valid keypoints; sample 1 is perfect
    assert a["proposal"].item() == pytest.approx((0.4 / 3) / 2, rel=1e-5)
    torch.testing.assert_close(a["proposal"], b["proposal"])
