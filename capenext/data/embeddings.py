"""The embedding tables of ``pipelines.embed``: their schema, their metadata, their reader, and the check
that a run reads the tables its config asks for.

A folder holds three parquet tables and ``embeddings.json``::

    images.parquet     key, ann_id, category_id, embedding   (the query crop; one row per shard sample)
    classes.parquet    category_id, prompt, embedding        ("a photo of {name}")
    keypoints.parquet  category_id, keypoint_index, text, variant, embedding
                       (variant "clean", "typo@R", "template:NAME", ...)

Every embedding is an L2-normalised float32 CLIP vector. ``embeddings.json`` (also stored in each table's
schema metadata) records every setting that changes a table's numbers: the :data:`FIELDS` below, the
shard manifest's digest, and the noisy variants' rates, maps and seed. :func:`expected_metadata` computes
those fields from a :class:`~capenext.config.RunCfg`, :func:`check_tables` refuses a mismatch with one line
naming the field, both values and the command that remakes the tables; a field added to :data:`FIELDS`
is written by the embedding job and checked by every job that reads tables, with no change to either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from capenext.config import RunCfg
from capenext.files import file_sha256

META_FILE = "embeddings.json"
TABLES = ("images.parquet", "classes.parquet", "keypoints.parquet")


def checkpoint_id(checkpoint: str | None) -> str:
    """``random`` or the sha256 of the local CLIP checkpoint file."""
    if checkpoint is None or checkpoint == "random":
        return "random"
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--clip-checkpoint {checkpoint}: no such file (or use 'random')")
    return file_sha256(checkpoint)


def text_source(descriptions: str | None, variant: str = "regular") -> str:
    """Where the keypoint texts come from: ``annotations`` (the category's names), or a description file:
    ``descriptions:<sha256>`` for a name → texts map, ``descriptions:<sha256>:<variant>`` for the
    reference's rules (:func:`capenext.data.mp100.load_descriptions`)."""
    from capenext.data.mp100 import load_descriptions

    if descriptions is None:
        return "annotations"
    if not Path(descriptions).is_file():
        raise FileNotFoundError(f"--descriptions {descriptions}: no such file")
    return load_descriptions(descriptions, variant).source_id


@dataclass(frozen=True)
class Field:
    """One recorded setting: its name in ``embeddings.json``, the tables it changes (``"text"``,
    ``"image"`` or both), how a config gives its value, and the option that sets it."""

    name: str
    tables: tuple[str, ...]
    of: Callable[[RunCfg], Any]
    option: str
    absent: Any = None  # the value of tables written before the field existed (None: there were none)


FIELDS: tuple[Field, ...] = (
    Field("clip_model", ("text", "image"), lambda c: c.model.clip_model, "--clip-model"),
    Field("clip_checkpoint_sha256", ("text", "image"), lambda c: checkpoint_id(c.model.clip_checkpoint),
          "--clip-checkpoint"),
    Field("clip_quick_gelu", ("text", "image"), lambda c: c.model.clip_quick_gelu,
          "--set model.clip_quick_gelu"),
    Field("clip_image_norm", ("image",), lambda c: c.model.clip_image_norm, "--set model.clip_image_norm"),
    Field("image_size", ("image",), lambda c: c.data.image_size, "--set data.image_size"),
    Field("bbox_scale", ("image",), lambda c: c.data.bbox_scale, "--set data.bbox_scale"),
    Field("keypoint_texts", ("text",), lambda c: text_source(c.data.descriptions, c.data.text_variant),
          "--descriptions/--text-variant"),
    Field("clip_precision", ("text", "image"), lambda c: c.model.clip_precision, "--set model.clip_precision"),
    Field("text_encoder", ("text",), lambda c: text_encoder_id(c.model.text_encoder), "--set model.text_encoder",
          absent="clip"),
)


def text_encoder_id(name: str) -> str:
    """``clip``, or a packaged prior's identity (name, package version, weights digest)."""
    from capenext.models.text_prior import check_text_encoder, load_text_prior

    return name if check_text_encoder(name) == "clip" else load_text_prior(name).identity


def needs_image_table(cfg: RunCfg) -> bool:
    """Whether a run reads the image-embedding table (an image stream with precomputed embeddings)."""
    from capenext.models import get_ablation

    return "img" in get_ablation(cfg.model.ablation).streams and cfg.model.image_embedding == "precomputed"


def expected_metadata(cfg: RunCfg, images: bool = True) -> dict[str, Any]:
    """The value of every field a run with ``cfg`` needs; image-only fields only when it reads images."""
    return {f.name: f.of(cfg) for f in FIELDS if images or f.tables != ("image",)}


def read_metadata(embeddings: str | Path) -> dict[str, Any]:
    path = Path(embeddings) / META_FILE
    if not path.is_file() or not all((Path(embeddings) / t).is_file() for t in TABLES):
        raise FileNotFoundError(f"no embeddings in {embeddings}: run python -m pipelines.embed --out {embeddings}")
    return json.loads(path.read_text())


def check_tables(embeddings: str | Path, cfg: RunCfg, manifest_digest: str, images: bool = True,
                 remake: str | None = None) -> dict[str, Any]:
    """Refuse tables made with other settings than ``cfg`` or from other shards; return their metadata.

    ``remake`` is the command that makes the right tables (shown in the error)."""
    meta = read_metadata(embeddings)
    expected = {"manifest_digest": manifest_digest, **expected_metadata(cfg, images)}
    options = {f.name: f.option for f in FIELDS} | {"manifest_digest": "--shards"}
    absent = {f.name: f.absent for f in FIELDS}
    hint = remake or f"python -m pipelines.embed --shards SHARDS --out {embeddings} with this run's --config/--set"
    for key, want in expected.items():
        have = meta.get(key, absent.get(key))
        if have != want:
            raise ValueError(f"embeddings in {embeddings} were made with {key}={have!r}, this run uses "
                             f"{want!r} ({options[key]}): remake them with {hint}")
    return meta


@dataclass
class EmbeddingBank:
    """Frozen CLIP embeddings looked up by id: keypoint texts and class prompt by category, images by
    annotation id. Every vector is L2-normalised; ``keypoints[c]`` is (K_c, C)."""

    keypoints: dict[int, torch.Tensor]
    classes: dict[int, torch.Tensor] = field(default_factory=dict)
    images: dict[int, torch.Tensor] = field(default_factory=dict)

    def fill(self, batch: dict[str, torch.Tensor], slots: int, image_embedding: bool, class_embedding: bool,
             ) -> dict[str, torch.Tensor]:
        """Add ``kp_emb`` (B, slots, C), zero where the support keypoint is invisible or padded, and,
        when asked, ``cls_emb`` / ``img_emb`` (B, C)."""
        cats = batch["category_id"].tolist()
        first = self.keypoints[cats[0]]
        kp = torch.zeros(len(cats), slots, first.shape[-1], dtype=first.dtype)
        for i, c in enumerate(cats):
            table = self.keypoints[c]
            kp[i, : len(table)] = table
        batch["kp_emb"] = kp * batch["kp_mask"].unsqueeze(-1).to(kp.dtype)  # (B, slots, C)
        if class_embedding:
            batch["cls_emb"] = torch.stack([self.classes[c] for c in cats])  # (B, C)
        if image_embedding:
            try:
                batch["img_emb"] = torch.stack([self.images[a] for a in batch["ann_id"].tolist()])
            except KeyError as err:
                raise KeyError(f"no precomputed image embedding for annotation {err.args[0]}") from None
        return batch


def _vectors_of(table) -> torch.Tensor:
    col = table.column("embedding").combine_chunks()
    return torch.from_numpy(col.values.to_numpy().reshape(len(col), -1).copy())


def keypoint_variants_in(embeddings: str | Path) -> list[str]:
    """The keypoint-text variants the tables hold (``clean``, ``typo@0.1``, ...)."""
    import pyarrow.parquet as pq

    col = pq.read_table(Path(embeddings) / "keypoints.parquet", columns=["variant"]).column("variant")
    return sorted(set(col.to_pylist()))


def load_bank(embeddings: str | Path, variant: str = "clean", images: bool = True) -> EmbeddingBank:
    """The tables as an :class:`EmbeddingBank`; ``images=False`` skips the image table (ablations that
    use no image embedding read none)."""
    import pyarrow.parquet as pq

    embeddings = Path(embeddings)
    read_metadata(embeddings)
    kp = pq.read_table(embeddings / "keypoints.parquet", filters=[("variant", "=", variant)])
    if kp.num_rows == 0:
        raise KeyError(f"keypoint variant {variant!r} not in {embeddings}; available: "
                       f"{keypoint_variants_in(embeddings)}")
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


class EmbeddingSource:
    """Keypoint and class embeddings for a noise variant (:class:`capenext.noise.Variant`): from the
    tables when they hold it, else encoded here with the model's own frozen CLIP (the same texts through
    the same encoder, so the numbers agree either way). ``tables`` ``None``: everything is encoded here."""

    def __init__(self, model, index, tables: str | Path | None, meta: dict[str, Any] | None, seed: int,
                 images: bool):
        self.model, self.index, self.tables, self.meta, self.seed = model, index, tables, meta or {}, seed
        self.base = load_bank(tables, "clean", images=images) if tables is not None else None
        self.class_ids = {c.name: c.id for c in index.categories.values()}

    def in_tables(self, v) -> bool:
        from capenext.noise import get_noise

        return self.tables is not None and get_noise(v.noise).in_tables(v, self.meta, self.seed)

    def texts(self, v, cat) -> list[str]:
        """The variant's keypoint texts of a category (whole-category kinds start from its annotation names)."""
        return v.texts_of(cat, self.index.annotation_categories.get(cat.id))

    def keypoints(self, v, categories) -> tuple[dict[int, torch.Tensor], str]:
        """category id → (K, C) keypoint embeddings of the variant; and where they came from."""
        from capenext.noise import get_noise

        if self.in_tables(v):
            table = self.base.keypoints if get_noise(v.noise).changes != "keypoints" else load_bank(
                self.tables, v.name, images=False).keypoints
            return {c.id: table[c.id] for c in categories}, "tables"
        texts = [(c.id, self.texts(v, c)) for c in categories]
        flat = [t for _, ts in texts for t in ts]
        emb = self.model.clip.encode_text(flat).cpu()  # (sum K, C)
        out, i = {}, 0
        for cid, ts in texts:
            out[cid] = emb[i: i + len(ts)]
            i += len(ts)
        return out, "in-process"

    def classes(self, names: dict[int, str]) -> dict[int, torch.Tensor]:
        """category id → (C,) embedding of ``a photo of {names[id]}`` (the table's row of the category of
        that name when there are tables)."""
        out = {}
        for cid, name in names.items():
            known = self.class_ids.get(name)
            if self.base is not None and known in self.base.classes:
                out[cid] = self.base.classes[known]
            else:
                out[cid] = self.model.clip.encode_class([name])[0].cpu()
        return out

    def bank(self, v, categories, names: dict[int, str]) -> tuple[EmbeddingBank, str]:
        """The :class:`EmbeddingBank` of a variant over ``categories`` with class prompts of ``names``."""
        kp, source = self.keypoints(v, categories)
        images = self.base.images if self.base is not None else {}
        return EmbeddingBank(keypoints=kp, classes=self.classes(names), images=images), source
