"""Precompute the frozen CLIP embeddings: ``python -m pipelines.embed --shards DIR --out DIR [--config NAME]``.

The tables (format: :mod:`capenext.data.embeddings`) are made for a run's config: the same ``--config``
and ``--set section.field=value`` as ``jobs.train`` (and the same default preset: ``tiny`` for the tiny
backbone, else ``swinv2_t``), so the crop, the box scale, the CLIP activation and input normalisation
are the ones the run will check for. Three parquet tables, each L2-normalised float32 vectors:

* ``images.parquet``: the un-augmented query crop (``data.image_size``, box scaled by ``data.bbox_scale``,
  normalised as ``model.clip_image_norm`` says, resized to CLIP's input, 224 for ViT-B-32). Ray Data
  reads the shards (``read_webdataset``) and runs ``map_batches`` with a callable CLIP class on an actor
  pool; each actor takes a GPU when the cluster has one, CPUs otherwise.
* ``classes.parquet``: ``a photo of {name}``.
* ``keypoints.parquet``: the keypoint texts (the annotation's names, or ``data.descriptions`` for
  ``data.text_variant``: ``--descriptions FILE [--text-variant V]``), ``clean``
  plus the seeded noisy variants of :mod:`capenext.noise` (``typo@R``, ``template:NAME``) that the
  robustness evaluation reads.

``embeddings.json`` records every field of :data:`capenext.data.embeddings.FIELDS`, the shard manifest
digest and the variants. A re-run whose inputs are unchanged does nothing; files are written to a
temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from capenext.cli import UsageError, run_main
from capenext.config import RunCfg, resolve, to_dict
from capenext.data.embeddings import META_FILE, TABLES, expected_metadata
from capenext.data.mp100 import Category, Sample
from capenext.data.shards import ShardIndex
from capenext.data.transforms import crop, decode_image
from capenext.models.clip import FrozenCLIP, class_prompt
from capenext.noise import keypoint_variants, load_template_maps
from jobs.common import init_ray
from jobs.runs import add_config_arguments, add_text_arguments


def _write_table(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    schema_meta = {**(table.schema.metadata or {}), b"capenext": json.dumps(meta).encode()}
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table.replace_schema_metadata(schema_meta), tmp)
    os.replace(tmp, path)


def _vectors(emb: np.ndarray) -> pa.Array:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


class ClipImageEmbedder:
    """Ray Data callable class: a batch of webdataset rows → their crops' CLIP image embeddings."""

    def __init__(self, run: dict[str, Any]):
        from capenext.cli import offline
        from capenext.config import from_dict

        offline()
        cfg = from_dict(run)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = clip_of(cfg).to(self.device)
        self.image_size, self.bbox_scale = cfg.data.image_size, cfg.data.bbox_scale

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        crops, anns, cats = [], [], []
        image_col = next(c for c in batch if c not in ("__key__", "json", "__url__", "__local_path__"))
        for key, data, meta in zip(batch["__key__"], batch[image_col], batch["json"]):
            record = json.loads(bytes(meta))
            sample = Sample.from_json(record["sample"])
            image = decode_image(bytes(data), f"shard sample {key}")
            crops.append(crop(image, sample.bbox, self.image_size, self.bbox_scale).image)
            anns.append(sample.ann_id)
            cats.append(sample.category_id)
        x = torch.from_numpy(np.stack(crops)).to(self.device)
        emb = self.clip.encode_image(x).cpu().numpy()
        return {"key": np.asarray(batch["__key__"]), "ann_id": np.asarray(anns, dtype=np.int64),
                "category_id": np.asarray(cats, dtype=np.int64), "embedding": emb.astype(np.float32)}


def text_tables(clip: FrozenCLIP, categories: dict[int, Category], variants_of, batch_size: int,
                progress: bool) -> tuple[pa.Table, pa.Table]:
    """The class and keypoint tables, encoded in batches in this process."""
    cats = sorted(categories.values(), key=lambda c: c.id)
    prompts = [class_prompt(c.name) for c in cats]
    rows = [(c.id, j, text, variant) for c in cats for variant, texts in variants_of(c).items()
            for j, text in enumerate(texts)]
    texts = prompts + [r[2] for r in rows]
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="CLIP text", disable=not progress, unit="batch"):
        out.append(clip.encode_text(texts[i: i + batch_size]).cpu().numpy())
    emb = np.concatenate(out) if out else np.zeros((0, clip.embed_dim), np.float32)
    classes = pa.table({"category_id": pa.array([c.id for c in cats], pa.int64()), "prompt": prompts,
                        "embedding": _vectors(emb[: len(cats)])})
    keypoints = pa.table({
        "category_id": pa.array([r[0] for r in rows], pa.int64()),
        "keypoint_index": pa.array([r[1] for r in rows], pa.int32()),
        "text": [r[2] for r in rows], "variant": [r[3] for r in rows],
        "embedding": _vectors(emb[len(cats):]),
    })
    return classes, keypoints


def clip_of(cfg: RunCfg) -> FrozenCLIP:
    """The run's frozen CLIP: model, weights, activation and image normalisation from ``cfg.model``."""
    return FrozenCLIP.from_cfg(cfg.model)


def image_table(index: ShardIndex, cfg: RunCfg, batch_size: int, actors: int, use_gpu: bool,
                cpus_per_actor: float = 1.0) -> pa.Table:
    """Ray Data: shards → actor pool of CLIP image towers → one table, sorted by annotation id."""
    import ray

    ds = ray.data.read_webdataset([str(p) for p in index.shard_paths], decoder=None)
    ds = ds.map_batches(
        ClipImageEmbedder,
        fn_constructor_kwargs=dict(run=to_dict(cfg)),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        # CPU actors hold less than a whole CPU when the cluster has one: the read tasks need room too
        num_cpus=0 if use_gpu else cpus_per_actor,
        batch_format="numpy",
    )
    parts = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in ("key", "ann_id", "category_id", "embedding")}
    order = np.argsort(cols["ann_id"], kind="stable")
    return pa.table({
        "key": pa.array(cols["key"][order].astype(str)),
        "ann_id": pa.array(cols["ann_id"][order], pa.int64()),
        "category_id": pa.array(cols["category_id"][order], pa.int64()),
        "embedding": _vectors(cols["embedding"][order]),
    })


def embed(shards: Path, out: Path, cfg: RunCfg, batch_size: int = 64, typo_rates: tuple[float, ...] = (0.1,),
          template_map: str | None = None, noise_seed: int = 0, actors: int | None = None,
          address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the three tables and ``embeddings.json`` for ``cfg`` into ``out``; returns the metadata."""
    import ray

    if cfg.model.clip_checkpoint is None:
        raise UsageError("pass --clip-checkpoint PATH (local CLIP weights) or --clip-checkpoint random")
    index = ShardIndex(shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    maps = load_template_maps(template_map)
    meta = {
        **expected_metadata(cfg),
        "manifest_digest": index.digest,
        "typo_rates": list(typo_rates),
        "template_maps": maps,
        "noise_seed": noise_seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    if meta_path.is_file() and all((out / t).is_file() for t in TABLES):
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} == meta:
            if progress:
                print(f"embeddings in {out} are up to date; nothing to do")
            return old

    clip = clip_of(cfg)
    if cfg.model.clip_precision == "fp16" and torch.cuda.is_available():  # fp16 CLIP runs on CUDA only
        clip = clip.to("cuda")
    meta["embed_dim"] = clip.embed_dim

    def variants_of(cat: Category) -> dict[str, list[str]]:
        return keypoint_variants(list(cat.keypoints), typo_rates, maps, noise_seed)

    classes, keypoints = text_tables(clip, index.categories, variants_of, batch_size, progress)
    del clip
    init_ray(address)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0
    cpus = resources.get("CPU", 1)
    # one actor per GPU; on CPUs, leave one CPU to the read tasks (else the pool starves them and waits)
    n_actors = actors or (int(resources["GPU"]) if use_gpu else max(1, int(cpus) - 1))
    cpus_per_actor = min(1.0, max(0.1, (cpus - 0.5) / n_actors))
    images = image_table(index, cfg, batch_size, n_actors, use_gpu, cpus_per_actor)
    if images.num_rows != len(index.samples):
        raise RuntimeError(f"embedded {images.num_rows} images, the shards hold {len(index.samples)}")
    meta["counts"] = {"images": images.num_rows, "classes": classes.num_rows, "keypoints": keypoints.num_rows}
    for name, table in zip(TABLES, (images, classes, keypoints)):
        _write_table(table, out / name, meta)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.embed",
        description="Precompute frozen CLIP class, keypoint (clean and noisy) and image embeddings from "
                    "the shards into parquet tables for a run's config, on Ray (GPU actors when the cluster "
                    "has GPUs). Pass the same --config/--set (or --clip-* options) as the training run.",
        epilog="example (the tiny CPU settings):\n"
               "  python -m pipelines.embed --shards shards --out emb --config tiny --clip-checkpoint random",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", type=Path, required=True, help="shard folder written by pipelines.shard")
    p.add_argument("--out", type=Path, required=True, help="output folder for the parquet tables")
    g = p.add_argument_group("the run's config (as jobs.train takes it)")
    add_config_arguments(g)
    g.add_argument("--backbone", default=None, help="the run's backbone (picks the default preset)")
    g.add_argument("--clip-model", default=None, help="open_clip model name, or 'tiny' (default: the preset's)")
    g.add_argument("--clip-checkpoint", default=None,
                   help="local CLIP weights file, or 'random' for explicit random init (default: the preset's)")
    g.add_argument("--image-size", type=int, default=None,
                   help="crop size the image embedding is taken from (default: the preset's data.image_size)")
    add_text_arguments(g)
    g = p.add_argument_group("the tables")
    g.add_argument("--batch-size", type=int, default=64, help="images or texts per CLIP forward (default 64)")
    g.add_argument("--typo-rates", default="0.1", help="comma-separated typo rates to precompute (default 0.1)")
    g.add_argument("--template-map", default=None, help="JSON word map(s) for template variants "
                   "(default: the paper's Table 5 maps)")
    g.add_argument("--noise-seed", type=int, default=0, help="seed of the noisy variants (default 0)")
    g.add_argument("--actors", type=int, default=None, help="CLIP actors (default: one per GPU, else per CPU)")
    g.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunCfg:
    """The run's config from the same preset rule and overrides as ``jobs.train``."""
    return resolve(args.config, {
        "model.backbone": args.backbone, "model.clip_model": args.clip_model,
        "model.clip_checkpoint": args.clip_checkpoint, "data.image_size": args.image_size,
        "data.descriptions": args.descriptions, "data.text_variant": args.text_variant}, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        rates = tuple(float(r) for r in args.typo_rates.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"--typo-rates expects comma-separated numbers, got {args.typo_rates!r}") from None
    cfg = resolve_config(args)
    meta = embed(args.shards, args.out, cfg, args.batch_size, rates, args.template_map, args.noise_seed,
                 args.actors, args.address)
    print(json.dumps({k: meta[k] for k in ("clip_model", "clip_checkpoint_sha256", "counts") if k in meta}))
    return 0


if __name__ == "__main__":
    run_main(main)
