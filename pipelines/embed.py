"""Precompute the frozen CLIP embeddings: ``python -m pipelines.embed --shards DIR --out DIR``.

Three parquet tables, each L2-normalised float32 vectors:

* ``images.parquet``: ``key``, ``ann_id``, ``category_id``, ``embedding`` of the un-augmented query
  crop (the training crop at ``--image-size``, CLIP-normalised and resized to CLIP's input, 224 for
  ViT-B-32). Ray Data reads the shards (``read_webdataset``) and runs ``map_batches`` with a callable
  CLIP class on an actor pool; each actor takes a GPU when the cluster has one, CPUs otherwise.
* ``classes.parquet``: ``category_id``, ``prompt`` (``a photo of {name}``), ``embedding``.
* ``keypoints.parquet``: ``category_id``, ``keypoint_index``, ``text``, ``variant``, ``embedding``; the
  variants are ``clean`` plus the seeded noisy ones of :mod:`capenext.noise` (``typo@R``,
  ``template:NAME``) that the robustness evaluation reads.

``embeddings.json`` (and each table's schema metadata) records the CLIP model, the checkpoint's sha256
(or ``random``), the shard manifest digest, the crop size and the variants; :func:`check_metadata`
refuses embeddings that do not match a run's config with one line naming the field. A re-run whose
inputs are unchanged does nothing; files are written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import hashlib
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
from capenext.config import DataCfg
from capenext.data.mp100 import Category, Sample
from capenext.data.shards import ShardIndex
from capenext.data.transforms import crop, decode_image
from capenext.engine import EmbeddingBank
from capenext.models.clip import FrozenCLIP, class_prompt
from capenext.noise import keypoint_variants, load_template_maps
from pipelines.shard import init_ray

META_FILE = "embeddings.json"
TABLES = ("images.parquet", "classes.parquet", "keypoints.parquet")
# fields a training run must agree with: a mismatch is refused
CHECKED_FIELDS = ("clip_model", "clip_checkpoint_sha256", "manifest_digest", "image_size")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_id(checkpoint: str | None) -> str:
    """``random`` or the sha256 of the local CLIP checkpoint file."""
    if checkpoint is None or checkpoint == "random":
        return "random"
    return file_sha256(checkpoint)


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

    def __init__(self, clip_model: str, clip_checkpoint: str, image_size: int, bbox_scale: float):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = FrozenCLIP(clip_model, clip_checkpoint).to(self.device)
        self.image_size, self.bbox_scale = image_size, bbox_scale

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


def image_table(index: ShardIndex, clip_model: str, clip_checkpoint: str, image_size: int, bbox_scale: float,
                batch_size: int, actors: int, use_gpu: bool, cpus_per_actor: float = 1.0) -> pa.Table:
    """Ray Data: shards → actor pool of CLIP image towers → one table, sorted by annotation id."""
    import ray

    ds = ray.data.read_webdataset([str(p) for p in index.shard_paths], decoder=None)
    ds = ds.map_batches(
        ClipImageEmbedder,
        fn_constructor_kwargs=dict(clip_model=clip_model, clip_checkpoint=clip_checkpoint,
                                   image_size=image_size, bbox_scale=bbox_scale),
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


def embed(shards: Path, out: Path, clip_model: str = "ViT-B-32", clip_checkpoint: str | None = None,
          batch_size: int = 64, image_size: int = DataCfg.image_size, typo_rates: tuple[float, ...] = (0.1,),
          template_map: str | None = None, noise_seed: int = 0, actors: int | None = None,
          address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the three tables and ``embeddings.json`` into ``out``; returns the metadata."""
    import ray

    if clip_checkpoint is None:
        raise UsageError("pass --clip-checkpoint PATH (local CLIP weights) or --clip-checkpoint random")
    index = ShardIndex(shards)
    maps = load_template_maps(template_map)
    meta = {
        "clip_model": clip_model,
        "clip_checkpoint_sha256": checkpoint_id(clip_checkpoint),
        "manifest_digest": index.digest,
        "image_size": image_size,
        "bbox_scale": DataCfg.bbox_scale,
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

    clip = FrozenCLIP(clip_model, clip_checkpoint)
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
    images = image_table(index, clip_model, clip_checkpoint, image_size, DataCfg.bbox_scale, batch_size,
                         n_actors, use_gpu, cpus_per_actor)
    if images.num_rows != len(index.samples):
        raise RuntimeError(f"embedded {images.num_rows} images, the shards hold {len(index.samples)}")
    meta["counts"] = {"images": images.num_rows, "classes": classes.num_rows, "keypoints": keypoints.num_rows}
    for name, table in zip(TABLES, (images, classes, keypoints)):
        _write_table(table, out / name, meta)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return meta


def read_metadata(embeddings: str | Path) -> dict[str, Any]:
    path = Path(embeddings) / META_FILE
    if not path.is_file() or not all((Path(embeddings) / t).is_file() for t in TABLES):
        raise FileNotFoundError(f"no embeddings in {embeddings}: run python -m pipelines.embed --out {embeddings}")
    return json.loads(path.read_text())


def check_metadata(embeddings: str | Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Refuse embeddings made with another CLIP, checkpoint, shard set or crop size (one line)."""
    meta = read_metadata(embeddings)
    for key in CHECKED_FIELDS:
        if key in expected and meta.get(key) != expected[key]:
            raise ValueError(f"embeddings in {embeddings} were made with {key}={meta.get(key)!r}, this run "
                             f"uses {expected[key]!r}: re-run pipelines.embed with the run's settings")
    return meta


def _vectors_of(table: pa.Table) -> torch.Tensor:
    col = table.column("embedding").combine_chunks()
    return torch.from_numpy(col.values.to_numpy().reshape(len(col), -1).copy())


def load_bank(embeddings: str | Path, variant: str = "clean", images: bool = True) -> EmbeddingBank:
    """The tables as an :class:`EmbeddingBank`; ``images=False`` skips the image table (ablations that
    use no image embedding read none)."""
    embeddings = Path(embeddings)
    read_metadata(embeddings)
    kp = pq.read_table(embeddings / "keypoints.parquet", filters=[("variant", "=", variant)])
    if kp.num_rows == 0:
        have = sorted(set(pq.read_table(embeddings / "keypoints.parquet", columns=["variant"])
                          .column("variant").to_pylist()))
        raise KeyError(f"keypoint variant {variant!r} not in {embeddings}; available: {have}")
    vec = _vectors_of(kp)
    cats = np.asarray(kp.column("category_id"))
    idx = np.asarray(kp.column("keypoint_index"))
    keypoints = {}
    for c in np.unique(cats):
        rows = np.flatnonzero(cats == c)
        keypoints[int(c)] = vec[rows[np.argsort(idx[rows])]]
    cl = pq.read_table(embeddings / "classes.parquet")
    classes = dict(zip(np.asarray(cl.column("category_id")).tolist(), _vectors_of(cl)))
    bank = EmbeddingBank(keypoints=keypoints, classes=classes)
    if images:
        im = pq.read_table(embeddings / "images.parquet", columns=["ann_id", "embedding"])
        bank.images = dict(zip(np.asarray(im.column("ann_id")).tolist(), _vectors_of(im)))
    return bank


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.embed",
        description="Precompute frozen CLIP class, keypoint (clean and noisy) and image embeddings from "
                    "the shards into parquet tables, on Ray (GPU actors when the cluster has GPUs).",
    )
    p.add_argument("--shards", type=Path, required=True, help="shard folder written by pipelines.shard")
    p.add_argument("--out", type=Path, required=True, help="output folder for the parquet tables")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name, or 'tiny' (default ViT-B-32)")
    p.add_argument("--clip-checkpoint", default=None,
                   help="local CLIP weights file, or 'random' for explicit random init (required)")
    p.add_argument("--batch-size", type=int, default=64, help="images or texts per CLIP forward (default 64)")
    p.add_argument("--image-size", type=int, default=DataCfg.image_size,
                   help="training crop size the image embedding is taken from (default 256)")
    p.add_argument("--typo-rates", default="0.1", help="comma-separated typo rates to precompute (default 0.1)")
    p.add_argument("--template-map", default=None, help="JSON word map(s) for template variants "
                   "(default: the paper's Table 5 maps)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the noisy variants (default 0)")
    p.add_argument("--actors", type=int, default=None, help="CLIP actors (default: one per GPU, else per CPU)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    rates = tuple(float(r) for r in args.typo_rates.split(",") if r.strip())
    meta = embed(args.shards, args.out, args.clip_model, args.clip_checkpoint, args.batch_size, args.image_size,
                 rates, args.template_map, args.noise_seed, args.actors, args.address)
    print(json.dumps({k: meta[k] for k in ("clip_model", "clip_checkpoint_sha256", "counts") if k in meta}))
    return 0


if __name__ == "__main__":
    run_main(main)
