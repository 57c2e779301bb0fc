"""Converting the published CapeNext / CapeX checkpoints (mmcv format) into ours: ``jobs.convert``.

Against the official code's own numbers: ``tests/data/official_fixture/`` holds a checkpoint written by
the reference model itself (yzrs/CapeNext at the commit its ``fixture.json`` names, run by
``python -m jobs.conversion.fixture`` at reduced sizes and seeded random weights) and the reference
forward's output at every stage for fixed inputs. The tests convert it with ``jobs.convert``, load it with
``load_model``, run the same inputs and compare each stage (no checkout needed here); a perturbed weight
must fail at the stage it feeds.

At the published sizes, the official checkpoints are not available here, so each test builds one in their
format from the inventories in ``tests/data/official_*_swinv2t.json`` (every key, shape and dtype of the
reference's state_dict at Swin V2-T / ViT-B-32 size, read off the reference code, and the our-parameter
each maps to with its transform), wraps it as an mmcv checkpoint (``{"meta", "state_dict", "optimizer"}``),
converts it and checks where every tensor landed. The Swin buffers are filled with timm's recomputed values
(when the inventory was made, the reference's were checked to be equal); the CLIP tensors are one repeated
value each (distinct per tensor, one element of storage) to keep the files small.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from capenext.checkpoint import load_model
from capenext.cli import run_main
from capenext.config import load_preset
from capenext.convert import (
    ConversionError,
    convert_state_dict,
    dropped_reason,
    official_key,
    our_key,
    swinv2_to_timm,
)
from capenext.models import build_model
from capenext.models.backbone import BACKBONES
from jobs.conversion import fixture as official_fixture
from jobs.conversion.stages import compare, expected_stage, perturb, run_ours
from jobs.convert import main as convert_main
from jobs.convert import read_official
from tests.conftest import assert_one_line_error, run_cli

DATA = Path(__file__).parent / "data"
ABLATION = {"capenext": "full", "capex": "baseline"}
META = {"mmcv_version": "1.7.0", "mmpose_version": "0.29.0+deadbee", "epoch": 200, "iter": 123456,
        "time": "Mon Jan  6 12:00:00 2025",
        "config": "data = dict(train=dict(ann_file='data/mp100/annotations/mp100_split1_train.json'))\n"
                  "additional_module_cfg = dict(module_name='SimpleMultiModalModule')"}


@pytest.fixture(scope="module")
def inventories():
    return {kind: json.loads((DATA / f"official_{kind}_swinv2t.json").read_text()) for kind in ABLATION}


@pytest.fixture(scope="module")
def models():
    """Our swinv2_t models, built once: capenext → ``full``, capex → ``baseline`` (random CLIP)."""
    torch.set_num_threads(1)
    out = {}
    for kind, ablation in ABLATION.items():
        cfg = load_preset("swinv2_t")
        cfg.model.ablation, cfg.model.clip_checkpoint = ablation, "random"
        out[kind] = build_model(cfg.model)
    return out


def official_state(inv: dict, model, *, clip: bool = True, cheap: bool = False, seed: int = 0) -> OrderedDict:
    """A state_dict in the official format: random tensors (``cheap``: one repeated value each, distinct per
    tensor), the Swin buffers with their true values, the CLIP only if ``clip``."""
    g = torch.Generator().manual_seed(seed)
    buffers = dict(model.named_buffers())
    state = OrderedDict()
    for i, row in enumerate(inv["keys"]):
        name, shape, dtype = row["official"], row["shape"], getattr(torch, row["dtype"])
        if name.startswith("text_backbone.") and not clip:
            continue
        if "timm_buffer" in row:
            state[name] = buffers[row["timm_buffer"]].to(dtype).clone()
        elif cheap or name.startswith("text_backbone."):
            state[name] = torch.full((), float(i + 1), dtype=dtype).expand(shape)
        else:
            state[name] = torch.randn(shape, generator=g).to(dtype)
    return state


def save_mmcv(path: Path, state: dict, meta: dict | None = None) -> Path:
    torch.save({"meta": dict(META if meta is None else meta), "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}}, path)
    return path


def convert(argv: list, capsys) -> SimpleNamespace:
    """``python -m jobs.convert ARGV`` in this process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exc:
        run_main(convert_main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exc.value.code, stdout=captured.out, stderr=captured.err)


def assert_landed(inv: dict, state: dict, model, *, clip: bool) -> int:
    """Every inventory row's tensor sits at its our-key, transformed as the inventory says."""
    ours = model.state_dict()
    checked = 0
    for row in inv["keys"]:
        if row["ours"] is None or (row["official"].startswith("text_backbone.") and not clip):
            continue
        expected = state[row["official"]]
        if row["transform"] == "squeeze(-1)":
            expected = expected.squeeze(-1)
        else:
            assert row["transform"] == "copy", row
        assert torch.equal(ours[row["ours"]], expected.float()), (row["official"], row["ours"])
        checked += 1
    return checked


def test_inventory_covers_every_tensor_of_our_model_once(inventories, models):
    for kind, inv in inventories.items():
        target = models[kind].state_dict()
        rows = [r for r in inv["keys"] if r["ours"] is not None]
        assert len({r["ours"] for r in rows}) == len(rows)
        assert {r["ours"] for r in rows} == set(target), kind
        for r in rows:
            shape = r["shape"][:-1] if r["transform"] == "squeeze(-1)" else r["shape"]
            assert list(target[r["ours"]].shape) == shape, r
        assert inv["count"] == len(inv["keys"])


def test_mapping_rules_agree_with_the_inventory_both_ways(inventories):
    for inv in inventories.values():
        for row in inv["keys"]:
            if row["ours"] is None:
                assert dropped_reason(row["official"]), row
                continue
            assert dropped_reason(row["official"]) is None, row
            assert our_key(row["official"]) == (row["ours"], row["transform"]), row
            assert official_key(row["ours"]) == (row["official"], row["transform"]), row


def test_capenext_checkpoint_converts_and_every_tensor_lands_where_the_inventory_says(inventories, models,
                                                                                     tmp_path, capsys):
    inv = inventories["capenext"]
    state = official_state(inv, models["capenext"])
    src = save_mmcv(tmp_path / "capenext_split1.pth", state)
    out = tmp_path / "converted.pt"
    proc = convert(["--official", src, "--kind", "capenext", "--out", out], capsys)
    assert proc.returncode == 0, proc.stderr
    assert "--split 1" in proc.stdout  # the evaluate command, with the split read from the meta

    model, cfg, meta = load_model(out)  # strict; the CLIP comes from the file's own, written beside
    sidecar = tmp_path / "converted.clip.pt"
    assert cfg.model.ablation == "full" and cfg.model.backbone == "swinv2_t"
    assert cfg.model.clip_checkpoint == str(sidecar.resolve())
    assert meta["kind"] == "capenext" and meta["source_split"] == 1
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source_meta"]["epoch"] == 200
    checked = assert_landed(inv, state, model, clip=True)
    assert checked == len(model.state_dict())  # the CLIP included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capenext_split1.pth", "converted.clip.pt", "converted.pt"]


def test_capex_checkpoint_without_clip_takes_clip_checkpoint_and_detects_its_kind(inventories, models, tmp_path,
                                                                                  capsys):
    inv = inventories["capex"]
    state = official_state(inv, models["capex"], clip=False, seed=1)
    meta = {**META, "config": META["config"].replace("split1", "split4").replace("SimpleMultiModalModule", "None")}
    src = save_mmcv(tmp_path / "capex.pth", state, meta)
    out = tmp_path / "sub" / "capex.pt"
    proc = convert(["--official", src, "--clip-checkpoint", "random", "--out", out], capsys)
    assert proc.returncode == 0, proc.stderr

    model, cfg, meta = load_model(out)
    assert cfg.model.ablation == "baseline" and cfg.model.clip_checkpoint == "random"
    assert meta["kind"] == "capex" and meta["source_split"] == 4
    checked = assert_landed(inv, state, model, clip=False)
    assert checked == len([k for k in model.state_dict() if not k.startswith("clip.")])
    assert sorted(p.name for p in out.parent.iterdir()) == ["capex.pt"]  # no CLIP written


def test_corrupted_file_is_one_line_and_writes_nothing(inventories, models, tmp_path, capsys):
    good = save_mmcv(tmp_path / "good.pth", official_state(inventories["capex"], models["capex"], cheap=True))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all\n" * 100)
    for bad, what in ((truncated, "not a whole PyTorch checkpoint (a torn zip archive"),
                      (garbage, "not a PyTorch checkpoint (neither torch's zip format nor a pickle)")):
        proc = convert(["--official", bad, "--out", tmp_path / "out.pt"], capsys)
        assert_one_line_error(proc, str(bad), what)
    assert not (tmp_path / "out.pt").exists()
    # and as a user runs it
    proc = run_cli("jobs.convert", "--official", str(garbage), "--out", str(tmp_path / "out.pt"))
    assert_one_line_error(proc, "not a PyTorch checkpoint (neither torch's zip format nor a pickle)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth", "good.pth", "truncated.pth"]


def _swin_s(state: OrderedDict) -> OrderedDict:
    """The same file with Swin V2-S's stage 2 (18 blocks instead of 6)."""
    out = OrderedDict()
    for k, v in state.items():
        out[k] = v
        m = re.match(r"backbone\.layers\.2\.blocks\.5\.(.*)", k)
        if m:
            for j in range(6, 18):
                out[f"backbone.layers.2.blocks.{j}.{m[1]}"] = v
    return out


def _gte(state: OrderedDict) -> OrderedDict:
    """CapeX as published: the GTE-base text encoder (768 wide) instead of CLIP."""
    out = OrderedDict((k, v) for k, v in state.items() if not k.startswith("text_backbone."))
    out["text_backbone.embeddings.word_embeddings.weight"] = torch.zeros(1).expand(30528, 768)
    out["keypoint_head.text_proj.weight"] = torch.zeros(1).expand(256, 768)
    return out


@pytest.mark.parametrize("case, fragments", [
    ("swinv2_s", ["Swin V2-S", "(2, 2, 18, 2)", "(2, 2, 6, 2)"]),
    ("gte", ["keypoint_head.text_proj.weight", "joint_proj.weight", "GTE"]),
    ("wrong_kind", ["--kind capenext", "capex checkpoint"]),
    ("not_capex", ["not a CapeNext/CapeX", "conv1"]),
])
def test_file_of_another_architecture_is_one_line_and_writes_nothing(case, fragments, inventories, models, tmp_path,
                                                                      capsys):
    state = official_state(inventories["capex"], models["capex"], cheap=True)
    argv = []
    if case == "swinv2_s":
        state = _swin_s(state)
    elif case == "gte":
        state = _gte(state)
        argv = ["--clip-checkpoint", "random"]
    elif case == "wrong_kind":
        argv = ["--kind", "capenext"]
    else:
        state = OrderedDict([("conv1.weight", torch.zeros(64, 3, 7, 7)), ("fc.weight", torch.zeros(10, 64))])
        argv = ["--clip-checkpoint", "random"]
    src = save_mmcv(tmp_path / "other.pth", state)
    proc = convert(["--official", src, "--out", tmp_path / "out.pt", *argv], capsys)
    assert_one_line_error(proc, str(src), "nothing written", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pth"]


def test_missing_key_is_one_line_naming_both_keys_and_writes_nothing(inventories, models, tmp_path, capsys):
    state = official_state(inventories["capenext"], models["capenext"], cheap=True)
    del state["keypoint_head.text_proj.bias"]
    src = save_mmcv(tmp_path / "missing.pth", state)
    proc = convert(["--official", src, "--out", tmp_path / "out.pt"], capsys)
    assert_one_line_error(proc, "'keypoint_head.text_proj.bias'", "'joint_proj.bias'", "missing", "nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing.pth"]  # neither checkpoint nor CLIP


def test_each_problem_is_one_line_naming_both_keys(inventories, models, tmp_path, capsys):
    state = official_state(inventories["capenext"], models["capenext"], cheap=True)
    state["keypoint_head.transformer.proposal_generator.query_proj.weight"] = torch.zeros(256, 255)
    state["additional_module.extra_gate.weight"] = torch.zeros(1, 512)  # a name no rule knows
    state["keypoint_head.transformer.decoder.layers.0.ffn1.conv.weight"] = torch.zeros(1536, 256, 3)
    src = save_mmcv(tmp_path / "bad.pth", state)
    proc = convert(["--official", src, "--out", tmp_path / "out.pt"], capsys)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    # the fusion module check names the unknown submodule first: an architecture problem, one line
    assert len(lines) == 1 and "extra_gate" in lines[0]

    del state["additional_module.extra_gate.weight"]
    state["keypoint_head.kpt_branch.0.mlp.8.weight"] = torch.zeros(2, 256)  # a 5th Linear: no rule maps it
    save_mmcv(src, state)
    proc = convert(["--official", src, "--out", tmp_path / "out.pt"], capsys)
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("problem: ")]
    assert len(problems) == 3 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
    assert any("'keypoint_head.transformer.proposal_generator.query_proj.weight'" in p
               and "'proposal.query_proj.weight'" in p and "shape mismatch" in p for p in problems)
    assert any("'keypoint_head.transformer.decoder.layers.0.ffn1.conv.weight'" in p
               and "'decoder.layers.0.gcn.linear.weight'" in p and "squeeze(-1)" in p for p in problems)
    assert any("'keypoint_head.kpt_branch.0.mlp.8.weight'" in p and "no rule" in p for p in problems)
    assert not (tmp_path / "out.pt").exists()


def test_swin_buffers_of_another_window_size_are_refused(inventories, models):
    """Window 8 and 16 give the same parameter shapes; the recomputed buffers tell them apart."""
    inv, model = inventories["capex"], models["capex"]
    state = official_state(inv, model, clip=False, cheap=True)
    microsoft = OrderedDict((k[len("backbone."):], v) for k, v in state.items() if k.startswith("backbone."))
    timm_state, dropped, problems = swinv2_to_timm(microsoft, model.backbone.trunk)
    assert not problems and set(timm_state) == set(model.backbone.trunk.state_dict())
    assert "head.weight" in dropped and "layers.0.blocks.1.attn_mask" in dropped
    assert "layers.1.downsample.reduction.weight" in timm_state  # Microsoft's stage-0 PatchMerging
    key = "backbone.layers.0.blocks.0.attn.relative_coords_table"
    state[key] = state[key] * 16 / 8  # as if normalised for another (pretrained) window size
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state, model, "capex")
    assert len(err.value.problems) == 1 and key in err.value.problems[0]


def test_meta_with_numpy_values_is_read_weights_only_and_said(tmp_path):
    import numpy as np
    path = tmp_path / "np.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}, "meta": {"best_score": np.float64(0.9)}}, path)
    obj, notes = read_official(path)
    assert float(obj["meta"]["best_score"]) == 0.9 and torch.equal(obj["state_dict"]["a"], torch.ones(2))
    assert len(notes) == 1 and "numpy" in notes[0] and "weights_only=True" in notes[0]

    path = tmp_path / "ns.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}, "meta": {"args": SimpleNamespace(lr=1)}}, path)
    with pytest.raises(ValueError, match="cannot be read with weights_only=True.*SimpleNamespace"):
        read_official(path)  # never unpickled in full: that would run code from the file


# --- hostile files (issue 25): a checkpoint's pickle may name any global; only a fixed list is ever called ---

class _Reduce:
    """Pickles as ``fn(*args)``: what a hostile file's ``meta`` holds (the function runs when unpickled)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _runstring_payload(marker: Path):
    from numpy.testing._private.utils import runstring
    return _Reduce(runstring, f"open({str(marker)!r}, 'w').write('ran')", {}), "numpy.testing._private.utils.runstring"


def _numpy_load_payload(marker: Path):
    """``numpy.load(FILE, None, True)``: numpy's own pickle loader, which runs whatever FILE names."""
    import numpy as np
    evil = marker.with_name("evil.pkl")
    evil.write_bytes(b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR.")  # open(marker, 'w')
    return _Reduce(np.load, str(evil), None, True), "numpy.load"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [_runstring_payload, _numpy_load_payload], ids=["runstring", "numpy_load"])
def test_meta_reducing_to_another_numpy_function_runs_nothing_and_is_one_line(payload, legacy, tmp_path, capsys):
    marker = tmp_path / "marker"
    hostile, name = payload(marker)
    src = tmp_path / "hostile.pth"
    torch.save({"meta": {"hook_msgs": {"best": hostile}}, "state_dict": {"a": torch.ones(2)}}, src,
               _use_new_zipfile_serialization=not legacy)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.pt"
    proc = convert(["--official", src, "--clip-checkpoint", "random", "--out", out], capsys)
    assert not marker.exists()  # the file's code never ran
    assert_one_line_error(proc, str(src), name, "weights_only=True", "nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # --out (and its CLIP) not written


def test_meta_with_an_object_array_is_refused(tmp_path):
    import numpy as np
    path = tmp_path / "obj.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}, "meta": {"x": np.array([1, "a"], dtype=object)}}, path)
    with pytest.raises(ValueError, match="cannot be read with weights_only=True.*ObjectDType"):
        read_official(path)


def test_numpy_1_spelling_of_mmcv_meta_is_read(tmp_path):
    """The published files were written with numpy 1 (``numpy.core.multiarray``): read under numpy 2 too."""
    import io

    import numpy as np
    buf = io.BytesIO()
    meta = {"hook_msgs": {"best_score": np.float64(0.5)}, "curve": np.arange(3, dtype=np.float32)}
    torch.save({"state_dict": {"a": torch.ones(2)}, "meta": meta}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    if b"numpy._core.multiarray" in raw:  # written by numpy 2: respell as numpy 1 did
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "np1.pth"
    path.write_bytes(raw)
    obj, notes = read_official(path)
    assert float(obj["meta"]["hook_msgs"]["best_score"]) == 0.5 and list(obj["meta"]["curve"]) == [0, 1, 2]
    assert len(notes) == 1 and "numpy" in notes[0]


def test_checkpoint_with_numpy_meta_as_mmcv_writes_it_converts(inventories, models, tmp_path, capsys):
    import numpy as np
    inv = inventories["capex"]
    state = official_state(inv, models["capex"], clip=False, cheap=True, seed=2)
    meta = {**META, "epoch": np.int64(200), "seed": np.int64(42),
            "hook_msgs": {"best_score": np.float64(1.0), "pck": np.array([0.5, 0.75]), "last_ckpt": "epoch_200.pth"}}
    src = save_mmcv(tmp_path / "capex_np.pth", state, meta)
    out = tmp_path / "capex_np.pt"
    proc = convert(["--official", src, "--clip-checkpoint", "random", "--out", out], capsys)
    assert proc.returncode == 0, proc.stderr
    assert "holds numpy values" in proc.stdout
    _, _, meta = load_model(out)
    assert meta["source_meta"]["epoch"] == 200 and meta["source_meta"]["seed"] == 42
    assert meta["source_split"] == 1


# --- against the official code's own numbers (tests/data/official_fixture, jobs.conversion.fixture) ---

FIXTURE = DATA / "official_fixture"
# the parity check's tolerance, per stage: max |official - ours| <= ATOL + RTOL x max |official|
ATOL, RTOL = 1e-5, 1e-4
FIXTURE_PERTURB = ["encoder.layers.1.linear1.weight", "backbone.trunk.layers.3.blocks.1.mlp.fc2.weight",
                   "hcmi.ffn.0.weight", "dsfr.ffn.0.weight", "proposal.query_proj.weight",
                   "decoder.layers.2.linear2.weight", "offset_heads.2.out.weight"]


@pytest.fixture(scope="module")
def recorded():
    """The fixture as recorded from the official code (files checked against their sha256), with the reduced
    CLIP and Swin V2 registered for our config; the backbone is unregistered afterwards."""
    torch.set_num_threads(1)
    yield official_fixture.read_fixture(FIXTURE)
    BACKBONES.pop(official_fixture.BACKBONE_NAME, None)


@pytest.fixture(scope="module")
def converted(recorded, tmp_path_factory):
    """The official checkpoint through ``jobs.convert`` (its main, in this process), loaded with load_model."""
    out = tmp_path_factory.mktemp("official_fixture") / "converted.pt"
    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = convert_main(official_fixture.convert_argv(recorded, out))
    assert code == 0, log.getvalue()
    model, cfg, meta = load_model(out)
    return SimpleNamespace(model=model, cfg=cfg, meta=meta, out=out, log=log.getvalue())


def _compare(recorded, model):
    return compare(recorded.outputs, run_ours(model, recorded.inputs), recorded.inputs.kp_mask, ATOL, RTOL,
                   recorded.stage_list())


def test_official_fixture_is_small_and_names_its_source(recorded):
    meta = recorded.meta
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) <= 5_000_000
    assert re.fullmatch(r"[0-9a-f]{40}", meta["reference"]["commit"])
    assert meta["reference"]["repository"] == "yzrs/CapeNext"
    assert meta["command"].startswith("python -m jobs.conversion.fixture --reference DIR --out "
                                      "tests/data/official_fixture")
    assert meta["seeds"]["weights"] == meta["seeds"]["inputs"] == meta["seed"]
    assert meta["sizes"] == official_fixture.SIZES  # what the maker would make today
    # the published files' CLIP dtypes: fp16 where OpenAI's clip.load converts, fp32 elsewhere
    state = torch.load(recorded.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert state["text_backbone.visual.conv1.weight"].dtype == torch.float16
    assert state["text_backbone.token_embedding.weight"].dtype == torch.float32
    assert {k for k, v in state.items() if v.dtype == torch.float16} == set(meta["clip_fp16"])
    assert "backbone.layers.0.blocks.1.attn_mask" in state  # shifted windows: their buffer, checked by the conversion


def test_converted_official_checkpoint_reproduces_the_official_forward_at_every_stage(recorded, converted):
    report = _compare(recorded, converted.model)
    print(report.table())
    assert report.ok, report.table()
    assert [r.label for r in report.rows] == [s.label for s in recorded.stage_list()]
    assert all(r.scale > 0.1 for r in report.rows), report.table()  # no stage is trivially zero
    # what jobs.convert wrote: our config at the fixture's sizes, the file's kind, split and digest
    cfg, meta = converted.cfg, converted.meta
    assert cfg.model.ablation == "full" and cfg.model.backbone == official_fixture.BACKBONE_NAME
    assert (cfg.model.image_embedding, cfg.model.clip_image_norm) == ("online", "imagenet")
    assert cfg.model.clip_checkpoint == str(converted.out.with_name("converted.clip.pt").resolve())
    assert meta["kind"] == "capenext" and meta["source_split"] == 1
    assert meta["source_sha256"] == recorded.meta["files"]["official.pth"]["sha256"]


@pytest.mark.parametrize("key", FIXTURE_PERTURB)
def test_perturbed_converted_weight_fails_at_the_stage_it_feeds(recorded, converted, key):
    other = copy.deepcopy(converted.model)
    perturb(other, key)
    report = _compare(recorded, other)
    assert not report.ok
    assert report.first_failure == expected_stage(key, recorded.meta["sizes"]["transformer"]["num_decoder_layers"]), \
        report.table()
    first = [r.label for r in report.rows].index(report.first_failure)
    assert all(r.ok for r in report.rows[:first]), report.table()


def test_set_keeps_what_the_conversion_sets_and_a_swin_v2_backbone(recorded, tmp_path, capsys):
    argv = official_fixture.convert_argv(recorded, tmp_path / "out.pt")
    proc = convert([*argv, "--set", "model.ablation=no_lw"], capsys)
    assert_one_line_error(proc, "--set model.ablation", "set by the conversion")
    proc = convert([*argv, "--set", "model.backbone=tiny"], capsys)
    assert_one_line_error(proc, "--set model.backbone='tiny'", "not a Swin V2 backbone")
    proc = convert([*argv, "--set", "model.nope=1"], capsys)
    assert_one_line_error(proc, "model.nope")
    assert list(tmp_path.iterdir()) == []
