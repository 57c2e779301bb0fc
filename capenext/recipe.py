"""Recipes: how far a run is from the paper, and ``--recipe paper`` to make it the paper's.

The paper's numbers come from the reference implementation (yzrs/CapeNext at 1320e4a, mmpose 0.29:
``configs/clip*/clip_split{K}_config.py``). :func:`paper_settings` is every setting that moves numbers as
the reference has it, per backbone, as dotted config keys; :func:`apply_recipe` sets them on a config
(``--recipe paper``; ``--recipe default`` is our faster default for the synthetic set and own data, left as
the preset says); :func:`departures` lists, for any run, each setting that differs from the paper's for its
backbone (a run logs them as its ``paper_departures`` tag, so a table says what it is). Job-level facts
that are not config fields (the device, the workers, validation frequency, the test's episodes) are passed
in as :class:`JobFacts`.

What the reference does, setting by setting (its file in brackets):

* keypoint texts: CapeX's hand-written descriptions, the ``regular`` rules (``transformer_dataset.py``,
  ``utils.py``): ``data.descriptions`` must name the file ``pipelines.descriptions`` writes;
* the CLIP image embedding: computed inside the forward from the augmented crop, ImageNet-normalised,
  resized 256→224 (``model.image_embedding=online``, ``model.clip_image_norm=imagenet``); CLIP in fp16 on
  the GPU (``model.clip_precision=fp16``, CUDA only: fp32 on a CPU, a departure), the pose model in fp32
  (``model.precision=fp32``);
* schedule: Adam, lr 1e-5, no weight decay, linear warm-up over 1000 iterations from 0.001×, lr ÷10 at
  epochs 160 and 180 of 200, batch 32 (``torch.optim.Adam`` stepping each tensor, ``optim.fused_adam=false``);
* data: 256² crops (224² for ViT-B/16), 64² heatmaps, σ 1, box × 1.25, scale 0.15, rotation 15° with
  probability 0.6, full-resolution decode;
* validation every 25 epochs on 100 × 15 episodes, the best by val PCK@0.2; the test on 200 × 15 of the
  reference's own episodes (``make_paired_samples``, ``random.seed(1)``: ``data.episodes=reference``);
* backbones with their stochastic depth: Swin V2-T 0.2, the others none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from capenext.config import RunCfg, flatten, override, to_dict

RECIPES = ("default", "paper")
PAPER_BACKBONES = ("swinv2_t", "hrnet_w32", "vit_b16", "dinov2_vits")
PAPER_VAL_EVERY = 25
PAPER_BATCH = 32
BATCHNORM_BACKBONES = ("hrnet_w32",)  # BatchNorm sees the per-worker batch: 32 on one worker, as the reference

_COMMON: dict[str, Any] = {
    "model.clip_model": "ViT-B-32", "model.text_encoder": "clip", "model.clip_quick_gelu": True, "model.clip_image_norm": "imagenet",
    "model.image_embedding": "online", "model.precision": "fp32",
    "model.dim": 256, "model.heads": 8, "model.enc_layers": 3, "model.dec_layers": 3, "model.ffn_dim": 768,
    "model.dropout": 0.1, "model.fusion_ffn_dim": 2048, "model.fusion_heads": 8,
    "optim.lr": 1e-5, "optim.weight_decay": 0.0, "optim.warmup_iters": 1000, "optim.warmup_ratio": 0.001,
    "optim.epochs": 200, "optim.lr_steps": (0.8, 0.9), "optim.batch_size": PAPER_BATCH,
    "optim.heatmap_weight": 2.0, "optim.fused_adam": False,
    "data.image_size": 256, "data.heatmap_size": 64, "data.sigma": 1.0, "data.bbox_scale": 1.25,
    "data.scale_sigma": 0.15, "data.scale_clip": 0.15, "data.rot_sigma": 15.0, "data.rot_prob": 0.6,
    "data.reduced_decode": False, "data.text_variant": "regular", "data.episodes": "reference",
    "data.val_episodes": 100, "data.test_episodes": 200, "data.queries": 15,
}
_PER_BACKBONE: dict[str, dict[str, Any]] = {
    "swinv2_t": {"model.drop_path": 0.2},
    "hrnet_w32": {"model.drop_path": None},
    "vit_b16": {"model.drop_path": None, "data.image_size": 224},
    "dinov2_vits": {"model.drop_path": None},
}


@dataclass(frozen=True)
class JobFacts:
    """What a run does beside its config that the paper fixes too."""

    device: str = "cpu"  # cpu | cuda
    workers: int = 1  # processes sharing the global batch
    val_every: int = PAPER_VAL_EVERY
    sync_batchnorm: bool = False


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}; valid: {list(RECIPES)}")
    return recipe


def paper_settings(backbone: str, device: str = "cuda") -> dict[str, Any]:
    """The reference's value of every config setting that moves numbers, for ``backbone`` (one the paper
    did not use gets the common settings). CLIP runs in fp16 where the reference ran it, on a GPU."""
    settings = {**_COMMON, **_PER_BACKBONE.get(backbone, {})}
    settings["model.clip_precision"] = "fp16" if device == "cuda" else "fp32"
    return settings


def apply_recipe(cfg: RunCfg, recipe: str, device: str = "cpu") -> RunCfg:
    """``cfg`` with the recipe's settings (``default``: unchanged). Named options and ``--set`` applied
    after this still win, and show as departures."""
    if check_recipe(recipe) == "default":
        return cfg
    return override(cfg, {k: _text(v) for k, v in paper_settings(cfg.model.backbone, device).items()})


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or ()) == list(b or ())
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def departures(cfg: RunCfg, job: JobFacts = JobFacts()) -> list[str]:
    """Every setting of this run that differs from the paper's for its backbone, one short line each
    (``optim.epochs 4 (paper 200)``), in a fixed order; empty for a run exactly as the paper's."""
    out = []
    backbone = cfg.model.backbone
    if backbone not in PAPER_BACKBONES:
        out.append(f"model.backbone {backbone} (paper: one of {', '.join(PAPER_BACKBONES)})")
    if cfg.model.clip_checkpoint in (None, "random"):
        out.append("model.clip_checkpoint random (paper: OpenAI's ViT-B/32 weights)")
    if cfg.model.backbone_checkpoint is None:
        out.append("model.backbone_checkpoint none: random init (paper: ImageNet weights)")
    if cfg.data.descriptions is None:
        out.append("data.descriptions none: the annotations' names (paper: the reference's regular texts)")
    have = flatten(to_dict(cfg))
    for key, want in paper_settings(backbone, "cuda").items():  # the paper's own values, GPU included
        if not _same(have.get(key), want):
            why = " (CLIP fp16 runs on CUDA only)" if key == "model.clip_precision" and job.device != "cuda" else ""
            out.append(f"{key} {_text(have.get(key))} (paper {_text(want)}){why}")
    if job.val_every != PAPER_VAL_EVERY:
        out.append(f"validation every {job.val_every} epochs (paper {PAPER_VAL_EVERY})")
    if backbone in BATCHNORM_BACKBONES and job.workers > 1 and not job.sync_batchnorm:
        out.append(f"BatchNorm over {cfg.optim.batch_size // job.workers} images per worker (paper "
                   f"{PAPER_BATCH}: one worker, or SyncBatchNorm)")
    return out
