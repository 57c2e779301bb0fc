"""The conversion fixture: the official code's own numbers, for the test suite.

    python -m jobs.conversion.fixture --reference DIR --out tests/data/official_fixture

``DIR`` is a checkout of yzrs/CapeNext. The command builds the reference model from the checkout, as
``jobs.parity`` does (the reference's own code with the mmcv/mmpose stand-ins, seeded random weights, the
constant-initialised tensors re-randomised, CapeNext's ``SimpleMultiModalModule``), but at the reduced sizes
of :data:`SIZES` so that the files stay small: the config's Swin V2 (``encoder_config``: width, depths,
heads, window, input side), its transformer (``keypoint_head``: width, heads, FFN, proposal widths) and the
fusion module's width (``additional_module_cfg``), and a small CLIP (an open_clip config of ViT-B-32's shape,
narrower; input side 224, as the reference resizes the query to 224 for CLIP). It runs the reference's
forward on fixed inputs (:func:`jobs.conversion.stages.make_inputs`) and writes to ``--out``:

- ``official.pth``: the reference model as an mmcv checkpoint (``{"meta", "state_dict"}``, tensors, numbers
  and strings only). The CLIP (``text_backbone``) is in the dtypes of the published files: fp16 where
  OpenAI's ``clip.load`` converts on a GPU (its ``convert_weights``), fp32 elsewhere; those weights are
  fp16 values in the forward as well, so the file holds exactly what ran. Everything else is fp32.
- ``outputs.safetensors``: the inputs' image (``input.img``) and every stage the parity check compares
  (``stage.<key>``, captured by :func:`jobs.conversion.stages.run_reference`), fp32.
- ``fixture_clip.json``: the reduced CLIP's open_clip config (its file stem is the model name).
- ``fixture.json``: the reference's commit (``git rev-parse HEAD`` of the checkout, or ``--commit``), the
  command, the sizes, the seeds, the inputs' texts, visibility and skeletons, the stages, the tolerance,
  our config overrides for the same sizes (``ours``: ``jobs.convert --set``) and each file's sha256.

The test suite (``tests/test_convert.py``) converts ``official.pth`` with ``jobs.convert`` (``--set`` the
overrides), loads the result with :func:`capenext.checkpoint.load_model`, runs the stored inputs and
compares every stage with the stored outputs; no checkout is needed then. Our side of the reduced sizes:
the reduced CLIP is registered with open_clip and the reduced Swin V2 as the backbone ``swinv2_fixture``
(:func:`register`), in the process that reads the fixture only. ``--check`` runs that comparison from the
command line. Before anything is written to ``--out``, the new files pass the same comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capenext.cli import UsageError, run_main
from capenext.models.backbone import BACKBONES, SwinV2Backbone, register_backbone
from jobs.conversion.reference import (
    DEFAULT_CONFIG,
    FUSION_MODULE,
    REFERENCE_BARE,
    build_reference,
    check_reference,
    reference_config,
    save_official,
)
from jobs.conversion.stages import (
    DEFAULT_PERTURB,
    ParityInputs,
    Report,
    compare,
    expected_stage,
    make_inputs,
    perturb,
    run_ours,
    run_reference,
    stages,
)
from jobs.conversion.stubs import SharedCLIP, stubbed_imports

__all__ = [
    "ATOL", "BACKBONE_NAME", "CLIP_NAME", "DEFAULT_OUT", "FORMAT", "SIZES", "Fixture", "ReducedSwinV2",
    "check", "convert_argv", "main", "our_overrides", "parse_args", "read_fixture", "record", "reduced_config",
    "register", "round_clip_like_openai", "run",
]

FORMAT = "capenext-official-fixture/1"
DEFAULT_OUT = Path("tests/data/official_fixture")
COMMAND = "python -m jobs.conversion.fixture --reference DIR --out tests/data/official_fixture"
CHECKPOINT, OUTPUTS, META = "official.pth", "outputs.safetensors", "fixture.json"
CLIP_NAME = "fixture_clip"  # the open_clip model name: the stem of its config file
CLIP_FILE = f"{CLIP_NAME}.json"
BACKBONE_NAME = "swinv2_fixture"
SWIN_TIMM_NAME = "swinv2_tiny_window16_256"  # timm's Swin V2 entry; its sizes are overridden
ATOL, RTOL = 1e-5, 1e-4  # as jobs.parity: per stage, atol + rtol x max |reference|

# The reduced sizes. The published model: Swin V2-T (96, [2, 2, 6, 2], [3, 6, 12, 24], window 16, 256),
# d 256 / 8 heads / FFN 768, fusion 512 wide with 8 heads, OpenAI's CLIP ViT-B/32 (512 wide).
SIZES: dict[str, Any] = {
    # Swin V2 (encoder_config); 128 / 4 / 8 = a 4x4 stage-4 map, 8x8 after the x2 upsampling; window 4: shifted
    # windows (and their attn_mask) in stages 1-3, stage 4's window clipped to its 4x4 map (at full size: shifted
    # in stages 1-2, stage 3's window its whole 16x16 map, stage 4's clipped to 8x8)
    "swin": {"embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 4, "img_size": 128},
    # the Swin code's ImageNet classifier (encoder_config num_classes, 1000): never called, left out by the
    # conversion; 10 classes keep it in the file, a quarter of a megabyte smaller
    "swin_classes": 10,
    # the transformer (keypoint_head.transformer); the proposal widths follow d as in the reference's config
    "transformer": {"d_model": 32, "nhead": 4, "dim_feedforward": 96, "num_encoder_layers": 3,
                    "num_decoder_layers": 3},
    # SimpleMultiModalModule: embed_dim = CLIP's; its FFNs are 4 x embed_dim, its heads its default 8
    "fusion": {"embed_dim": 32, "num_heads": 8},
    # CLIP (open_clip config): ViT-B-32's layout, narrower; image 224 as the reference resizes to 224
    "clip": {"embed_dim": 32,
             "vision_cfg": {"image_size": 224, "layers": 2, "width": 16, "head_width": 8, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2}},
}


# ----------------------------------------------------------------------------------------------------
# the same sizes on both sides


def reduced_config(model: dict[str, Any], sizes: dict[str, Any] = SIZES) -> dict[str, Any]:
    """The reference's model config (from :func:`jobs.conversion.reference.reference_config`) at ``sizes``."""
    model = copy.deepcopy(model)
    swin, tr, fusion = sizes["swin"], sizes["transformer"], sizes["fusion"]
    model["encoder_config"].update(swin, num_classes=sizes["swin_classes"])
    head = model["keypoint_head"]
    head["img_in_channels"] = swin["embed_dim"] * 2 ** (len(swin["depths"]) - 1)
    head["text_in_channels"] = sizes["clip"]["embed_dim"]
    d = tr["d_model"]
    head["transformer"].update(tr, similarity_proj_dim=d, dynamic_proj_dim=d // 2)
    head["num_decoder_layer"] = tr["num_decoder_layers"]
    head["positional_encoding"]["num_feats"] = d // 2
    params = model["additional_module_cfg"]["available_module_args"][FUSION_MODULE]["model_params"]
    params["embed_dim"] = fusion["embed_dim"]
    if fusion["num_heads"] != 8:  # SimpleMultiModalModule's default
        params["num_heads"] = fusion["num_heads"]
    if fusion["embed_dim"] != sizes["clip"]["embed_dim"]:
        raise ValueError("SIZES: the fusion module's embed_dim must be CLIP's embed_dim")
    return model


def our_overrides(sizes: dict[str, Any] = SIZES) -> dict[str, str]:
    """Our config for the same sizes, as ``--set`` items of ``jobs.convert`` (dotted key → value)."""
    tr, fusion = sizes["transformer"], sizes["fusion"]
    return {"model.backbone": BACKBONE_NAME, "model.clip_model": CLIP_NAME, "model.dim": str(tr["d_model"]),
            "model.heads": str(tr["nhead"]), "model.ffn_dim": str(tr["dim_feedforward"]),
            "model.enc_layers": str(tr["num_encoder_layers"]), "model.dec_layers": str(tr["num_decoder_layers"]),
            "model.fusion_ffn_dim": str(4 * fusion["embed_dim"]), "model.fusion_heads": str(fusion["num_heads"]),
            "data.image_size": str(sizes["swin"]["img_size"])}


class ReducedSwinV2(SwinV2Backbone):
    """Our Swin V2 backbone (its forward is :class:`SwinV2Backbone`'s) on a timm trunk of the given sizes."""

    def __init__(self, dim: int, swin: dict[str, Any], drop_path: float = 0.0):
        import timm

        nn.Module.__init__(self)
        self.trunk = timm.create_model(
            SWIN_TIMM_NAME, pretrained=False, num_classes=0, drop_path_rate=drop_path,
            embed_dim=swin["embed_dim"], depths=tuple(swin["depths"]), num_heads=tuple(swin["num_heads"]),
            window_size=swin["window_size"], img_size=swin["img_size"])
        self._make_proj(self.trunk.num_features, dim)


def register(folder: Path, sizes: dict[str, Any]) -> None:
    """Make the fixture's sizes buildable through our config in this process: the CLIP config
    ``folder/fixture_clip.json`` with open_clip, and the backbone ``swinv2_fixture`` (``sizes["swin"]``)."""
    import open_clip

    if open_clip.get_model_config(CLIP_NAME) != sizes["clip"]:
        open_clip.add_model_config(folder / CLIP_FILE)  # a later file of the same name wins
        if open_clip.get_model_config(CLIP_NAME) != sizes["clip"]:
            raise ValueError(f"{folder / CLIP_FILE}: not the CLIP config the fixture's sizes name")
    swin = dict(sizes["swin"])
    known = BACKBONES.get(BACKBONE_NAME)
    if known is not None and getattr(known, "swin", None) == swin:
        return

    def swinv2_fixture(dim: int = 32, checkpoint: str | None = None, drop_path: float = 0.0) -> SwinV2Backbone:
        if checkpoint is not None:
            raise ValueError(f"{BACKBONE_NAME}: the fixture's backbone takes no checkpoint file")
        return ReducedSwinV2(dim, swin, drop_path)

    swinv2_fixture.swin = swin  # type: ignore[attr-defined]
    with warnings.catch_warnings():  # a fixture of other sizes read before, in the same process
        warnings.simplefilter("ignore", UserWarning)
        register_backbone(swinv2_fixture)


@torch.no_grad()
def round_clip_like_openai(clip: nn.Module) -> dict[str, torch.dtype]:
    """Round, in place, the tensors OpenAI's ``convert_weights`` makes fp16 (Linear/Conv weights and biases,
    attention in-projections, ``text_projection``, ``visual.proj``) to fp16 values; their keys → fp16."""
    # the same rule as OpenAI's clip.model.convert_weights
    from open_clip.model import convert_weights_to_lp

    half = copy.deepcopy(clip)
    convert_weights_to_lp(half, torch.float16)
    dtypes = {k: v.dtype for k, v in half.state_dict().items() if v.dtype == torch.float16}
    for k, v in clip.state_dict().items():
        if k in dtypes:
            v.copy_(v.half().float())
    return dtypes


# ----------------------------------------------------------------------------------------------------
# recording the reference


def _commit(reference: Path, given: str | None) -> str:
    """The checkout's HEAD (``git rev-parse``; not that of a repository the folder merely sits in), or ``given``."""
    proc = subprocess.run(["git", "-C", str(reference), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                          text=True, check=False)
    lines = proc.stdout.split()
    own = proc.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == reference.resolve()
    found = lines[1] if own else None
    if given and found and not found.startswith(given):
        raise UsageError(f"--commit {given}: the checkout {reference} is at {found}")
    if not (given or found):
        raise UsageError(f"--reference {reference}: not a git checkout (git rev-parse HEAD failed): pass --commit "
                         "HASH, the yzrs/CapeNext commit its files are from")
    return found or str(given)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs_meta(inputs: ParityInputs) -> dict[str, Any]:
    return {"categories": inputs.categories, "names": inputs.names, "visible": inputs.visible,
            "skeletons": inputs.skeletons}


def _command(config: str, seed: int, commit_given: bool, commit: str) -> str:
    """The command that makes this fixture (the checkout as ``DIR``)."""
    extra = (f" --config {config}" if config != DEFAULT_CONFIG else "") + (f" --seed {seed}" if seed else "")
    return COMMAND + extra + (f" --commit {commit}" if commit_given else "")


def _versions() -> dict[str, str]:
    import open_clip
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "open_clip": open_clip.__version__}


def record(reference: Path, config: str, seed: int, out: Path, commit: str, command: str = COMMAND
           ) -> dict[str, Any]:
    """Build the reduced reference model, run it on the fixed inputs and write the fixture into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / CLIP_FILE).write_text(json.dumps(SIZES["clip"], indent=2) + "\n")
    register(out, SIZES)
    shared = SharedCLIP(model_name=CLIP_NAME)
    with stubbed_imports(reference, shared, REFERENCE_BARE):
        print(f"building the reference model from {config} ({FUSION_MODULE}) at reduced sizes, seed {seed} ...",
              flush=True)
        built = reduced_config(reference_config(reference, config))
        ref, changed = build_reference(reference, config, seed, shared, adjust=lambda _: copy.deepcopy(built))
        dtypes = {f"text_backbone.{k}": v for k, v in round_clip_like_openai(shared.get()).items()}
        inputs = make_inputs(seed, size=SIZES["swin"]["img_size"])
        with contextlib.redirect_stdout(sys.stderr):  # the reference prints from its forward pass
            values = run_reference(ref, inputs)
        config_text = ((reference / config).read_text() + "\n# jobs.conversion.fixture: the model above at "
                       f"reduced sizes, as built\nmodel = {built!r}\n")
        save_official(ref, out / CHECKPOINT, config_text, dtypes, version="stand-in (jobs.conversion.fixture)")
    tensors = {"input.img": inputs.img.contiguous()}
    tensors.update({f"stage.{k}": v.contiguous() for k, v in values.items()})
    save_file(tensors, str(out / OUTPUTS))
    tr = SIZES["transformer"]
    meta = {
        "format": FORMAT,
        "reference": {"repository": "yzrs/CapeNext", "commit": commit, "config": config,
                      "fusion_module": FUSION_MODULE},
        "command": command,
        "seed": seed,
        "seeds": {"weights": seed, "re-randomised constants": seed + 1, "inputs": seed,
                  "clip": "capenext.models.clip.RANDOM_CLIP_SEED (0)"},
        "sizes": SIZES,
        "re_randomised": len(changed),
        "clip_fp16": sorted(dtypes),
        "ours": our_overrides(SIZES),
        "inputs": _inputs_meta(inputs),
        "stages": [s.key for s in stages(tr["num_encoder_layers"], tr["num_decoder_layers"])],
        "tolerance": {"atol": ATOL, "rtol": RTOL},
        "versions": _versions(),
    }
    meta["files"] = {name: {"bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
                     for name in (CHECKPOINT, OUTPUTS, CLIP_FILE)}
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ----------------------------------------------------------------------------------------------------
# reading and checking it


@dataclass
class Fixture:
    folder: Path
    meta: dict[str, Any]
    inputs: ParityInputs
    outputs: dict[str, torch.Tensor]  # stage key → the reference's value (and "_hw")

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT

    def stage_list(self):
        tr = self.meta["sizes"]["transformer"]
        return stages(tr["num_encoder_layers"], tr["num_decoder_layers"])


def read_fixture(folder: Path) -> Fixture:
    """The fixture in ``folder`` (files checked against their sha256), registered for our model (:func:`register`)."""
    from safetensors.torch import load_file

    meta_path = folder / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {META} (make it with {COMMAND})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for name, info in meta["files"].items():
        if not (folder / name).is_file() or _sha256(folder / name) != info["sha256"]:
            raise ValueError(f"{folder / name}: missing or not the file {META} records (sha256): regenerate "
                             f"with {COMMAND}")
    register(folder, meta["sizes"])
    tensors = load_file(str(folder / OUTPUTS))
    spec = meta["inputs"]
    inputs = ParityInputs(img=tensors["input.img"], categories=spec["categories"], names=spec["names"],
                          visible=spec["visible"], skeletons=spec["skeletons"])
    outputs = {k[len("stage."):]: v for k, v in tensors.items() if k.startswith("stage.")}
    return Fixture(folder, meta, inputs, outputs)


def convert_argv(fixture: Fixture, out: Path) -> list[str]:
    """``jobs.convert``'s arguments for the fixture's checkpoint: its kind and our config at its sizes."""
    sets = [item for k, v in fixture.meta["ours"].items() for item in ("--set", f"{k}={v}")]
    return ["--official", str(fixture.checkpoint), "--kind", "capenext", "--out", str(out), *sets]


def check(folder: Path, work: Path, perturb_key: str | None = None) -> Report:
    """Convert the fixture's checkpoint with ``jobs.convert``, load it, run the stored inputs and compare every
    stage with the stored reference outputs; ``perturb_key``: one of our parameters gets noise first."""
    from capenext.checkpoint import load_model
    from jobs.convert import main as convert_main

    fixture = read_fixture(folder)
    out = work / "converted.pt"
    with contextlib.redirect_stdout(sys.stderr):
        convert_main(convert_argv(fixture, out))
    model, _, _ = load_model(out)
    if perturb_key:
        perturb(model, perturb_key)
    ours = run_ours(model, fixture.inputs)
    tol = fixture.meta["tolerance"]
    return compare(fixture.outputs, ours, fixture.inputs.kp_mask, tol["atol"], tol["rtol"], fixture.stage_list())


# ----------------------------------------------------------------------------------------------------
# the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.conversion.fixture",
        description="Record the official model's forward (yzrs/CapeNext, run from your checkout with the parity "
                    "check's stand-ins, at reduced sizes and seeded random weights) as the test suite's conversion "
                    "fixture: the official-format checkpoint, fixed inputs and every stage's output.",
        epilog=f"example:\n  {COMMAND.replace('DIR', '/path/to/CapeNext')}\n"
               "  python -m jobs.conversion.fixture --check   # compare our conversion with it (no checkout)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=None, help="a checkout of yzrs/CapeNext (to make the fixture)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the fixture folder ({DEFAULT_OUT})")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the reference config, relative to it ({DEFAULT_CONFIG})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (0)")
    p.add_argument("--commit", default=None,
                   help="the yzrs/CapeNext commit of --reference when it is not a git checkout (e.g. git archive)")
    p.add_argument("--check", action="store_true",
                   help="only compare our conversion of --out's checkpoint with its recorded outputs")
    p.add_argument("--perturb", nargs="?", const=DEFAULT_PERTURB, default=None, metavar="KEY",
                   help=f"with --check: negative control, noise on our parameter KEY (default {DEFAULT_PERTURB})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check == (args.reference is not None):
        raise UsageError("give either --reference DIR (make the fixture) or --check (compare with it)")
    if args.perturb and not args.check:
        raise UsageError("--perturb goes with --check")
    if args.reference is not None:
        check_reference(args.reference, args.config)
    with torch.no_grad():
        return run(args)


def _report(report: Report, perturb_key: str | None) -> int:
    print(report.table())
    if report.ok:
        print("fixture: every stage of our conversion within the recorded tolerance of the reference's outputs")
        return 0
    print(f"fixture: FAILED, first at {report.first_failure}")
    if perturb_key:
        expected = expected_stage(perturb_key)
        verdict = "as expected" if report.first_failure == expected else f"expected at {expected or 'unknown'}"
        print(f"negative control ({perturb_key}): failed at {report.first_failure}, {verdict}")
    return 1


def run(args: argparse.Namespace) -> int:
    """Make the fixture in a temporary folder, check it, then move it to ``--out``; or only check ``--out``."""
    with tempfile.TemporaryDirectory(prefix="fixture-") as tmp:
        work = Path(tmp)
        if args.check:
            return _report(check(args.out, work, args.perturb), args.perturb)
        commit = _commit(args.reference, args.commit)
        command = _command(args.config, args.seed, args.commit is not None, commit)
        meta = record(args.reference, args.config, args.seed, work / "fixture", commit, command)
        code = _report(check(work / "fixture", work), None)
        if code:
            print(f"nothing written to {args.out}", file=sys.stderr)
            return code
        args.out.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT, OUTPUTS, CLIP_FILE, META):
            shutil.copyfile(work / "fixture" / name, args.out / name)
    total = sum(info["bytes"] for info in meta["files"].values()) + (args.out / META).stat().st_size
    print(f"wrote {args.out} ({total / 1e6:.2f} MB; yzrs/CapeNext {commit[:12]})")
    return 0


if __name__ == "__main__":
    run_main(main)
