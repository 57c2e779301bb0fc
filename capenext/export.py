"""A deployable model: the pose network and the frozen CLIP's towers as ONNX, verified against PyTorch.

:func:`export` writes three ONNX files and a ``model.json`` into one folder:

* ``pose.onnx``: backbone, HCMI/DSFR, joint projection, encoder, proposal generator and graph decoder
  (:class:`~capenext.models.CapeNext`), inputs (B dynamic, K = the model's 100 padded slots, C = CLIP width,
  S = crop side)::

      img (B, 3, S, S) float32, the ImageNet-normalised crop
      kp_emb (B, K, C) float32, L2-normalised keypoint text embeddings, zero in padded slots
      kp_mask (B, K) bool, True for the keypoints given (the keypoint count is carried by the mask)
      adj (B, K, K) float32, 0/1 skeleton adjacency
      cls_emb (B, C) float32, only for ablations with a class stream
      img_emb (B, C) float32, only for ablations with an image stream (``clip_image.onnx``'s output)

  and outputs ``points`` (L, B, K, 2), each decoder layer's points in [0, 1] crop coordinates (the last is
  the prediction), and ``sim`` (B, K, h, w), the similarity maps;
* ``clip_image.onnx``: ``img`` (B, 3, S, S), the same ImageNet-normalised crop → ``img_emb`` (B, C)
  L2-normalised (CLIP's own normalisation and the resize to CLIP's input size are inside);
* ``clip_text.onnx``: ``tokens`` (T, 77) int64 token ids of the tokenizer ``model.json`` names →
  ``text_emb`` (T, C) L2-normalised (keypoint texts raw, the class as ``a photo of {name}``).

Every slot is computed (PyTorch's forward skips slots after the last valid one, :attr:`CapeNext.trim_slots`;
the graph cannot branch on data): the valid slots' points are the same up to float rounding.

Before anything reaches the output folder, onnxruntime (CPU) runs each file on the inputs PyTorch ran and
:func:`export` refuses a file whose outputs differ by more than ``1e-4 x max |output|``. The files are written
into a temporary folder beside the output and renamed at the end, so the folder is never half-written.
The legacy TorchScript exporter (``dynamo=False``) is used: it needs no ``onnxscript``.

:class:`OnnxModel` runs such a folder with onnxruntime on CPU (what ``Predictor(runtime="onnx")`` uses).
torch, onnx and onnxruntime are imported only where used.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_OPSET", "META_FILE", "TOLERANCE", "OnnxModel", "export", "read_meta"]

DEFAULT_OPSET = 17  # LayerNormalization is native from 17
TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| allowed, relative to the output's max |value|
META_FILE = "model.json"
FILES = {"pose": "pose.onnx", "clip_image": "clip_image.onnx", "clip_text": "clip_text.onnx"}
FORMAT = "capenext-onnx-1"


def _short(err: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:limit].rstrip(" .")


def _modules(model):
    """The three exported parts of ``model`` as torch modules, and the pose network's input names."""
    import torch.nn.functional as F
    from torch import nn

    emb_names = [n for n, used in (("cls_emb", model.needs_class_embedding),
                                   ("img_emb", model.needs_image_embedding)) if used]

    class Pose(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, img, kp_emb, kp_mask, adj, *emb):
            batch = {"kp_emb": kp_emb, "kp_mask": kp_mask, "adj": adj, **dict(zip(emb_names, emb))}
            image = {"feat": self.model.backbone(img)}  # (B, d, h, w)
            if "img_emb" in batch:  # read from image[...] by an "online" model, from batch[...] otherwise
                image["img_emb"] = batch["img_emb"]
            out = self.model.head(image, batch)
            return out["points"], out["sim"]

    class ImageTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model.clip

        def forward(self, img):
            return self.clip.encode_image(img)  # (B, C)

    class TextTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model.clip

        def forward(self, tokens):
            return F.normalize(self.clip.model.encode_text(tokens).float(), dim=-1)  # (T, C)

    return Pose().eval(), ImageTower().eval(), TextTower().eval(), ["img", "kp_emb", "kp_mask", "adj", *emb_names]


def _example_inputs(model, cfg, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Inputs for each part: two samples with different keypoint counts (B = 2), real token ids."""
    import torch

    from capenext.models.clip import class_prompt

    g = torch.Generator().manual_seed(seed)
    b, k, s, c = 2, cfg.data.max_keypoints, cfg.data.image_size, model.clip.embed_dim
    counts = (5, min(17, k))
    img = torch.randn(b, 3, s, s, generator=g)
    kp_emb = torch.zeros(b, k, c)
    kp_mask = torch.zeros(b, k, dtype=torch.bool)
    adj = torch.zeros(b, k, k)
    for i, n in enumerate(counts):
        kp_emb[i, :n] = torch.nn.functional.normalize(torch.randn(n, c, generator=g), dim=-1)
        kp_mask[i, :n] = True
        for a in range(n - 1):
            adj[i, a, a + 1] = 1.0
    emb = torch.nn.functional.normalize(torch.randn(b, c, generator=g), dim=-1)
    pose = {"img": img, "kp_emb": kp_emb, "kp_mask": kp_mask, "adj": adj}
    if model.needs_class_embedding:
        pose["cls_emb"] = emb
    if model.needs_image_embedding:
        pose["img_emb"] = model.clip.encode_image(img)
    tokens = model.clip.tokenize(["left eye", "right front paw", class_prompt("office_chair")])
    return {"pose": pose, "clip_image": {"img": img}, "clip_text": {"tokens": tokens}}


def _torch_export(module, inputs: dict[str, Any], outputs: list[str], dynamic: dict[str, dict[int, str]],
                  path: Path, opset: int) -> None:
    import warnings

    import torch

    _register_symbolics()
    with warnings.catch_warnings(), torch.no_grad(), _no_fastpath(), _quiet_fds():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=outputs, dynamic_axes=dynamic, opset_version=opset, dynamo=False,
                          do_constant_folding=True)


def _register_symbolics() -> None:
    """ONNX forms for the aten ops our model uses that the legacy exporter lacks: ``diag_embed`` of a (B, K)
    matrix (graph_decoder's self kernel) as ``x[..., None] * EyeLike``."""
    import torch
    from torch.onnx import symbolic_helper as sh

    def diag_embed(g, x, offset, dim1, dim2):
        if (sh._maybe_get_const(offset, "i"), sh._maybe_get_const(dim1, "i"), sh._maybe_get_const(dim2, "i")) \
                != (0, -2, -1):
            return sh._unimplemented("diag_embed", "only offset=0, dim1=-2, dim2=-1", x)
        k = g.op("Gather", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([-1])), axis_i=0)  # [K]
        zeros = g.op("ConstantOfShape", g.op("Concat", k, k, axis_i=0),
                     value_t=torch.tensor([0.0], dtype=torch.float32))  # (K, K)
        return g.op("Mul", sh._unsqueeze_helper(g, x, [-1]), g.op("EyeLike", zeros))  # (..., K, K)

    torch.onnx.register_custom_op_symbolic("aten::diag_embed", diag_embed, 9)


@contextmanager
def _no_fastpath():
    """nn.MultiheadAttention without its fused inference kernel, which has no ONNX form."""
    import torch

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextmanager
def _quiet_fds():
    """stdout and stderr (the file descriptors) to nowhere: the legacy exporter prints its whole graph on
    failure, whatever its logging setting (torch's ``setup_onnx_logging`` tests a function for truth)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _compare(path: Path, inputs: dict[str, Any], expected: list[np.ndarray], outputs: list[str]
             ) -> dict[str, tuple[float, float]]:
    """Run ``path`` with onnxruntime (CPU) on ``inputs``: ``{output: (max |Δ|, max |value|)}``; ValueError over
    tolerance."""
    session = _session(path)
    got = session.run(outputs, {n: v.numpy() for n, v in inputs.items()})
    deltas = {}
    for name, ref, out in zip(outputs, expected, got):
        if out.shape != ref.shape:
            raise ValueError(f"{path.name}: onnxruntime gives {name} of shape {list(out.shape)}, PyTorch "
                             f"{list(ref.shape)}")
        delta = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        if not np.isfinite(delta) or delta > TOLERANCE * max(scale, 1e-12):
            raise ValueError(f"{path.name}: onnxruntime differs from PyTorch on {name} by max |Δ| {delta:.3g} "
                             f"(max |value| {scale:.3g}, allowed {TOLERANCE:g} x that); not written")
        deltas[name] = (delta, scale)
    return deltas


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    opts.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 -- onnxruntime's own exception types, one line
        raise ValueError(f"{path.name}: onnxruntime cannot load it ({_short(err)})") from None


def _fp32_clip(model, cfg) -> None:
    """The CLIP in fp32 (the exported files run on CPU): an fp16 CLIP is rebuilt, not cast."""
    from capenext.models.clip import FrozenCLIP

    if model.clip.precision != "fp32":
        cfg.model.clip_precision = "fp32"
        model.clip = FrozenCLIP.from_cfg(cfg.model)


def _export_parts(model, cfg, tmp: Path, opset: int, log) -> dict[str, dict[str, tuple[float, float]]]:
    """Export and verify the three parts into ``tmp``; ``{part: {output: (max |Δ|, max |value|)}}``."""
    import torch

    pose, image_tower, text_tower, pose_inputs = _modules(model)
    ex = _example_inputs(model, cfg)
    parts = {
        "pose": (pose, ["points", "sim"], {**{n: {0: "batch"} for n in pose_inputs},
                                           "points": {1: "batch"}, "sim": {0: "batch"}}),
        "clip_image": (image_tower, ["img_emb"], {"img": {0: "batch"}, "img_emb": {0: "batch"}}),
        "clip_text": (text_tower, ["text_emb"], {"tokens": {0: "texts"}, "text_emb": {0: "texts"}}),
    }
    where = f"ablation {cfg.model.ablation!r}, backbone {cfg.model.backbone!r}"
    deltas = {}
    for part, (module, outputs, dynamic) in parts.items():
        inputs = ex[part]
        with torch.no_grad(), _no_fastpath():
            expected = module(*inputs.values())  # as the exported graph computes it
        expected = [t.detach().float().numpy().astype(np.float64)
                    for t in (expected if isinstance(expected, tuple) else (expected,))]
        path = tmp / FILES[part]
        try:
            _torch_export(module, inputs, outputs, dynamic, path, opset)
        except Exception as err:  # noqa: BLE001 -- any exporter failure is the user's model or opset
            raise ValueError(f"cannot export the {part} network ({where}) to ONNX opset {opset}: "
                             f"{_short(err)}; nothing written") from None
        try:
            deltas[part] = _compare(path, inputs, expected, outputs)
        except ValueError as err:
            raise ValueError(f"{err} ({where}, opset {opset}); nothing written") from None
        log(f"{FILES[part]}: onnxruntime = PyTorch within max |Δ| "
            + ", ".join(f"{name} {d:.2g} (of max |value| {v:.2g})" for name, (d, v) in deltas[part].items()))
    return deltas


def _meta(cfg, model, checkpoint: Path, opset: int, deltas: dict, pose_inputs: list[str]) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from capenext.config import to_dict
    from capenext.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from capenext.files import file_sha256

    clip = model.clip
    return {
        "format": FORMAT,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "opset": opset,
        "files": dict(FILES),
        "config": to_dict(cfg),
        "inputs": {"pose": pose_inputs, "clip_image": ["img"], "clip_text": ["tokens"]},
        "outputs": {"pose": ["points", "sim"], "clip_image": ["img_emb"], "clip_text": ["text_emb"]},
        "preprocessing": {
            "crop_size": cfg.data.image_size,
            "bbox_scale": cfg.data.bbox_scale,
            "keypoint_slots": cfg.data.max_keypoints,
            "image_mean": [round(float(v), 6) for v in IMAGENET_MEAN],  # the crop's normalisation
            "image_std": [round(float(v), 6) for v in IMAGENET_STD],  # of the crop, RGB in [0, 1]
            "clip_model": clip.model_name,
            "clip_input_size": list(clip.image_size),
            "clip_image_norm": clip.image_norm,  # applied inside clip_image.onnx, from the ImageNet crop
            # CLIP's mean/std as FrozenCLIP reads them (open_clip's OpenAI values when the tower names none)
            "clip_mean": [float(v) for v in getattr(clip.model.visual, "image_mean", None) or OPENAI_DATASET_MEAN],
            "clip_std": [float(v) for v in getattr(clip.model.visual, "image_std", None) or OPENAI_DATASET_STD],
            "tokenizer": clip.model_name,  # open_clip.get_tokenizer(name)
            "context_length": int(getattr(clip.tokenizer, "context_length", 77)),
            "class_prompt": "a photo of {name}",
        },
        "max_abs_delta": {part: {name: d for name, (d, _) in outs.items()} for part, outs in deltas.items()},
        "max_abs_value": {part: {name: v for name, (_, v) in outs.items()} for part, outs in deltas.items()},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _replace_folder(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an earlier export in ``out`` is replaced, an empty folder taken."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET,
           clip_checkpoint: str | None = None, log=lambda message: None) -> dict[str, Any]:
    """Export ``checkpoint``'s pose network and CLIP towers into the folder ``out`` (see the module docstring);
    returns the ``model.json`` record (``max_abs_delta`` holds each output's max |onnxruntime - PyTorch|).
    One-line ``ValueError`` for an opset the installed onnx cannot write, a model the exporter cannot trace, an
    output over tolerance, or an ``out`` that is a file or a non-empty folder of something else; nothing is
    written to ``out`` then. ``log`` gets a line per part verified (progress)."""
    import onnx
    import torch

    from capenext.checkpoint import load_model

    checkpoint, out = Path(checkpoint), Path(out)
    max_opset = onnx.defs.onnx_opset_version()
    if not 9 <= opset <= max_opset:
        raise ValueError(f"--opset {opset}: the installed onnx {onnx.__version__} writes opsets 9..{max_opset}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise ValueError(f"--out {out}: exists and is not an earlier export (no {META_FILE}); choose another folder")
    model, cfg, _ = load_model(checkpoint, clip_checkpoint, "cpu")
    if cfg.model.text_encoder != "clip":
        raise ValueError(f"{checkpoint}: model.text_encoder={cfg.model.text_encoder!r} is a packaged language prior, "
                         "not a PyTorch text tower: the export writes CLIP's text tower only (predict with "
                         "--runtime torch)")
    _fp32_clip(model, cfg)
    model.trim_slots = False  # every slot computed: the graph cannot branch on the mask
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        with torch.random.fork_rng(devices=[]):
            deltas = _export_parts(model, cfg, tmp, opset, log)
        record = _meta(cfg, model, checkpoint, opset, deltas, _modules(model)[3])
        (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``model.json`` of an export folder, checked: every file it names is there; one-line errors."""
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {META_FILE} (expected a folder written by python -m jobs.export)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid json ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a capenext ONNX export (expected format {FORMAT!r})")
    for part in FILES:
        name = (meta.get("files") or {}).get(part)
        if not name or not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: {META_FILE} names {part} file {name!r}, which is not there")
    return meta


class OnnxModel:
    """An export folder run with onnxruntime on CPU: the pose network and the CLIP towers as numpy calls."""

    def __init__(self, folder: str | Path, checkpoint_sha256: str | None = None):
        """Load ``folder``; with ``checkpoint_sha256``, refuse (one line) a folder exported from another
        checkpoint."""
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if checkpoint_sha256 is not None and self.meta.get("checkpoint_sha256") != checkpoint_sha256:
            raise ValueError(f"{self.folder}: exported from another checkpoint (its {META_FILE} has sha256 "
                             f"{str(self.meta.get('checkpoint_sha256'))[:12]}..., the checkpoint given "
                             f"{checkpoint_sha256[:12]}...); export it again with python -m jobs.export")
        files = self.meta["files"]
        self.sessions = {part: _session(self.folder / files[part]) for part in FILES}
        self.pose_inputs = list(self.meta["inputs"]["pose"])

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        """(T, context) int64 token ids → (T, C) L2-normalised float32."""
        return self.sessions["clip_text"].run(["text_emb"], {"tokens": tokens.astype(np.int64)})[0]

    def encode_image(self, img: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) ImageNet-normalised crops → (B, C) L2-normalised float32."""
        return self.sessions["clip_image"].run(["img_emb"], {"img": img.astype(np.float32)})[0]

    def pose(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The pose network on a batch as :class:`~capenext.models.CapeNext` takes it (numpy): ``{"points":
        (L, B, K, 2), "sim": (B, K, h, w)}``. ``img_emb`` is computed here when the network needs it and the
        batch lacks it."""
        feeds = {}
        for name in self.pose_inputs:
            if name == "img_emb" and name not in batch:
                feeds[name] = self.encode_image(batch["img"])
            elif name == "kp_mask":
                feeds[name] = np.asarray(batch[name]).astype(bool)
            else:
                feeds[name] = np.asarray(batch[name]).astype(np.float32)
        points, sim = self.sessions["pose"].run(["points", "sim"], feeds)
        return {"points": points, "sim": sim}
