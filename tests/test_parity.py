"""The parity check (``jobs.parity``) without the reference: the stage comparison and its report on two copies
of our model, the mmcv/mmpose stand-ins' import machinery on a small fake checkout, and the one-line errors.
Against a real checkout of yzrs/CapeNext the check is run by hand (docs/convert.md)."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from capenext.cli import run_main
from capenext.config import load_preset
from capenext.models import build_model
from jobs import parity
from tests.conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def tiny_model():
    torch.set_num_threads(1)
    cfg = load_preset("tiny")
    cfg.model.ablation, cfg.model.image_embedding = "full", "online"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        parity.rerandomise_constants(model, torch.Generator().manual_seed(1), skip=("clip.",))
    return model, cfg


@pytest.fixture(scope="module")
def tiny_run(tiny_model):
    model, cfg = tiny_model
    inputs = parity.make_inputs(0, size=cfg.data.image_size)
    return inputs, parity.run_ours(model, inputs)


def _stage_list(cfg):
    return parity.stages(cfg.model.enc_layers, cfg.model.dec_layers)


def test_equal_models_pass_every_stage(tiny_model, tiny_run):
    model, cfg = tiny_model
    inputs, ref = tiny_run
    ours = parity.run_ours(copy.deepcopy(model), inputs)
    report = parity.compare(ref, ours, inputs.kp_mask, stage_list=_stage_list(cfg))
    assert report.ok, report.table()
    assert [r.label for r in report.rows] == [s.label for s in _stage_list(cfg)]
    assert all(r.max_abs == 0.0 and r.scale > 0 for r in report.rows), report.table()
    table = report.table()
    for label in ("CLIP keypoint text embeddings", "HCMI e'_cls", "DSFR e'_joint", "encoder layer 2",
                  "similarity maps", "decoder layer 0", "final points"):
        assert label in table


@pytest.mark.parametrize("key", ["encoder.layers.1.linear1.weight", "decoder.layers.2.linear2.weight",
                                 "dsfr.ffn.0.weight", "proposal.query_proj.weight", "hcmi.ffn.0.weight"])
def test_perturbed_weight_fails_at_its_stage(tiny_model, tiny_run, key):
    model, cfg = tiny_model
    inputs, ref = tiny_run
    other = copy.deepcopy(model)
    parity.perturb(other, key)
    report = parity.compare(ref, parity.run_ours(other, inputs), inputs.kp_mask, stage_list=_stage_list(cfg))
    assert not report.ok
    assert report.first_failure == parity.expected_stage(key), report.table()
    first = [r.label for r in report.rows].index(report.first_failure)
    assert all(r.ok and r.max_abs == 0.0 for r in report.rows[:first])
    assert "PAST TOLERANCE" in report.table()


def test_compare_reports_missing_and_misshapen_stages(tiny_run, tiny_model):
    _, cfg = tiny_model
    inputs, ref = tiny_run
    ours = dict(ref)
    del ours["dsfr"]
    ours["similarity"] = ref["similarity"][:, :, :1]
    report = parity.compare(ref, ours, inputs.kp_mask, stage_list=_stage_list(cfg))
    rows = {r.label: r for r in report.rows}
    assert not rows["DSFR e'_joint"].ok and "not captured (ours)" in rows["DSFR e'_joint"].note
    assert not rows["similarity maps"].ok and "shapes differ" in rows["similarity maps"].note
    assert report.first_failure == "DSFR e'_joint"


def test_rerandomise_constants_touches_only_constant_tensors():
    m = nn.ModuleDict({"norm": nn.LayerNorm(4), "lin": nn.Linear(4, 4), "text_backbone": nn.LayerNorm(4)})
    nn.init.zeros_(m["lin"].bias)
    before = m["lin"].weight.clone()
    changed = parity.rerandomise_constants(m, torch.Generator().manual_seed(0))
    assert sorted(changed) == ["lin.bias", "norm.bias", "norm.weight"]
    assert torch.equal(m["lin"].weight, before)
    assert torch.equal(m["text_backbone"].weight, torch.ones(4))
    assert not torch.equal(m["norm"].weight, torch.ones(4))


FAKE_MODULE = '''
from mmcv.runner import BaseModule
from mmcv.runner.base_module import BaseModule as BaseModule2
from mmcv.cnn import Conv2d, Linear, xavier_init
from mmcv.cnn.bricks.transformer import build_positional_encoding, POSITIONAL_ENCODING
from mmcv.utils import Registry, build_from_cfg
from mmpose.models import builder, HEADS
from mmpose.models.builder import POSENETS, BACKBONES
from mmpose.models.detectors.base import BasePose
import clip

OWN = Registry("own")


@POSITIONAL_ENCODING.register_module()
class Pos(BaseModule):
    def __init__(self, num_feats, init_cfg=None):
        super().__init__(init_cfg)
        self.num_feats = num_feats


@HEADS.register_module()
class Head(BaseModule2):
    def __init__(self, width):
        super().__init__()
        self.proj = Linear(width, 2)
        self.pos = build_positional_encoding(dict(type="Pos", num_feats=width))
        xavier_init(self.proj, distribution="uniform")


@POSENETS.register_module()
class Net(BasePose):
    def __init__(self, head):
        super().__init__()
        self.head = builder.build_head(head)
        self.tokenize = clip.tokenize
'''


def _fake_tree(root: Path) -> Path:
    pkg = root / "models" / "models"
    pkg.mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("raise RuntimeError('a bare package must not run its __init__')\n")
    (pkg / "__init__.py").write_text("raise RuntimeError('a bare package must not run its __init__')\n")
    (pkg / "thing.py").write_text(FAKE_MODULE)
    (pkg / "needs_ops.py").write_text("from mmcv.ops import nms\n")
    return root


def test_stubs_are_installed_only_while_the_check_runs(tmp_path):
    root = _fake_tree(tmp_path / "fake")
    sys.modules.pop("mmcv", None)
    with parity.stubbed_imports(root, bare_packages={"models": {}, "models.models": {}}):
        thing = importlib.import_module("models.models.thing")
        assert thing.BaseModule is parity.BaseModule and thing.BaseModule2 is parity.BaseModule
        assert thing.BasePose is parity.BasePose and thing.Conv2d is parity.Conv2d
        assert thing.builder is sys.modules["mmpose.models.builder"]
        net = thing.POSENETS.build(dict(type="Net", head=dict(type="Head", width=8)))
        assert isinstance(net.head.proj, nn.Linear) and net.head.pos.num_feats == 8
        assert net.tokenize(["a cat"]).shape == (1, 77)
        assert float(net.head.proj.bias.detach().abs().sum()) == 0.0  # xavier_init's bias=0
        with pytest.raises(KeyError, match="already registered"):
            thing.HEADS.register_module(module=thing.Head)
        with pytest.raises(KeyError, match="not registered"):
            thing.HEADS.build(dict(type="Missing"))
        with pytest.raises(ModuleNotFoundError) as err:
            importlib.import_module("models.models.needs_ops")
        assert err.value.name == "mmcv.ops"
    for name in ("mmcv", "mmcv.runner", "mmpose", "mmpose.models.builder", "clip", "models", "models.models.thing"):
        assert name not in sys.modules, name
    assert str(root) not in sys.path


def _fake_checkout(root: Path, swin_source: str = "from mmcv.ops import nms\n") -> Path:
    for rel in parity.REQUIRED_FILES + (parity.DEFAULT_CONFIG,):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (root / "models/models/backbones/swin_transformer_v2.py").write_text(swin_source)
    return root


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_main(parity.main, argv)
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_not_a_checkout_is_one_line(tmp_path, capsys):
    line = _error_line(capsys, ["--reference", str(tmp_path)])
    assert "--reference" in line and "not a CapeNext checkout" in line and "capex.py" in line


def test_import_the_stubs_cannot_satisfy_is_one_line(tmp_path, capsys):
    root = _fake_checkout(tmp_path / "checkout")
    line = _error_line(capsys, ["--reference", str(root)])
    assert "--reference" in line and "'mmcv.ops'" in line and "swin_transformer_v2" in line
    assert "mmcv" not in sys.modules and "models" not in sys.modules


def test_missing_directory_is_one_line_from_the_command_line(tmp_path):
    proc = run_cli("jobs.parity", "--reference", str(tmp_path / "nowhere"))
    assert_one_line_error(proc, "--reference", "no such directory")
    assert proc.returncode == 2


def test_expected_stage_names_a_stage():
    labels = {s.label for s in parity.stages()}
    for key in ("clip.model.visual.conv1.weight", "clip.model.token_embedding.weight", "hcmi.attn.attn.in_proj_weight",
                "backbone.trunk.patch_embed.proj.weight", "backbone.proj.weight", "joint_proj.weight",
                "encoder.layers.0.linear1.weight", "proposal.support_proj.weight", "decoder.ref_point_head.0.weight",
                "decoder.layers.1.choker.weight", "decoder.norm.weight", "offset_heads.0.out.weight",
                "offset_heads.2.out.weight"):
        assert parity.expected_stage(key) in labels, key


def test_parity_leaves_the_callers_grad_mode_as_it_was(tmp_path, capsys):
    """The comparison runs without gradients, but a caller in the same process (a test session, a notebook)
    trains afterwards: its grad mode is left as it was, also when the check stops inside the comparison."""
    import torch

    assert torch.is_grad_enabled()
    root = _fake_checkout(tmp_path / "checkout")
    assert "'mmcv.ops'" in _error_line(capsys, ["--reference", str(root)])  # fails while building the reference
    assert torch.is_grad_enabled()
