"""One image + keypoint names → points: ``Predictor(checkpoint).predict(image, names, class_name)``.

Text-only CAPE needs no support image: the support is the list of keypoint names (all taken as
visible), the class name and, optionally, a skeleton. The query is the image, cropped as the test
protocol crops it (the square box around ``bbox`` × ``cfg.data.bbox_scale``, warped to
``cfg.data.image_size``, no augmentation); without ``bbox`` the whole image is the box.

Embeddings come from the model's own frozen CLIP: the names raw (``_`` → space, as MP-100's keypoint
texts), the class as ``a photo of {name}``. For ablations with an image stream, the CLIP image
embedding is computed from the very crop the backbone sees: a ``model.image_embedding == "online"``
model does it inside its forward, and a ``"precomputed"`` model gets it computed here exactly as
``pipelines.embed`` does (the un-augmented crop through ``FrozenCLIP.encode_image``).

The prediction is the last decoder layer's points, mapped back to the original image's pixels. Without a box
the crop is padded around the image, and a point can land in that padding: it is returned clamped to the image
(pixel centres 0..W-1, 0..H-1) with ``inside_image: false`` (``true`` for a point on the image, whose
coordinates are left as predicted).
``score`` (:func:`window_mass`) is how much of the keypoint's similarity map agrees with the point:
the softmax of its map ``sim`` (h x w cells over the crop; the map the proposal generator's soft-argmax
reads, Sec. 3.3) summed over the 3 x 3 cells around the predicted point's cell. It lies in [0, 1]: near 1
when the map is one sharp peak at the point, ``9 / (h w)`` for a flat map; low means the map is spread
out or peaks elsewhere (the keypoint may be hidden, outside the box, or not in the image at all). It is
a ranking signal, not a calibrated probability of being correct.

:meth:`Predictor.predict_many` runs several :class:`Query` s through one forward (what a server's request
batching calls): every query is padded to the model's keypoint slots, as the data layer pads, so queries with
different keypoint counts share a batch; each gets the points :meth:`Predictor.predict` gives it alone (up to
float rounding). :meth:`Predictor.check_query` makes every check a query needs short of the model (a server
refuses a bad query with it before the query joins a batch), and :meth:`Predictor.predict_each` is
``predict_many`` that falls back to one query at a time when the batch fails, so that a query that still
fails gets its own error and the others their points.

Text embeddings are cached per text, keyed by ``(kind, text, CLIP identity)`` (kind ``"keypoint"`` or
``"class"``; :attr:`capenext.models.clip.FrozenCLIP.identity`), least recently used out past
:data:`TEXT_CACHE_SIZE` texts: no keypoint text can stand for a class, nor a text of one CLIP for another's.

Images from bytes are opened by PIL in the formats of :data:`IMAGE_FORMATS` only (PIL would otherwise try
every format it knows, EPS through Ghostscript included).

``Predictor(checkpoint, runtime="onnx", onnx_dir=DIR)`` computes with onnxruntime on CPU over the folder
``python -m jobs.export`` wrote from that checkpoint (:class:`capenext.export.OnnxModel`; its ``model.json``
sha256 must be the checkpoint's): the CLIP text and image towers and the pose network; the checkpoint still
gives the config, the checks and the tokenizer. ``runtime="torch"`` (default) is PyTorch, unchanged.

Weights load with ``weights_only=True`` (:func:`capenext.checkpoint.read_checkpoint`); it runs on CPU.
:meth:`Predictor.save_pretrained` / :meth:`Predictor.from_pretrained` keep a model as a folder of
``config.json`` (the config and meta) and ``model.safetensors`` (the trainable weights, no pickle at all).
Every bad input raises ``ValueError`` (or ``FileNotFoundError``) with one line naming what is wrong; the
rules for names, class, skeleton and box (and for reading them from text) live in :mod:`capenext.inputs`.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from capenext.checkpoint import FORMAT, load_model, load_weights, trainable_state_dict
from capenext.config import from_dict, to_dict
from capenext.data.dataset import adjacency
from capenext.data.transforms import IMAGE_FORMATS, Crop, crop
from capenext.engine import autocast, precision_of, to_image_pixels
from capenext.inputs import (check_bbox, check_class_name, check_names, check_skeleton, parse_bbox,  # noqa: F401
                             parse_names, parse_skeleton, short)
from capenext.options import RUNTIMES  # what computes: PyTorch, or onnxruntime on what jobs.export wrote
from capenext.viz import to_rgb

__all__ = ["IMAGE_FORMATS", "Predictor", "Query", "check_bbox", "check_names", "check_skeleton", "load_image",
           "parse_bbox", "parse_names", "parse_skeleton", "set_clip_precision", "window_mass"]

ImageLike = str | Path | bytes | Image.Image | np.ndarray
CONFIG_FILE = "config.json"  # save_pretrained's folder: config and meta ...
WEIGHTS_FILE = "model.safetensors"  # ... and the trainable weights
TEXT_CACHE_SIZE = 4096  # text embeddings a predictor keeps (least recently used out)


def load_image(image: ImageLike) -> np.ndarray:
    """A path, encoded file bytes, a PIL image or an (H, W[, 3|4]) uint8 array → (H, W, 3) uint8 RGB;
    one-line errors. A file and its bytes decode the same way."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        return _decode(path.read_bytes(), str(path))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), "image")
    if isinstance(image, (Image.Image, np.ndarray)):
        return to_rgb(image)
    raise ValueError(f"image must be a path, file bytes, a PIL image or an (H, W, 3) uint8 array, got "
                     f"{type(image).__name__}")


def _decode(data: bytes, where: str) -> np.ndarray:
    """Decoded as training and evaluation decode (:func:`capenext.data.transforms.decode_image`, the
    reference's OpenCV decode: EXIF orientation applied), after PIL has checked the file is complete
    (OpenCV before 5 decodes a truncated JPEG, grey where data is missing)."""
    from capenext.data.transforms import decode_image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            im.load()
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {where}: not an image file in a format we read "
                         f"({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise ValueError(f"cannot read image {where}: {' '.join(str(err).split())}") from None
    try:
        return decode_image(data, where)
    except ValueError as err:
        raise ValueError(f"cannot read image {where}: {str(err).removeprefix(f'cannot decode {where}: ')}") from None


def window_mass(sim: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The score: softmax(sim) mass in the 3x3 cells around each point's cell.

    Args:
        sim: (K, h, w) similarity logits; points: (K, 2) (x, y) in [0, 1] crop coordinates.
    Returns:
        (K,) in [0, 1]: 1 when the whole map's probability sits within one cell of the point, 9 / (h w)
        for a flat map.
    """
    k, h, w = sim.shape
    prob = sim.flatten(1).softmax(-1).view(k, 1, h, w)  # (K, 1, h, w)
    window = F.avg_pool2d(prob, 3, stride=1, padding=1, count_include_pad=True).view(k, h, w) * 9  # 3x3 sums
    col = (points[:, 0] * w).long().clamp(0, w - 1)  # (K,)
    row = (points[:, 1] * h).long().clamp(0, h - 1)
    return window[torch.arange(k), row, col].clamp(0, 1).cpu()


def set_clip_precision(model: torch.nn.Module, cfg, device: str | torch.device) -> bool:
    """Give ``model`` (a :class:`~capenext.models.CapeNext`) the frozen CLIP in the precision
    ``cfg.model.clip_precision`` names when it holds another (a checkpoint trained in fp32 run with the
    reference's fp16 CLIP, or back): the CLIP is rebuilt from ``cfg.model`` on ``device`` (open_clip's fp16
    build, as the reference's, not a cast). fp16 runs on CUDA only: one line when ``device`` is not CUDA.
    Returns whether the CLIP was replaced."""
    from capenext.models.clip import FrozenCLIP

    precision = cfg.model.clip_precision
    if precision == model.clip.precision:
        return False
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"model.clip_precision=fp16 runs on a CUDA device only (the reference's GPU setting), "
                         f"not on {device.type}: run on cuda, or use CLIP precision fp32")
    model.clip = FrozenCLIP.from_cfg(cfg.model).to(device)
    return True


@dataclass
class Query:
    """One prediction's inputs, as the arguments of :meth:`Predictor.predict` (see there)."""

    image: ImageLike
    names: Sequence[str]
    class_name: str | None = None
    skeleton: Sequence[Sequence[int]] | None = None
    bbox: Sequence[float] | None = None


def _json_safe(value: Any) -> Any:
    """``value`` with anything json cannot hold written as its ``str`` (checkpoint meta → config.json)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


class Predictor:
    """A trained checkpoint, ready to predict keypoints on any image from their names.

    Attributes:
        model: the :class:`~capenext.models.CapeNext` in eval mode; cfg: its ``RunCfg``; meta: the
        checkpoint's meta (``run_id``, test metrics ...); device.
    """

    def __init__(self, checkpoint: str | Path, clip_checkpoint: str | None = None,
                 device: str | torch.device = "cpu", *, runtime: str = "torch", onnx_dir: str | Path | None = None):
        """Load ``checkpoint`` (a capenext checkpoint file, ``weights_only=True``). ``clip_checkpoint``
        overrides where the frozen CLIP's weights are on this machine (default: the training config's).

        ``runtime="onnx"`` runs the folder ``onnx_dir`` that ``python -m jobs.export`` wrote from this very
        checkpoint (its ``model.json`` sha256 is checked) with onnxruntime on CPU: the pose network and both
        CLIP towers; the checkpoint still gives the config, the checks and the tokenizer."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}; valid: {list(RUNTIMES)}")
        if runtime == "onnx" and onnx_dir is None:
            raise ValueError("runtime='onnx' needs onnx_dir (a folder written by python -m jobs.export)")
        if runtime == "onnx" and torch.device(device).type != "cpu":
            raise ValueError(f"runtime='onnx' runs on CPU (onnxruntime), not on {torch.device(device).type}")
        self.device = torch.device(device)
        try:
            model, cfg, meta = load_model(checkpoint, clip_checkpoint, self.device)
        except KeyError as err:  # an unregistered ablation, backbone or CLIP model in the config
            msg = err.args[0] if err.args else err
            raise ValueError(f"{checkpoint}: checkpoint of an unknown config ({msg})") from None
        self._attach(model, cfg, meta)
        if runtime == "onnx":
            self.onnx = _onnx_model(onnx_dir, checkpoint)

    def _attach(self, model: torch.nn.Module, cfg, meta: dict[str, Any]) -> None:
        self.model, self.cfg, self.meta = model, cfg, meta
        self.slots = self.cfg.data.max_keypoints
        self.image_size = self.cfg.data.image_size
        self._text_cache: OrderedDict[tuple[str, str, tuple], torch.Tensor] = OrderedDict()
        self.onnx = None  # an OnnxModel when runtime="onnx"

    @property
    def runtime(self) -> str:
        """``"onnx"`` when the exported files compute, else ``"torch"``."""
        return "torch" if self.onnx is None else "onnx"

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``directory/config.json`` (format, config, meta) and ``directory/model.safetensors`` (the
        weights without the frozen CLIP, as a checkpoint file holds them); returns the folder."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # contiguous copies: safetensors refuses views and tensors that share memory
        state = {k: v.contiguous().clone() for k, v in trainable_state_dict(self.model).items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
        record = {"format": FORMAT, "config": to_dict(self.cfg), "meta": _json_safe(self.meta)}
        (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, clip_checkpoint: str | None = None,
                        device: str | torch.device = "cpu") -> "Predictor":
        """The predictor :meth:`save_pretrained` wrote to ``directory``; ``clip_checkpoint`` as in
        :meth:`__init__`. Reading it runs no pickle; one-line errors for a missing or foreign folder."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from capenext.models import build_model

        folder = Path(directory)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{folder}: no {path.name} (expected the {CONFIG_FILE} and "
                                        f"{WEIGHTS_FILE} that Predictor.save_pretrained writes)")
        try:
            record = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_path}: not valid json ({err})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{config_path}: not a capenext model (expected format {FORMAT!r})")
        try:
            cfg = from_dict(record["config"])
        except (KeyError, TypeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ValueError(f"{config_path}: checkpoint of an unknown config ({msg})") from None
        try:
            state = load_file(str(weights_path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights_path}: not readable safetensors ({' '.join(str(err).split())[:200]})") \
                from None
        if clip_checkpoint is not None:
            cfg.model.clip_checkpoint = clip_checkpoint
        cfg.model.backbone_checkpoint = None  # the weights carry the trained backbone
        try:
            model = build_model(cfg.model)
        except KeyError as err:
            msg = err.args[0] if err.args else err
            raise ValueError(f"{config_path}: checkpoint of an unknown config ({msg})") from None
        load_weights(model, state, str(weights_path))
        self = cls.__new__(cls)
        self.device = torch.device(device)
        self._attach(model.to(self.device).eval(), cfg, dict(record.get("meta") or {}))
        return self

    def text_embeddings(self, kind: str, texts: Sequence[str]) -> torch.Tensor:
        """(T, C) embeddings of keypoint texts (``kind="keypoint"``, raw) or class names (``kind="class"``,
        as ``a photo of {name}``), through the cache keyed by ``(kind, text, CLIP identity)``."""
        if kind not in ("keypoint", "class"):
            raise ValueError(f"kind {kind!r}: 'keypoint' or 'class'")
        clip = self.model.clip
        identity = clip.identity
        keys = [(kind, str(t), identity) for t in texts]
        missing = list(dict.fromkeys(k[1] for k in keys if k not in self._text_cache))
        if missing:
            if self.onnx is not None:  # the text tower of the export, on the same token ids
                from capenext.models.clip import class_prompt

                prompts = missing if kind == "keypoint" else [class_prompt(t) for t in missing]
                emb = torch.from_numpy(self.onnx.encode_text(clip.tokenize(prompts).numpy()))  # (M, C)
            else:
                emb = clip.encode_text(missing) if kind == "keypoint" else clip.encode_class(missing)  # (M, C)
            for text, row in zip(missing, emb):
                self._text_cache[(kind, text, identity)] = row.clone()  # not a view keeping the batch alive
        out = []
        for key in keys:
            self._text_cache.move_to_end(key)
            out.append(self._text_cache[key])
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return torch.stack(out) if out else torch.zeros(0, clip.embed_dim, device=clip.device)

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text_embeddings("keypoint", texts)  # (K, C)

    def _encode_class(self, name: str) -> torch.Tensor:
        return self.text_embeddings("class", [name])  # (1, C)

    def check_query(self, query: Query, names_field: str = "keypoint name", class_field: str = "class prompt"
                    ) -> Query:
        """Every check :meth:`predict` makes before the model runs, without running it: names (count,
        length, characters), skeleton, class, the image (decoded here) and the box against it, and each
        text's CLIP token count (tokenizing, no model). Returns the query as checked: the image as an
        (H, W, 3) uint8 array, the class stripped (``None`` when absent), the skeleton as index pairs, the box
        as given (``None``: the whole image). One-line ``ValueError`` for the first problem (a token count names
        ``names_field`` and the name's index, or ``class_field``)."""
        texts = check_names(query.names, self.slots)
        edges = check_skeleton(query.skeleton, len(texts))
        rgb = load_image(query.image)
        check_bbox(query.bbox, rgb.shape[1], rgb.shape[0])
        class_name = check_class_name(query.class_name, self.model.needs_class_embedding, self.cfg.model.ablation,
                                      f"pass class_name (e.g. 'cat'), got {short(query.class_name)}")
        from capenext.models.clip import class_prompt

        self.model.clip.check_texts(texts, names_field + " {i}")
        if class_name is not None and self.model.needs_class_embedding:
            self.model.clip.check_texts([class_prompt(class_name)], class_field)
        bbox = None if query.bbox is None else tuple(float(v) for v in query.bbox)
        return Query(rgb, list(query.names), class_name, edges, bbox)

    def crop(self, image: np.ndarray, bbox: tuple[float, float, float, float]) -> Crop:
        """The un-augmented test crop around ``bbox`` (what the backbone and the CLIP image tower see)."""
        return crop(image, bbox, self.image_size, self.cfg.data.bbox_scale)

    def batch(self, image: ImageLike, names: Sequence[str], class_name: str | None,
              skeleton: Sequence[Sequence[int]] | None = None,
              bbox: Sequence[float] | None = None, *,
              image_embedding: bool = True) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """The model's input batch (B = 1, see :class:`~capenext.models.CapeNext`) and the (2, 3) inverse
        crop; every argument is checked as in :meth:`predict`. ``image_embedding=False`` leaves a
        precomputed-image-embedding model's ``img_emb`` for the caller to compute (over a whole batch)."""
        batch, inverse, _ = self._prepare(image, names, class_name, skeleton, bbox, image_embedding)
        return batch, inverse

    def _prepare(self, image: ImageLike, names: Sequence[str], class_name: str | None,
                 skeleton: Sequence[Sequence[int]] | None, bbox: Sequence[float] | None,
                 image_embedding: bool) -> tuple[dict[str, torch.Tensor], np.ndarray, tuple[int, int]]:
        """:meth:`batch`, and the image's (width, height)."""
        texts = check_names(names, self.slots)
        edges = check_skeleton(skeleton, len(texts))
        rgb = load_image(image)
        box = check_bbox(bbox, rgb.shape[1], rgb.shape[0])
        check_class_name(class_name, self.model.needs_class_embedding, self.cfg.model.ablation,
                         f"pass class_name (e.g. 'cat'), got {class_name!r}")
        k, dev = len(texts), self.device
        c = self.crop(rgb, box)
        img = torch.from_numpy(c.image).unsqueeze(0).to(dev)  # (1, 3, S, S)
        emb = self._encode_text(texts)  # (k, C)
        kp_emb = torch.zeros(1, self.slots, emb.shape[-1], device=dev)
        kp_emb[0, :k] = emb  # (1, K, C), zero in padded slots
        kp_mask = torch.zeros(1, self.slots, dtype=torch.bool, device=dev)
        kp_mask[0, :k] = True  # text-only support: every named keypoint is visible
        batch = {"img": img, "kp_emb": kp_emb, "kp_mask": kp_mask,
                 "adj": torch.from_numpy(adjacency(tuple(edges), self.slots)).unsqueeze(0).to(dev)}  # (1, K, K)
        if self.model.needs_class_embedding:
            batch["cls_emb"] = self._encode_class(class_name)  # (1, C)
        if image_embedding and self.model.needs_image_embedding and self.model.image_embedding == "precomputed":
            batch["img_emb"] = self._encode_image(img)  # (1, C), as pipelines.embed
        return batch, c.inverse, (int(rgb.shape[1]), int(rgb.shape[0]))

    def _encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C) CLIP image embeddings of the crops: the frozen CLIP's, or the export's image tower."""
        if self.onnx is not None:
            return torch.from_numpy(self.onnx.encode_image(img.cpu().numpy()))
        return self.model.clip.encode_image(img)

    def _run(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's outputs on ``batch`` (``points`` and ``sim`` at least): PyTorch's, or onnxruntime's."""
        if self.onnx is not None:
            out = self.onnx.pose({k: v.cpu().numpy() for k, v in batch.items()})
            return {k: torch.from_numpy(v) for k, v in out.items()}
        with autocast(self.device, precision_of(self.model)):
            return self.model(batch)

    @torch.no_grad()
    def predict(self, image: ImageLike, names: Sequence[str], class_name: str | None = None,
                skeleton: Sequence[Sequence[int]] | None = None,
                bbox: Sequence[float] | None = None) -> list[dict[str, Any]]:
        """Keypoints of ``names`` on ``image``.

        Args:
            image: a path, a PIL image or an (H, W, 3) uint8 RGB array.
            names: 1..100 keypoint names or descriptions ("nose", "left eye", ...).
            class_name: the object's category ("cat", "office chair"); required when the model reads a
                class embedding (every ablation but ``baseline`` and ``img_only``).
            skeleton: optional 0-based ``(a, b)`` index pairs into ``names`` (the graph decoder's edges).
            bbox: optional ``(x, y, w, h)`` box around the object in image pixels, inside the image;
                default the whole image.
        Returns:
            one ``{"name", "x", "y", "score", "inside_image"}`` per name, in order: ``x, y`` in original image
            pixels, ``score`` in [0, 1] (the module docstring says what it means); a point predicted off the
            image (in the crop's padding) is clamped to it, with ``inside_image`` false.
        """
        batch, inverse, size = self._prepare(image, names, class_name, skeleton, bbox, True)
        k = int(batch["kp_mask"].sum())
        out = self._run(batch)
        pts01 = out["points"][-1][:, :k].float()  # (1, k, 2) in [0, 1] crop coordinates
        inv = torch.from_numpy(inverse.astype(np.float32)).unsqueeze(0).to(pts01.device)  # (1, 2, 3)
        xy = to_image_pixels(pts01, inv, self.image_size)[0].cpu()  # (k, 2) image pixels
        score = window_mass(out["sim"][0, :k].float(), pts01[0])  # (k,)
        return _points(names, xy, score, size)

    @torch.no_grad()
    def predict_many(self, queries: Sequence[Query]) -> list[list[dict[str, Any]]]:
        """:meth:`predict` for several queries in one forward of the model (and of CLIP's image tower).

        Every query is checked as in :meth:`predict` (a ``ValueError`` names the query's index); each is
        padded to the model's ``slots`` keypoints, so keypoint counts may differ within the batch.
        Returns one :meth:`predict` result per query, in order.
        """
        if not queries:
            return []
        inputs, inverses, sizes = [], [], []
        for i, q in enumerate(queries):
            try:
                batch, inverse, size = self._prepare(q.image, q.names, q.class_name, q.skeleton, q.bbox, False)
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"query {i}: {err}") from None
            inputs.append(batch)
            inverses.append(inverse)
            sizes.append(size)
        batch = {key: torch.cat([b[key] for b in inputs]) for key in inputs[0]}  # (B, ...)
        if self.model.needs_image_embedding and self.model.image_embedding == "precomputed":
            batch["img_emb"] = self._encode_image(batch["img"])  # (B, C), as pipelines.embed
        out = self._run(batch)
        inv = torch.from_numpy(np.stack(inverses).astype(np.float32)).to(self.device)  # (B, 2, 3)
        pts01 = out["points"][-1].float()  # (B, K, 2) in [0, 1] crop coordinates
        xy = to_image_pixels(pts01, inv, self.image_size).cpu()  # (B, K, 2) image pixels
        results = []
        for i, q in enumerate(queries):
            k = int(batch["kp_mask"][i].sum())
            score = window_mass(out["sim"][i, :k].float(), pts01[i, :k])  # (k,)
            results.append(_points(q.names, xy[i, :k], score, sizes[i]))
        return results

    def predict_each(self, queries: Sequence[Query]) -> list[list[dict[str, Any]] | Exception]:
        """:meth:`predict_many`, isolating failures: one forward for every query; if that raises, each query
        alone. Returns, per query in order, its points or the exception it raised alone (``ValueError``s
        without the ``query i:`` prefix), so that one bad query never costs the others their answer."""
        try:
            return list(self.predict_many(queries))
        except Exception as err:  # noqa: BLE001 -- which query failed is found below, one at a time
            if len(queries) == 1:
                return [_as_answer(err)]
        out: list[list[dict[str, Any]] | Exception] = []
        for q in queries:
            try:
                out.append(self.predict_many([q])[0])
            except Exception as err:  # noqa: BLE001 -- returned to the caller, as this query's answer
                out.append(_as_answer(err))
        return out


def _onnx_model(onnx_dir: str | Path, checkpoint: str | Path):
    """The export folder ``onnx_dir`` loaded for onnxruntime, checked to come from ``checkpoint``."""
    try:
        import onnxruntime  # noqa: F401

        from capenext.export import OnnxModel
    except ImportError as err:
        raise ValueError(f"runtime='onnx' needs onnxruntime ({err.name} is missing): "
                         "pip install 'capenext[onnx]'") from None
    from capenext.files import file_sha256

    return OnnxModel(onnx_dir, checkpoint_sha256=file_sha256(checkpoint))


def _as_answer(err: Exception) -> Exception:
    """A query's own error: a ``ValueError`` (``FileNotFoundError``) without predict_many's ``query 0:``."""
    if isinstance(err, (ValueError, FileNotFoundError)):
        return type(err)(str(err).removeprefix("query 0: "))
    return err


def _points(names: Sequence[str], xy: torch.Tensor, score: torch.Tensor, size: tuple[int, int]
            ) -> list[dict[str, Any]]:
    """One ``{"name", "x", "y", "score", "inside_image"}`` per name: a point off the image (beyond the
    outer pixels' extent, half a pixel past their centres) is clamped to the pixel centres 0..W-1, 0..H-1
    and flagged; a point on the image keeps its coordinates."""
    w, h = size
    out = []
    for n, p, s in zip(names, xy, score):
        x, y = float(p[0]), float(p[1])
        inside = -0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5
        if not inside:
            x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
        out.append({"name": str(n), "x": x, "y": y, "score": float(s), "inside_image": bool(inside)})
    return out
