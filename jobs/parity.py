"""Parity check against the reference implementation: ``python -m jobs.parity --reference DIR``.

For a user who has a checkout of the official code (yzrs/CapeNext) but no mmcv or mmpose. It:

1. imports the reference's detector (``CapeXModel``), head, transformer, fusion module
   (``SimpleMultiModalModule``) and Swin V2 code from the checkout ``DIR``, with small stand-ins for the
   mmcv/mmpose pieces those files import (registries and builders, ``BaseModule``, ``BasePose``, the
   ``Conv2d``/``Linear`` wrappers, ``xavier_init``, ...). The stand-ins live in ``sys.modules`` only
   while the check runs (:func:`stubbed_imports`); every computation that runs is the reference's own
   code. The package ``__init__`` files that pull in the reference's datasets and training API are not
   executed: the model packages are opened as bare packages and their files imported one by one.
2. builds the reference model from its Swin V2-T CLIP config (``configs/clip/clip_split1_config.py``,
   with ``additional_module_cfg`` from ``configs/info.py`` set to ``SimpleMultiModalModule``, as for the
   published CapeNext weights) at seeded random weights. Every tensor the reference initialises to a
   constant (zero biases, LayerNorm affine, the zero last layer of the offset heads, Swin V2's zero
   res-post-norms, ``q_bias``/``v_bias``, ``logit_scale``) is re-randomised around its value: otherwise
   the offset heads and the Swin blocks would be identities and the check would prove little.
3. writes it as an mmcv checkpoint (``{"meta": ..., "state_dict": ...}``), converts it with
   ``jobs.convert`` and loads the result with :func:`capenext.checkpoint.load_model`.
4. feeds both models the same inputs (a two-category batch, supports with invisible keypoints) and
   compares, through forward hooks on both models, every stage: CLIP embeddings, HCMI, DSFR, the Swin
   map, the input projection, each encoder layer, the similarity maps, both proposals, each decoder
   layer and the points of every decoder layer. It prints the largest difference per stage and exits 1
   when any stage is past the float tolerance.

CLIP: the reference calls OpenAI's ``clip.load("ViT-B/32")``, which needs the ``clip`` package and its
weights. The stand-in ``clip`` module returns our own random CLIP of the same architecture instead
(open_clip ViT-B-32 with QuickGELU, seeded), so both sides see identical CLIP weights: the reference
writes them into its checkpoint as ``text_backbone`` and the conversion carries them over. The CLIP rows
therefore check the plumbing around CLIP (texts, masks, prompts, resizing, normalisation), not OpenAI's
weights.

``--perturb [KEY]`` is the negative control: one of our weight tensors (default
``encoder.layers.1.linear1.weight``) gets seeded noise after the conversion; the check must then fail, first at
the stage that weight feeds (printed as the expected stage).

Only the valid slots (support-visible keypoints) are compared: the reference computes all 100 slots,
ours only up to the batch's last valid one, and padded slots carry no meaning in either.

The pieces: :mod:`jobs.conversion.stubs` (the stand-ins and :func:`stubbed_imports`),
:mod:`jobs.conversion.reference` (the reference model built from the checkout and written as an mmcv
checkpoint; also used by :mod:`jobs.conversion.fixture`, which records the reference's outputs for the test
suite), :mod:`jobs.conversion.stages` (inputs, stages, captures, the comparison and its report); this module
runs the command.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from capenext.cli import run_main
from jobs.conversion.reference import (
    DEFAULT_CONFIG,
    FUSION_MODULE,
    INFO_CONFIG,
    REFERENCE_BARE,
    REFERENCE_MODULES,
    REQUIRED_FILES,
    build_reference,
    check_reference,
    import_reference,
    reference_config,
    rerandomise_constants,
    save_official,
)
from jobs.conversion.stages import (
    DEFAULT_PERTURB,
    MAX_SLOTS,
    Capture,
    ParityInputs,
    Report,
    Row,
    Stage,
    compare,
    expected_stage,
    make_inputs,
    our_batch,
    perturb,
    reference_batch,
    run_ours,
    run_reference,
    select,
    stages,
)
from jobs.conversion.stubs import (
    REFERENCE_ROOTS,
    STUB_ROOTS,
    BaseModule,
    BasePose,
    BaseTransformerLayer,
    Conv2d,
    Linear,
    Registry,
    SharedCLIP,
    TransformerLayerSequence,
    build_activation_layer,
    build_from_cfg,
    build_norm_layer,
    stub_tree,
    stubbed_imports,
    xavier_init,
)

__all__ = [
    "DEFAULT_CONFIG", "DEFAULT_PERTURB", "FUSION_MODULE", "INFO_CONFIG", "MAX_SLOTS", "REFERENCE_BARE",
    "REFERENCE_MODULES", "REFERENCE_ROOTS", "REQUIRED_FILES", "STUB_ROOTS",
    "BaseModule", "BasePose", "BaseTransformerLayer", "Capture", "Conv2d", "Linear", "ParityInputs", "Registry",
    "Report", "Row", "SharedCLIP", "Stage", "TransformerLayerSequence",
    "build_activation_layer", "build_from_cfg", "build_norm_layer", "build_reference", "check_reference", "compare",
    "expected_stage", "import_reference", "main", "make_inputs", "our_batch", "parse_args", "perturb",
    "reference_batch", "reference_config", "rerandomise_constants", "run_ours", "run_reference", "save_official",
    "select", "stages", "stub_tree", "stubbed_imports", "xavier_init",
]

# ----------------------------------------------------------------------------------------------------
# the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.parity",
        description="Compare our model with the reference implementation, stage by stage, on the same random "
                    "weights (the reference's own code, read from your checkout; no mmcv or mmpose needed).",
        epilog="example:\n  python -m jobs.parity --reference /path/to/CapeNext\n"
               "  python -m jobs.parity --reference /path/to/CapeNext --perturb   # negative control: must fail",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="a checkout of yzrs/CapeNext")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the reference config, relative to it ({DEFAULT_CONFIG})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (0)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance per stage (1e-5)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="tolerance relative to the stage's largest reference value (1e-4)")
    p.add_argument("--perturb", nargs="?", const=DEFAULT_PERTURB, default=None, metavar="KEY",
                   help=f"negative control: add noise to our parameter KEY after conversion "
                        f"(default {DEFAULT_PERTURB}); the check must fail at the stage it feeds")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the official-format and converted checkpoints go (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_reference(args.reference, args.config)
    with torch.no_grad():  # the whole comparison; the caller's grad mode is left as it was
        return run(args)


def run(args: argparse.Namespace) -> int:
    """Build both models, convert, compare stage by stage; 0 when every stage agrees."""
    reference = args.reference
    from capenext.checkpoint import load_model
    from jobs.convert import main as convert_main

    shared = SharedCLIP()
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="parity-")))
        work.mkdir(parents=True, exist_ok=True)
        official, ours_path = work / "reference_random.pth", work / "converted.pt"
        with stubbed_imports(reference, shared, REFERENCE_BARE):
            print(f"building the reference model from {args.config} ({FUSION_MODULE}) at seed {args.seed} ...",
                  flush=True)
            ref, changed = build_reference(reference, args.config, args.seed, shared)
            print(f"re-randomised {len(changed)} constant-initialised tensors (biases, norms, offset heads' last "
                  "layers, Swin V2 post-norms, q/v biases, logit scales)", flush=True)
            print("CLIP: both sides use the same random CLIP (open_clip ViT-B-32, QuickGELU, seeded) in place of "
                  "OpenAI's clip.load weights; the CLIP rows check the plumbing around it", flush=True)
            save_official(ref, official, (reference / args.config).read_text())
            print(f"converting {official.name} with jobs.convert ...", flush=True)
            with contextlib.redirect_stdout(sys.stderr):
                convert_main(["--official", str(official), "--kind", "capenext", "--out", str(ours_path)])
            model, _, _ = load_model(ours_path)
            model.eval()
            if args.perturb:
                perturb(model, args.perturb)
                print(f"negative control: perturbed {args.perturb} (noise of 0.5 x its std); expected first failure: "
                      f"{expected_stage(args.perturb) or 'unknown'}", flush=True)
            inputs = make_inputs(args.seed)
            print(f"inputs: 2 categories ({', '.join(inputs.categories)}), "
                  f"{sum(map(sum, inputs.visible))} of {sum(map(len, inputs.visible))} keypoints visible in "
                  f"the supports, crop {inputs.img.shape[-1]}", flush=True)
            with contextlib.redirect_stdout(sys.stderr):  # the reference prints from its forward pass
                ref_values = run_reference(ref, inputs)
        ours_values = run_ours(model, inputs)
    report = compare(ref_values, ours_values, inputs.kp_mask, args.atol, args.rtol)
    print(report.table())
    if report.ok:
        print(f"parity: every stage within atol {args.atol:g} + rtol {args.rtol:g} x max|ref|")
        return 0
    print(f"parity: FAILED, first at {report.first_failure}")
    if args.perturb:
        expected = expected_stage(args.perturb)
        verdict = "as expected" if report.first_failure == expected else f"expected at {expected or 'unknown'}"
        print(f"negative control ({args.perturb}): failed at {report.first_failure}, {verdict}")
    return 1


if __name__ == "__main__":
    run_main(main)
