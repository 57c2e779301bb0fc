"""The CLIP embedding tables, built (their format, metadata and reader: :mod:`capenext.data.embeddings`).

What ``pipelines.embed`` writes and ``python -m jobs.benchmark embed`` times: the class and keypoint text
tables, encoded in this process (:func:`text_tables`), and the image table, encoded by Ray Data on an
actor pool of CLIP image towers (:func:`image_table`), whose size and device :func:`plan_actors` chooses
from the Ray cluster and ``--device``. Each table holds L2-normalised float32 vectors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from capenext.cli import UsageError
from capenext.config import RunCfg, to_dict
from capenext.data.mp100 import Category, Sample
from capenext.data.shards import ShardIndex
from capenext.data.transforms import crop, decode_image
from capenext.models.clip import FrozenCLIP, class_prompt

DEVICE_HELP = ("where the CLIP actors run: cuda (one GPU per actor; refused when the Ray cluster has no GPU) "
               "or cpu (CPU actors, even when the cluster has GPUs); default: cuda when the Ray cluster has "
               "GPUs, else cpu")


def write_table(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    """``table`` with ``meta`` in its schema metadata (key ``capenext``), written to a temporary name, then
    renamed into place."""
    schema_meta = {**(table.schema.metadata or {}), b"capenext": json.dumps(meta).encode()}
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table.replace_schema_metadata(schema_meta), tmp)
    os.replace(tmp, path)


def _vectors(emb: np.ndarray) -> pa.Array:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def clip_of(cfg: RunCfg) -> FrozenCLIP:
    """The run's frozen CLIP: model, weights, activation and image normalisation from ``cfg.model``."""
    return FrozenCLIP.from_cfg(cfg.model)


def text_tables(clip: FrozenCLIP, categories: dict[int, Category], variants_of: Callable[[Category], dict],
                batch_size: int, progress: bool) -> tuple[pa.Table, pa.Table]:
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


# ---------------------------------------------------------------- the image table (Ray Data)


@dataclass(frozen=True)
class ActorPlan:
    """The CLIP actor pool: where it runs, how many actors, the CPUs each holds, and the CPUs each read task
    of the shards holds."""

    device: str  # cpu or cuda
    actors: int
    cpus_per_actor: float  # 0 on cuda: a GPU actor holds its GPU only
    cpus_per_read: float = 1.0


def cpu_plan(cpus: float, actors: int | None = None) -> ActorPlan:
    """CPU actors on a cluster of ``cpus`` CPUs: one per CPU less one by default. The actors and one read task
    fit in the cluster together (a pool that leaves a read task no room waits forever): a CPU actor holds
    up to one CPU, and at least 0.1; the read tasks hold what the actors leave, up to one CPU."""
    n = actors or max(1, int(cpus) - 1)
    per = min(1.0, max(0.1, (cpus - 0.5) / n))
    read = min(1.0, round(cpus - n * per, 6))
    if read < 0.1:
        most = int(round((cpus - 0.1) / 0.1, 6))
        raise UsageError(f"--actors {n}: a cluster of {cpus:g} CPU{'s' if cpus != 1 else ''} holds at most {most} "
                         "CPU actors (0.1 CPU each, and 0.1 for the read tasks)")
    return ActorPlan("cpu", n, per, read)


def plan_actors(device: str | None = None, actors: int | None = None) -> ActorPlan:
    """Size the actor pool from the (initialised) Ray cluster's resources.

    ``device`` None is cuda when the cluster has GPUs, else cpu; cuda on a cluster without a GPU is refused
    in one line. On cuda, one actor per GPU; on CPUs, :func:`cpu_plan`.
    """
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    device = device or ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise UsageError("--device cuda: the Ray cluster has no GPU; use --device cpu (or leave --device out)")
    if device == "cuda":
        return ActorPlan("cuda", actors or gpus, 0.0)
    return cpu_plan(cpus, actors)


class ClipImageEmbedder:
    """Ray Data callable class: a batch of webdataset rows → their crops' CLIP image embeddings."""

    def __init__(self, run: dict[str, Any], device: str):
        from capenext.cli import offline
        from capenext.config import from_dict

        offline()
        cfg = from_dict(run)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = torch.device(device)
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


def image_table(index: ShardIndex, cfg: RunCfg, batch_size: int, plan: ActorPlan) -> pa.Table:
    """Ray Data: shards → actor pool of CLIP image towers → one table, sorted by annotation id."""
    import ray

    ds = ray.data.read_webdataset([str(p) for p in index.shard_paths], decoder=None, num_cpus=plan.cpus_per_read)
    ds = ds.map_batches(
        ClipImageEmbedder,
        fn_constructor_kwargs=dict(run=to_dict(cfg), device=plan.device),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=1 if plan.device == "cuda" else 0,
        num_cpus=plan.cpus_per_actor,  # with the read tasks', fits the cluster (cpu_plan)
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
