"""The test protocol at the cost of its unique work (:func:`capenext.protocol.run_protocol`) gives the numbers
of the per-pair loop (:func:`capenext.protocol.per_pair_protocol`), pair by pair.

A tiny model at random weights (the ``tiny`` preset, seeded) on the synthetic set's split 1 test episodes,
with the session's shards and tiny random-CLIP tables (``prepared``); no training is needed, as any
weights must give the same predictions both ways.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from capenext.config import THRESHOLDS, load_preset
from capenext.data.embeddings import load_bank
from capenext.data.shards import ShardIndex
from capenext.metrics import GROUPS, metric_keys, pck_key
from capenext.models import build_model
from capenext.protocol import _Cached, our_pairs, plan, run_protocol

PX = 1e-4  # largest |Δ| of a prediction, image pixels
PCK = 1e-9
CPU = torch.device("cpu")
STANDARD = (*metric_keys(), "count")
GROUP_KEYS = tuple(k for g in GROUPS for k in (*metric_keys(g), f"{g}/keypoints"))


@pytest.fixture(scope="module")
def data(prepared: Path):
    index = ShardIndex(prepared / "shards")
    subset = index.subset(1, "test")
    return index, subset, our_pairs(subset, 6, 4, seed=2)


def _model(**model_sets):
    cfg = load_preset("tiny")
    for key, value in model_sets.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg


CASES = {  # name → (model fields, bank variant, online_images)
    "full-tables": ({}, "clean", False),
    "full-image-embedding-online": ({"image_embedding": "online"}, "clean", False),
    "full-images-encoded-in-process": ({}, "clean", True),
    "noise-typo": ({}, "typo@0.1", False),
}


def _both(model, cfg, subset, pairs, index, bank, online, batch_size):
    kw = dict(load_image=index.read_bytes, batch_size=batch_size, bank=bank, online_images=online, records=True)
    ours = run_protocol(model, subset, pairs, cfg.data, CPU, **kw)
    loop = run_protocol(model, subset, pairs, cfg.data, CPU, dedupe=False, **kw)
    return ours, loop


def _max_diff(a: list[dict], b: list[dict]) -> float:
    """|Δ| of the predictions at the keypoints visible in query and support (the ones PCK reads)."""
    return max((float((x["pred"] - y["pred"])[x["visible"]].abs().max()) for x, y in zip(a, b) if x["visible"].any()),
               default=0.0)


@pytest.mark.parametrize("image_embedding", ["precomputed", "online"])
def test_head_of_encode_image_is_the_forward(data, prepared, image_embedding):
    """The model split in two (image part once per query, head once per unit) computes the forward."""
    from capenext.data import collate, make_item

    index, subset, pairs = data
    model, cfg = _model(image_embedding=image_embedding)
    items = [make_item(index.read_bytes(subset.samples[q]), subset.samples[q], subset.samples[s],
                       subset.categories[subset.samples[q].category_id], cfg.data) for q, s in pairs[:6].tolist()]
    batch = load_bank(prepared / "emb").fill(collate(items), cfg.data.max_keypoints, True, True)
    with torch.no_grad():
        whole = model(batch)
        split = model.head(model.encode_image(batch["img"]), {k: v for k, v in batch.items() if k != "img"})
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)


@pytest.mark.parametrize("case", list(CASES))
def test_unique_work_gives_every_pairs_prediction_and_pck_of_the_per_pair_loop(case, data, prepared):
    index, subset, pairs = data
    fields, variant, online = CASES[case]
    model, cfg = _model(**fields)
    bank = load_bank(prepared / "emb", variant)

    # one per forward: the very same computation, so the very same numbers
    (m1, r1), (m0, r0) = _both(model, cfg, subset, pairs, index, bank, online, batch_size=1)
    assert len(r1) == len(r0) == len(pairs)
    assert all(torch.equal(a["pred"], b["pred"]) for a, b in zip(r1, r0))
    assert m1 == m0

    # batched: the pairs' predictions up to float rounding of other batch compositions, the same PCK
    (m8, r8), (n8, s8) = _both(model, cfg, subset, pairs, index, bank, online, batch_size=8)
    assert [(r["ann_id"], r["category_id"]) for r in r8] == [(r["ann_id"], r["category_id"]) for r in s8]
    assert all(torch.equal(a["visible"], b["visible"]) for a, b in zip(r8, s8))
    assert _max_diff(r8, s8) <= PX
    assert all(np.allclose(a["pck"], b["pck"], rtol=0, atol=PCK) for a, b in zip(r8, s8))
    assert m8["count"] == n8["count"] == len(pairs)
    for t in THRESHOLDS:
        assert abs(m8[pck_key(t)] - n8[pck_key(t)]) <= PCK
        assert abs(m8[pck_key(t)] - m0[pck_key(t)]) <= PCK
    # the keypoint-level PCK of the polysemous and the unambiguous keypoints (split 1 tests categories with both)
    assert m8.keys() == n8.keys() == set(STANDARD) | set(GROUP_KEYS)
    for k in GROUP_KEYS:
        assert abs(m8[k] - n8[k]) <= PCK and abs(m8[k] - m0[k]) <= PCK, k


def test_the_noise_variant_changes_the_numbers_it_is_measured_on(data, prepared):
    """The typo bank really reaches the head (the equality above is not that of two clean runs)."""
    index, subset, pairs = data
    model, cfg = _model()
    kw = dict(load_image=index.read_bytes, batch_size=8)
    clean = run_protocol(model, subset, pairs, cfg.data, CPU, bank=load_bank(prepared / "emb"), **kw)[0]
    typo = run_protocol(model, subset, pairs, cfg.data, CPU, bank=load_bank(prepared / "emb", "typo@0.1"), **kw)[0]
    assert clean != typo


def test_each_query_and_each_query_mask_pair_is_one_unit_of_work(data):
    index, subset, pairs = data
    work = plan(subset, pairs, load_preset("tiny").data)
    assert sorted(work.queries.tolist()) == sorted(set(pairs[:, 0].tolist()))
    assert np.array_equal(work.pairs, pairs)  # one rank: every pair, in order
    masks = {(q, subset.samples[s].visible.tobytes()) for q, s in pairs.tolist()}
    assert len(work.unit_query) == len(masks) < len(pairs)
    assert np.all(np.diff(work.unit_query) >= 0)  # a query's units are contiguous
    for (q, s), u in zip(pairs.tolist(), work.pair_unit.tolist()):
        assert work.queries[work.unit_query[u]] == q
        vis = subset.samples[s].visible
        assert np.array_equal(work.unit_mask[u, : len(vis)], vis) and not work.unit_mask[u, len(vis):].any()


def test_cached_image_work_is_dropped_after_a_querys_last_unit(data, prepared, monkeypatch):
    """The features held never exceed the queries of two batches, and none are left at the end."""
    index, subset, pairs = data
    model, cfg = _model()
    held, runners = [], []
    original_head, original_init = _Cached._head, _Cached.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        runners.append(self)

    def head(self, u0, u1):
        held.append(len(self.cache))
        original_head(self, u0, u1)

    monkeypatch.setattr(_Cached, "__init__", init)
    monkeypatch.setattr(_Cached, "_head", head)
    run_protocol(model, subset, pairs, cfg.data, CPU, load_image=index.read_bytes, batch_size=4,
                 bank=load_bank(prepared / "emb"))
    assert held and max(held) <= 2 * 4
    assert runners[0].cache == {}


def test_rank_shares_add_up_to_the_single_process_numbers(data, prepared):
    """Each rank takes a strided share of the unique queries with all their pairs; the all-reduce (a sum
    of per-threshold sums and counts) of the shares is the single process's result."""
    index, subset, pairs = data
    model, cfg = _model()
    kw = dict(load_image=index.read_bytes, batch_size=8, bank=load_bank(prepared / "emb"), records=True)
    whole, _ = run_protocol(model, subset, pairs, cfg.data, CPU, **kw)
    shares = [run_protocol(model, subset, pairs, cfg.data, CPU, rank=r, world=2, **kw) for r in range(2)]
    assert sum(m["count"] for m, _ in shares) == whole["count"] == len(pairs)
    for t in THRESHOLDS:
        k = pck_key(t)
        assert abs(sum(m[k] * m["count"] for m, _ in shares) / whole["count"] - whole[k]) <= PCK
        for g in GROUPS:  # keypoint-level: each share weighs by its keypoints in the group
            n = f"{g}/keypoints"
            assert abs(sum(m[f"{g}/{k}"] * m[n] for m, _ in shares) / whole[n] - whole[f"{g}/{k}"]) <= PCK
    ann = [{r["ann_id"] for r in records} for _, records in shares]
    assert not ann[0] & ann[1]  # a query's work is done on one rank only


def _rank_main(rank: int, world: int, port: int, prepared: str, out: str) -> None:
    """One gloo rank of :func:`test_two_gloo_ranks_return_the_single_process_metrics`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        index = ShardIndex(Path(prepared) / "shards")
        subset = index.subset(1, "test")
        model, cfg = _model()
        metrics, records = run_protocol(model, subset, our_pairs(subset, 6, 4, seed=2), cfg.data, CPU,
                                        load_image=index.read_bytes, batch_size=8,
                                        bank=load_bank(Path(prepared) / "emb"), rank=rank, world=world, records=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "records": len(records)}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_return_the_single_process_metrics(data, prepared, tmp_path):
    """Two real processes (gloo): every rank returns the all-reduced metrics of all pairs, those of one
    process; the ranks' records together are every pair."""
    import socket

    import torch.multiprocessing as mp

    index, subset, pairs = data
    model, cfg = _model()
    whole, _ = run_protocol(model, subset, pairs, cfg.data, CPU, load_image=index.read_bytes, batch_size=8,
                            bank=load_bank(prepared / "emb"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(prepared), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["metrics"]["count"] == whole["count"] == len(pairs)
        assert all(abs(r["metrics"][k] - whole[k]) <= PCK for k in whole)
    assert sum(r["records"] for r in ranks) == len(pairs)


def test_a_model_without_an_image_part_runs_whole_on_the_cached_crops(data):
    """The mean-position floor (no ``encode_image``/``head``) through the same protocol: same numbers."""
    from capenext.baselines import MeanPositionModel

    index, subset, pairs = data
    cfg = load_preset("tiny")
    floor = MeanPositionModel(index.subset(1, "train"), subset.categories, cfg.data)
    kw = dict(load_image=index.read_bytes, batch_size=8)
    ours, _ = run_protocol(floor, subset, pairs, cfg.data, CPU, **kw)
    loop, _ = run_protocol(floor, subset, pairs, cfg.data, CPU, dedupe=False, **kw)
    assert all(abs(ours[k] - loop[k]) <= PCK for k in loop)


def test_group_pck_counts_the_scored_keypoints_of_each_group_and_only_where_categories_list_them(
        data, prepared, synthetic_root):
    """The shards carry each category's polysemous keypoints; the groups count exactly the keypoints PCK
    scores (visible in query and support), split by them; a subset whose categories list none (MP-100)
    reports exactly the standard keys, both ways."""
    import dataclasses

    from capenext.data.mp100 import load_split

    index, subset, pairs = data
    assert {c: v.polysemous for c, v in subset.categories.items()} == {
        c: v.polysemous for c, v in load_split(synthetic_root, 1, "test").categories.items()}
    model, cfg = _model()
    kw = {"load_image": index.read_bytes, "batch_size": 8, "bank": load_bank(prepared / "emb"), "records": True}
    metrics, records = run_protocol(model, subset, pairs, cfg.data, CPU, **kw)
    poly = {c: set(v.polysemous) for c, v in subset.categories.items()}
    in_group = [k in poly[r["category_id"]] for r in records for k in np.flatnonzero(r["visible"].numpy()).tolist()]
    assert metrics["polysemous/keypoints"] == sum(in_group) > 0
    assert metrics["unambiguous/keypoints"] == len(in_group) - sum(in_group) > 0

    plain = dataclasses.replace(subset, categories={c: dataclasses.replace(v, polysemous=())
                                                    for c, v in subset.categories.items()})
    for dedupe in (True, False):
        stripped, _ = run_protocol(model, plain, pairs, cfg.data, CPU, dedupe=dedupe, **kw)
        assert set(stripped) == set(STANDARD)
        assert all(abs(stripped[k] - metrics[k]) <= PCK for k in STANDARD)


def test_quick_benchmark_reports_a_positive_ratio_and_equal_pck(prepared):
    from capenext.cli import run_main
    from jobs import benchmark

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exc:
        run_main(benchmark.main, ["evaluate", "--shards", str(prepared / "shards"), "--embeddings",
                                  str(prepared / "emb"), "--preset", "tiny", "--quick", "--threads", "1"])
    assert exc.value.code == 0
    result = json.loads(out.getvalue())
    for key in ("reference_style", "per_pair", "ours", "ratio_vs_per_pair", "ratio_vs_our_per_pair_loop",
                "pck_equal", "projected_five_splits", "machine"):
        assert key in result, key
    assert math.isfinite(result["ratio_vs_per_pair"]) and result["ratio_vs_per_pair"] > 0
    assert result["pck_equal"] is True
    assert result["ours"]["pairs_measured"] == result["pairs"] > result["per_pair"]["pairs_measured"]
    assert result["ours"]["units"] < result["pairs"]
    assert result["projected_five_splits"]["pairs"] == 300_000


def test_no_support_keypoint_of_the_synthetic_set_falls_off_so_its_pck_is_unchanged(data):
    """The reference's test-time support mask equals visibility wherever no visible support keypoint falls off
    the heatmap after the test crop: on the synthetic set (every split's test categories) that is every
    sample, so its numbers are those of the visibility-only mask."""
    from capenext.data.dataset import support_mask

    index, _, _ = data
    cfg = load_preset("tiny")
    for split in (1, 2, 3, 4, 5):
        for sample in index.subset(split, "test").samples:
            assert np.array_equal(support_mask(sample, cfg.data) > 0, sample.visible), sample.ann_id


def test_a_visible_support_keypoint_far_outside_its_box_is_masked_in_the_input_and_still_scored(data):
    """The reference's rule (``top_down_transform.py:244-247``): a visible support keypoint whose Gaussian
    falls wholly off the 64x64 heatmap after the test crop gets target weight 0, so its text is zeroed and
    its slot masked; PCK still counts it where the query and the support annotation mark it visible."""
    import dataclasses

    from capenext.data import make_item

    index, subset, pairs = data
    cfg = load_preset("tiny")
    qi, si = (int(v) for v in pairs[0])
    query, support = subset.samples[qi], subset.samples[si]
    j = int(np.flatnonzero(support.visible & query.visible)[0])
    far = support.keypoints.copy()
    x, y, w, h = support.bbox
    far[j, :2] = (x + 10 * w, y + 10 * h)  # visible, far outside the box
    moved = dataclasses.replace(support, keypoints=far)
    item = make_item(index.read_bytes(query), query, moved, subset.categories[query.category_id], cfg.data)
    assert not item["kp_mask"][j] and item["support_weight"][j] == 0  # masked in the model's input
    assert item["visible"][j]  # and scored
    assert item["kp_mask"][: len(far)].sum() == int(support.visible.sum()) - 1

    samples = list(subset.samples)
    samples[si] = moved
    work = plan(dataclasses.replace(subset, samples=samples), pairs[:1], cfg.data)
    assert not work.unit_mask[0, j] and work.pair_visible[0, j]


def test_per_query_class_noise_keys_the_work_by_the_class_each_pair_is_given(data, prepared):
    """Per-query class noise (the reference's Table 4): each (query, support) pair gets its own wrong class;
    the unique-work protocol keys its units by it and equals the per-pair loop, and the noise reaches the
    model (its numbers differ from the clean ones)."""
    from capenext.noise import query_class
    from capenext.protocol import PairClasses

    index, subset, pairs = data
    model, cfg = _model()
    bank = load_bank(prepared / "emb")
    names = [c.name for c in sorted(index.categories.values(), key=lambda c: c.id)]
    by_name = {c.name: bank.classes[c.id] for c in index.categories.values()}
    true = {s.ann_id: subset.categories[s.category_id].name for s in subset.samples}
    classes = PairClasses(lambda a, s: query_class(true[a], names, 0, a, s), by_name)
    drawn = {(subset.samples[q].ann_id, subset.samples[s].ann_id) for q, s in pairs.tolist()}
    assert len({classes.name(a, s) for a, s in drawn}) > 3  # per pair, not one name per category
    assert all(classes.name(a, s) != true[a] for a, s in drawn)
    kw = dict(load_image=index.read_bytes, batch_size=8, bank=bank, records=True, classes=classes)
    (m, r), (n, t) = (run_protocol(model, subset, pairs, cfg.data, CPU, **kw),
                      run_protocol(model, subset, pairs, cfg.data, CPU, dedupe=False, **kw))
    assert _max_diff(r, t) <= PX and all(abs(m[pck_key(x)] - n[pck_key(x)]) <= PCK for x in THRESHOLDS)
    clean = run_protocol(model, subset, pairs, cfg.data, CPU, load_image=index.read_bytes, batch_size=8, bank=bank)[0]
    assert clean != m
    keyed = plan(subset, pairs, cfg.data, key=lambda q, s: (q.category_id, classes.name(q.ann_id, s.ann_id)))
    assert len(keyed.unit_query) > len(plan(subset, pairs, cfg.data).unit_query)


def test_the_reference_class_list_is_read_never_run(tmp_path):
    """The reference's 100 names for its class-noise run are read from ``capex.py`` with ``ast``: a file whose
    list is there gives it (duplicates kept, as the reference draws by index); one without it is one line."""
    from capenext.noise import REFERENCE_CLASS_FILE, query_class, reference_class_names

    marker = tmp_path / "ran"
    path = tmp_path / REFERENCE_CLASS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                    "class CapeX:\n    def __init__(self):\n"
                    "        self.category_names = ['alpaca face', 'Tern', 'dog body', 'Tern']\n")
    names = reference_class_names(tmp_path)
    assert names == ["alpaca face", "Tern", "dog body", "Tern"] and not marker.exists()
    assert {query_class("Tern", names, 0, a, 1) for a in range(200)} == {"alpaca face", "dog body", "Tern"}
    path.write_text("class CapeX:\n    use_wrong_catName = False\n")
    with pytest.raises(ValueError, match="no list of category names.*4e08e71"):
        reference_class_names(tmp_path)
    with pytest.raises(FileNotFoundError, match="--class-names"):
        reference_class_names(tmp_path / "nowhere")
