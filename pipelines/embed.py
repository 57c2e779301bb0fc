"""Precompute the frozen CLIP embeddings: ``python -m pipelines.embed --shards DIR --out DIR [--config NAME]``.

The tables (format: :mod:`capenext.data.embeddings`) are made for a run's config: the same ``--config``
and ``--set section.field=value`` as ``jobs.train`` (and the same default preset: ``tiny`` for the tiny
backbone, else ``swinv2_t``), so the crop, the box scale, the CLIP activation and input normalisation
are the ones the run will check for. Three parquet tables, each L2-normalised float32 vectors:

* ``images.parquet``: the un-augmented query crop (``data.image_size``, box scaled by ``data.bbox_scale``,
  normalised as ``model.clip_image_norm`` says, resized to CLIP's input, 224 for ViT-B-32). Ray Data
  reads the shards (``read_webdataset``) and runs ``map_batches`` with a callable CLIP class on an actor
  pool; ``--device cuda`` gives each actor a GPU (refused when the cluster has none), ``--device cpu``
  keeps them on CPUs even when GPUs exist; the default is cuda when the Ray cluster has GPUs, else cpu.
* ``classes.parquet``: ``a photo of {name}``.
* ``keypoints.parquet``: the keypoint texts (the annotation's names, or ``data.descriptions`` for
  ``data.text_variant``: ``--descriptions FILE [--text-variant V]``), ``clean``
  plus the seeded noisy variants of :mod:`capenext.noise` (``typo@R``, ``template:NAME``) that the
  robustness evaluation reads.

``embeddings.json`` records every field of :data:`capenext.data.embeddings.FIELDS`, the shard manifest
digest and the variants. A re-run whose inputs are unchanged does nothing; files are written to a
temporary name, then renamed. The tables are built by :mod:`pipelines.clip_tables`; this module is the
command and :func:`run`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from capenext.cli import UsageError, run_main
from capenext.config import RunCfg
from capenext.data.embeddings import META_FILE, TABLES, expected_metadata
from capenext.data.mp100 import Category
from capenext.data.shards import ShardIndex
from capenext.files import write_atomic
from capenext.noise import keypoint_variants, load_template_maps
from pipelines.clip_tables import DEVICE_HELP, clip_of, image_table, plan_actors, text_tables, write_table
from pipelines.cluster import start_ray
from capenext.options import (add_address, add_config_options, add_device, add_noise_seed, add_recipe,
                                       config_from_args, positive)


def run(shards: Path, out: Path, cfg: RunCfg, batch_size: int = 64, typo_rates: tuple[float, ...] = (0.1,),
        template_map: str | None = None, noise_seed: int = 0, actors: int | None = None,
        address: str | None = None, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Write the three tables and ``embeddings.json`` for ``cfg`` into ``out``; returns the metadata.

    ``batch_size`` is images or texts per CLIP forward; ``device`` the CLIP actors' (None: cuda when the Ray
    cluster has GPUs, else cpu; see :func:`pipelines.clip_tables.plan_actors`). Ray: reuses an initialised
    instance, else ``ray.init(address)``.
    """
    if cfg.model.clip_checkpoint is None:
        raise UsageError("pass --clip-checkpoint PATH (local CLIP weights) or --clip-checkpoint random")
    index = ShardIndex(shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    maps = load_template_maps(template_map)
    meta = {**expected_metadata(cfg), "manifest_digest": index.digest, "typo_rates": list(typo_rates),
            "template_maps": maps, "noise_seed": noise_seed}
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    if meta_path.is_file() and all((out / t).is_file() for t in TABLES):
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} == meta:
            if progress:
                print(f"embeddings in {out} are up to date; nothing to do")
            return old

    start_ray(address)
    plan = plan_actors(device, actors)
    if cfg.model.clip_precision == "fp16" and plan.device != "cuda":
        raise UsageError("model.clip_precision=fp16 runs on CUDA only: use --device cuda on a cluster with GPUs, "
                         "or --set model.clip_precision=fp32")
    clip = clip_of(cfg)
    if cfg.model.clip_precision == "fp16" and torch.cuda.is_available():  # the text tower: fp16 runs on CUDA only
        clip = clip.to("cuda")
    meta["embed_dim"] = clip.embed_dim

    def variants_of(cat: Category) -> dict[str, list[str]]:
        return keypoint_variants(list(cat.keypoints), typo_rates, maps, noise_seed)

    classes, keypoints = text_tables(clip, index.categories, variants_of, batch_size, progress)
    del clip
    images = image_table(index, cfg, batch_size, plan)
    if images.num_rows != len(index.samples):
        raise RuntimeError(f"embedded {images.num_rows} images, the shards hold {len(index.samples)}")
    meta["counts"] = {"images": images.num_rows, "classes": classes.num_rows, "keypoints": keypoints.num_rows}
    for name, table in zip(TABLES, (images, classes, keypoints)):
        write_table(table, out / name, meta)
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    return meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.embed",
        description="Precompute frozen CLIP class, keypoint (clean and noisy) and image embeddings from "
                    "the shards into parquet tables for a run's config, on Ray (GPU actors when the cluster "
                    "has GPUs, see --device). Pass the same --config/--set (or --clip-* options) as the "
                    "training run.",
        epilog="example (the tiny CPU settings):\n"
               "  python -m pipelines.embed --shards shards --out emb --config tiny --clip-checkpoint random",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", type=Path, required=True, help="shard folder written by pipelines.shard")
    p.add_argument("--out", type=Path, required=True, help="output folder for the parquet tables")
    g = p.add_argument_group("the run's config (as jobs.train takes it)")
    add_recipe(g)
    add_config_options(g, "backbone", "clip_model", "clip_checkpoint", "image_size", "descriptions", "text_variant")
    g = p.add_argument_group("the tables")
    g.add_argument("--encode-batch-size", type=int, default=64,
                   help="images or texts per CLIP forward (default 64)")
    g.add_argument("--typo-rate", default="0.1",
                   help="typo rate(s) per letter to precompute, comma-separated (default 0.1)")
    g.add_argument("--template-map", default=None, help="JSON word map(s) for template variants "
                   "(default: the paper's Table 5 maps)")
    add_noise_seed(g)
    g = p.add_argument_group("execution")
    add_device(g, default=None, help=DEVICE_HELP)
    g.add_argument("--actors", type=int, default=None,
                   help="CLIP actors (default: one per GPU on cuda, else one per CPU less one)")
    add_address(g)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunCfg:
    """The run's config from the same preset rule, recipe, options and overrides as ``jobs.train``; the
    paper recipe's tables read the reference's texts, so it needs ``--descriptions``."""
    cfg = config_from_args(args, args.recipe, "cuda" if args.device == "cuda" else "cpu")
    if args.recipe == "paper" and cfg.data.descriptions is None:
        raise UsageError("--recipe paper embeds the reference's keypoint texts: pass --descriptions FILE, made by "
                         "python -m pipelines.descriptions --reference CHECKOUT --out FILE (from a checkout of the "
                         "official code)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    positive("--encode-batch-size", args.encode_batch_size)
    positive("--actors", args.actors)
    try:
        rates = tuple(float(r) for r in args.typo_rate.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"--typo-rate expects comma-separated numbers, got {args.typo_rate!r}") from None
    cfg = resolve_config(args)
    meta = run(args.shards, args.out, cfg, args.encode_batch_size, rates, args.template_map, args.noise_seed,
               args.actors, args.address, device=args.device)
    print(json.dumps({k: meta[k] for k in ("clip_model", "clip_checkpoint_sha256", "counts") if k in meta}))
    return 0


if __name__ == "__main__":
    run_main(main)
