"""The option vocabulary: every flag that more than one command takes is defined here, once, so that it
means one thing everywhere (the table is in ``docs/options.md``). Plain argparse over the config, in the
library so that the pipelines and the jobs share it without either importing the other.

* ``--device cpu|cuda``: where the work runs (train, sweep, evaluate, predict, serve, embed); for a Ray
  Train run it also sets the scaling (one GPU per worker on ``cuda``).
* ``--tracking-uri``: the MLflow store or server (every command that writes or reads MLflow); default
  ``MLFLOW_TRACKING_URI``, else ``sqlite:///./mlflow.db``.
* ``--address``: the Ray cluster (default ``RAY_ADDRESS``, a ``ray start`` cluster here, else a new one).
* ``--config`` / ``--set KEY=VALUE`` and the named config options (``--backbone``, ``--clip-checkpoint`` …):
  a run's config, as ``jobs.train``, ``jobs.sweep`` and ``pipelines.embed`` resolve it
  (:func:`config_from_args`).
* ``--descriptions`` / ``--text-variant``: where the keypoint texts come from.
* ``--episodes N`` / ``--queries M`` / ``--sampler ours|reference``: the test protocol (train's final test
  and evaluate), ``--val-episodes N`` for validation.
* ``--noise-seed`` / ``--typo-rate``: the noisy prompts (evaluate, embed).
* ``--runtime torch|onnx`` / ``--onnx DIR``: what computes a prediction (predict, serve): PyTorch, or
  onnxruntime on CPU over the folder ``python -m jobs.export`` wrote (:func:`add_runtime`,
  :func:`check_runtime`).
* Batch sizes have three names for three things: ``--batch-size`` (the training batch, global over
  workers), ``--eval-batch-size`` (queries per forward in the test protocol), ``--encode-batch-size``
  (images or texts per CLIP forward in the embedding job).
"""

from __future__ import annotations

import argparse
from typing import Any

from capenext.config import RunCfg, available_presets, resolve

# the named config options: dest → (flag, config field, help); a command adds the ones it takes
CONFIG_FLAGS: dict[str, tuple[str, str, str]] = {
    "ablation": ("--ablation", "model.ablation", "ablation preset (default full)"),
    "backbone": ("--backbone", "model.backbone", "registered backbone (default: the preset's)"),
    "clip_model": ("--clip-model", "model.clip_model", "open_clip model name or 'tiny' (default: the preset's)"),
    "clip_checkpoint": ("--clip-checkpoint", "model.clip_checkpoint",
                        "local CLIP weights file, or 'random' for explicit random init (default: the preset's)"),
    "backbone_checkpoint": ("--backbone-checkpoint", "model.backbone_checkpoint",
                            "local pretrained backbone weights"),
    "image_embedding": ("--image-embedding", "model.image_embedding",
                        "precomputed (the embedding tables) or online (inside the forward, as the reference)"),
    "image_size": ("--image-size", "data.image_size",
                   "crop side the backbone and the image embedding see (default: the preset's data.image_size)"),
    "epochs": ("--epochs", "optim.epochs", "epochs (default: the preset's, 200)"),
    "batch_size": ("--batch-size", "optim.batch_size",
                   "the training batch, global over all workers (default: the preset's, 32)"),
    "seed": ("--seed", "optim.seed", "seed of the run: init, pairs, augmentation and episodes (default 0)"),
    "val_episodes": ("--val-episodes", "data.val_episodes", "validation episodes per category (default 100)"),
    "episodes": ("--episodes", "data.test_episodes", "test episodes per category (default 200)"),
    "queries": ("--queries", "data.queries", "queries per episode (default 15)"),
    "sampler": ("--sampler", "data.episodes",
                "test episodes: ours (seeded, default) or reference (mmpose's make_paired_samples on the split's "
                "test annotation file)"),
    "descriptions": ("--descriptions", "data.descriptions",
                     "keypoint texts from a descriptions file (python -m pipelines.descriptions, or a CapeX-style "
                     "name → texts json) instead of the annotations' names"),
    "text_variant": ("--text-variant", "data.text_variant",
                     "which of the reference's texts the descriptions file gives (default regular)"),
    "precision": ("--precision", "model.precision",
                  "the pose model's precision: fp32 (default, the reference's) or bf16 autocast (CUDA only)"),
}
_TYPES = {"image_size": int, "epochs": int, "batch_size": int, "seed": int, "val_episodes": int, "episodes": int,
          "queries": int}
_CHOICES = {"image_embedding": ("precomputed", "online"), "sampler": ("ours", "reference"),
            "precision": ("fp32", "bf16")}


def add_config_options(g, *names: str) -> None:
    """``--config``, ``--set`` and the named config options ``names`` (keys of :data:`CONFIG_FLAGS`)."""
    g.add_argument("--config", default=None,
                   help=f"config preset (default: 'tiny' for the tiny backbone, else 'swinv2_t'); one of "
                        f"{available_presets()}")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=2e-5 (repeatable)")
    for name in names:
        add_config_option(g, name)


def add_config_option(g, name: str, **override: Any) -> None:
    """One named config option (its help and default overridable, e.g. a command-specific default)."""
    flag, _, help_ = CONFIG_FLAGS[name]
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_}
    if name in _TYPES:
        kwargs["type"] = _TYPES[name]
    if name in _CHOICES:
        kwargs["choices"] = _CHOICES[name]
    kwargs.update(override)
    g.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace, recipe: str = "default", device: str = "cpu") -> RunCfg:
    """Preset, then the recipe's settings (``paper``: the reference's for the backbone, :mod:`capenext.recipe`),
    then the named config options this command took, then ``--set`` → the config (unchecked)."""
    from capenext.config import override, parse_sets
    from capenext.recipe import apply_recipe

    named = {field: getattr(args, dest) for dest, (_, field, _) in CONFIG_FLAGS.items() if dest in vars(args)}
    cfg = resolve(args.config, {"model.backbone": named.get("model.backbone")}, [])
    cfg = apply_recipe(cfg, recipe, device)
    dotted = {k: str(v) for k, v in named.items() if v is not None}
    dotted.update(parse_sets(args.overrides))
    return override(cfg, dotted)


def add_recipe(g) -> None:
    g.add_argument("--recipe", choices=("default", "paper"), default="default",
                   help="paper: every setting the reference implementation's for the backbone (texts, image stream, "
                        "precisions, schedule, batch, validation, episodes; docs/training.md); default: ours, faster, "
                        "for the synthetic set and own data. Every run records how far it is from the paper")


DEVICES = ("cpu", "cuda")


def add_device(g, what: str = "the model", default: str | None = "cpu", help: str | None = None) -> None:
    """``--device cpu|cuda``; ``default=None`` for a command that picks by what the cluster has (its help
    says how)."""
    g.add_argument("--device", choices=DEVICES, default=default,
                   help=help or f"where {what} runs: cpu (default) or cuda")


def add_clip_precision(g) -> None:
    g.add_argument("--clip-precision", choices=("fp32", "fp16"), default=None,
                   help="the frozen CLIP's precision (default: the config's, fp32); fp16 as the reference on a GPU, "
                        "CUDA only")


def add_tracking_uri(g, default: str = "MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db") -> None:
    g.add_argument("--tracking-uri", default=None, help=f"MLflow tracking URI (default: {default})")


def add_address(g) -> None:
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, a cluster started here with ray start, else a "
                        "new local Ray)")


def add_noise_seed(g, default: int = 0) -> None:
    g.add_argument("--noise-seed", type=int, default=default,
                   help=f"seed of the noisy prompts (default {default}; pipelines.embed and jobs.evaluate agree on it)")


def positive(name: str, value: int | float | None) -> None:
    """One line when a count option is not positive."""
    from capenext.cli import UsageError

    if value is not None and value < 1:
        raise UsageError(f"{name} must be positive, got {value}")


RUNTIMES = ("torch", "onnx")  # what computes a prediction; capenext.predict takes them from here


def add_runtime(g, what: str = "the model") -> None:
    """``--runtime torch|onnx`` and ``--onnx DIR``; :func:`check_runtime` checks them together."""
    g.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help=f"what computes {what}: torch (PyTorch, default) or onnx (onnxruntime on CPU over the "
                        "files of --onnx)")
    g.add_argument("--onnx", default=None, metavar="DIR",
                   help="with --runtime onnx: the folder python -m jobs.export wrote from this very checkpoint "
                        "(its model.json's sha256 must be the checkpoint's)")


def check_runtime(args: argparse.Namespace) -> None:
    """One line when ``--runtime``/``--onnx`` do not fit together or with ``--device``/``--clip-precision``:
    ``--runtime onnx`` needs ``--onnx DIR`` and runs on CPU in fp32; ``--onnx`` needs ``--runtime onnx``."""
    from capenext.cli import UsageError

    if args.runtime == "onnx":
        if args.onnx is None:
            raise UsageError("--runtime onnx needs --onnx DIR (a folder written by python -m jobs.export)")
        if getattr(args, "device", "cpu") != "cpu":
            raise UsageError(f"--runtime onnx runs on CPU (onnxruntime): drop --device {args.device}")
        if getattr(args, "clip_precision", None) == "fp16":
            raise UsageError("--runtime onnx runs the exported CLIP in fp32: drop --clip-precision fp16")
    elif args.onnx is not None:
        raise UsageError("--onnx DIR is read with --runtime onnx only: add --runtime onnx")
