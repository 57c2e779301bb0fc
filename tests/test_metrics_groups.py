"""Keypoint-level PCK of the polysemous and the unambiguous keypoints (:mod:`capenext.metrics`), on a case small
enough to count by hand."""

from __future__ import annotations

import pytest
import torch

from capenext.data.mp100 import Category
from capenext.metrics import PCKAccumulator, metric_keys, polysemy_groups

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)


def _categories(poly_1: tuple[int, ...] = (0,), poly_2: tuple[int, ...] = (1, 2)) -> list[Category]:
    names = ("a", "b", "c")
    return [Category(1, "one", "s", names, (), poly_1), Category(2, "two", "t", names, (), poly_2)]


def _batch():
    """Two pairs, 3 keypoints in 4 slots (slot 3 is padding), normaliser 100 px, errors along x.

    pair 0, category 1 (polysemous: keypoint 0): errors 4, 12, 30 px, all visible
    pair 1, category 2 (polysemous: 1, 2):       errors 8, 22, 0 px, keypoint 2 not visible
    """
    target = torch.zeros(2, 4, 2)
    pred = target.clone()
    pred[0, :3, 0] = torch.tensor([4.0, 12.0, 30.0])
    pred[1, :3, 0] = torch.tensor([8.0, 22.0, 0.0])
    visible = torch.tensor([[True, True, True, False], [True, True, False, False]])
    return pred, target, visible, torch.tensor([100.0, 100.0]), torch.tensor([1, 2])


def test_group_pck_counts_correct_visible_keypoints_of_each_group_over_all_pairs():
    acc = PCKAccumulator(THRESHOLDS, polysemy_groups(_categories()))
    acc.update(*_batch())
    got = acc.result()
    # polysemous, visible: pair 0 kp 0 (0.04: correct at every threshold), pair 1 kp 1 (0.22: at 0.25 only)
    assert got["polysemous/keypoints"] == 2
    assert [got[k] for k in metric_keys("polysemous", THRESHOLDS, mean=False)] == pytest.approx([0.5] * 4 + [1.0])
    assert got["polysemous/pck_mean"] == pytest.approx(3 / 5)
    # unambiguous, visible: pair 0 kp 1 (0.12) and kp 2 (0.30), pair 1 kp 0 (0.08)
    assert got["unambiguous/keypoints"] == 3
    assert [got[k] for k in metric_keys("unambiguous", THRESHOLDS, mean=False)] == pytest.approx(
        [0, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert got["unambiguous/pck_mean"] == pytest.approx(7 / 15)
    # the standard PCK is still per pair, then averaged: pair 0 [1, 1, 2, 2, 2] / 3, pair 1 [0, 1, 1, 1, 2] / 2
    assert [got[k] for k in metric_keys(None, THRESHOLDS, mean=False)] == pytest.approx(
        [1 / 6, 5 / 12, 7 / 12, 7 / 12, 5 / 6])
    assert got["count"] == 2


def test_without_polysemous_keypoints_the_result_keeps_exactly_the_standard_keys():
    plain = _categories((), ())
    assert polysemy_groups(plain) is None
    acc = PCKAccumulator(THRESHOLDS, polysemy_groups(plain))
    acc.update(*_batch())
    assert set(acc.result()) == {*metric_keys(None, THRESHOLDS), "count"}


def test_summed_shares_give_the_whole_as_the_all_reduce_does():
    """Every sum (per pair and per group) sits in the one tensor that ``all_reduce`` reduces."""
    groups = polysemy_groups(_categories())
    pred, target, visible, norm, cid = _batch()
    whole, shares = PCKAccumulator(THRESHOLDS, groups), [PCKAccumulator(THRESHOLDS, groups) for _ in range(2)]
    whole.update(pred, target, visible, norm, cid)
    for b, share in enumerate(shares):
        share.update(pred[b:b + 1], target[b:b + 1], visible[b:b + 1], norm[b:b + 1], cid[b:b + 1])
    shares[0].sums += shares[1].sums
    assert shares[0].result() == pytest.approx(whole.result(), abs=1e-12)


def test_a_category_missing_from_the_groups_counts_as_unambiguous_and_ids_are_required():
    groups = polysemy_groups(_categories())
    pred, target, visible, norm, _ = _batch()
    acc = PCKAccumulator(THRESHOLDS, groups)
    acc.update(pred, target, visible, norm, torch.tensor([7, 7]))
    assert acc.result()["polysemous/keypoints"] == 0 and acc.result()["unambiguous/keypoints"] == 5
    assert acc.result()["polysemous/pck_0.25"] == 0.0
    with pytest.raises(ValueError, match="category_id"):
        PCKAccumulator(THRESHOLDS, groups).update(pred, target, visible, norm)
