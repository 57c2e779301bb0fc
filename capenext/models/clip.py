"""The frozen CLIP (paper Sec. 3.3; Radford et al. 2021): joint, class and image embeddings.

CapeNext encodes three things with one frozen CLIP (ViT-B-32, OpenAI's weights in the reference):
- keypoint texts, raw (no template), L2-normalised: the joint embeddings e_joint of Eq. 4;
- the class prompt ``a photo of {name}`` (underscores → spaces), L2-normalised: e_cls of Eq. 3;
- the query crop, L2-normalised: e_img of Eq. 3.

The model comes from ``open_clip.create_model``; our own architectures (``tiny``) are JSON configs in
``capenext/models/clip_configs/`` registered with open_clip at import. Weights are explicit: a local
file (``--clip-checkpoint PATH``) or ``"random"``; neither is an error, so a real run never uses a
random CLIP by accident. A file is OpenAI's TorchScript archive (the ``ViT-B-32.pt`` the reference's
``clip.load`` reads: a ``torch.jit`` zip whose state dict has OpenAI's key names) or a state dict in
OpenAI's (= open_clip's) layout, plain or safetensors; either is loaded strictly into the named
architecture (``ModelCfg.clip_model``), so a file of another model is one line naming the first
tensor that does not fit. The wrapper is always in eval mode, its parameters never require grad and
every encode runs under ``torch.no_grad``.

As the reference runs it:

* precision: ``ModelCfg.clip_precision="fp16"`` is what the reference's ``clip.load`` gives on a GPU
  (fp16 weights, LayerNorm computed in fp32); open_clip's ``precision="fp16"`` builds the same. It runs
  on CUDA only: on CPU, fp16 is refused with one line rather than emulated, since CPU half-precision
  kernels are not the GPU's numerics. ``"fp32"`` (default) is the reference's CPU setting;
* text length: a text longer than CLIP's context (77 tokens with the start and end tokens) is refused
  with one line, as the reference's ``clip.tokenize`` refuses it (open_clip's tokenizer would cut it
  silently). Each text is tokenized once (the check and the encoding share the tokens), under one lock
  per process, and the tokenizer's word cache is bounded (:data:`TOKENIZER_CACHE_WORDS`): open_clip's grows
  with every new word it sees, which a server fed by strangers cannot allow. :meth:`FrozenCLIP.check_texts`
  is the refusal alone (a server checks a request with it before the request joins a batch).

:attr:`FrozenCLIP.identity` names what the embeddings depend on (model, weights' digest, activation, image
normalisation, precision): a cache of embeddings keys by it.

``ModelCfg.text_encoder`` other than ``clip`` hands the keypoint texts and class prompts to a packaged
language prior (:mod:`capenext.models.text_prior`, a named deviation) brought to ``embed_dim``; the image
tower and the 77-token refusal stay CLIP's.

Deviation from the reference (named): the reference feeds CLIP's image tower the augmented query
crop *still ImageNet-normalised*, resized to 224. :meth:`FrozenCLIP.encode_image` undoes the ImageNet
normalisation and applies CLIP's own mean/std before the (bilinear, align_corners=False) resize.
``ModelCfg.clip_image_norm="imagenet"`` keeps the reference's input instead; ``jobs.convert`` sets it
for the published checkpoints, which were trained that way.
"""

from __future__ import annotations

import logging
import pickle
import threading
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from capenext.files import file_sha256
from capenext.models.text_prior import check_text_encoder, load_text_prior

__all__ = ["CLIP_CONFIG_DIR", "PRECISIONS", "FrozenCLIP", "build_clip", "class_prompt"]

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"
open_clip.add_model_config(CLIP_CONFIG_DIR)

RANDOM_CLIP_SEED = 0  # the explicit "random" CLIP is the same everywhere
TOKENIZER_CACHE_WORDS = 20_000  # open_clip's BPE word cache is emptied past this many words
_TOKENIZER_LOCK = threading.Lock()  # tokenizers (and their caches) are not thread-safe; one per process
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def class_prompt(name: str) -> str:
    """The class prompt of the reference: ``a photo of {name}``, underscores → spaces."""
    return f"a photo of {name.replace('_', ' ')}"


PRECISIONS = ("fp32", "fp16")
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's archive, not weights


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


@contextmanager
def _quiet_random_init():
    # open_clip warns "No pretrained weights loaded" on the root logger; random init is asked for here
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _read_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """The CLIP state dict of a local file: OpenAI's TorchScript archive or a (plain or safetensors)
    state dict; one line when it is neither."""
    try:
        if _is_torchscript(checkpoint):  # OpenAI's released ViT-B-32.pt
            with warnings.catch_warnings():  # torch deprecates torch.jit; OpenAI's archive is in its format
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(checkpoint, map_location="cpu").state_dict()
        else:
            state = open_clip.factory.load_state_dict(checkpoint)  # weights_only; unwraps 'state_dict', 'module.'
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(f"ModelCfg.clip_checkpoint={checkpoint!r}: not a readable CLIP weights file "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"ModelCfg.clip_checkpoint={checkpoint!r}: not a state dict of tensors")
    return {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}


def _load_exactly(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str, model_name: str) -> None:
    """``model.load_state_dict(state)`` when every tensor fits; else one line naming the first misfit."""
    mine = model.state_dict()
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in mine.items()
              if k in state and state[k].shape != v.shape]
    missing = [k for k in mine if k not in state]
    extra = [k for k in state if k not in mine]
    if shapes or missing or extra:
        parts = []
        if shapes:
            k, theirs, ours = shapes[0]
            parts.append(f"{len(shapes)} tensors of another shape (e.g. {k}: {list(theirs)}, {model_name} has "
                         f"{list(ours)})")
        if missing:
            parts.append(f"{len(missing)} of {model_name}'s tensors missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} tensors {model_name} does not have (e.g. {extra[0]})")
        raise ValueError(f"ModelCfg.clip_checkpoint={checkpoint!r} is not a CLIP {model_name} "
                         f"(ModelCfg.clip_model): {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def build_clip(model_name: str, checkpoint: str | None, quick_gelu: bool = True, precision: str = "fp32"
               ) -> nn.Module:
    """The open_clip model ``model_name`` with weights from ``checkpoint`` (a file or ``"random"``), built in
    ``precision`` (``fp16``: open_clip's, which is the reference's GPU CLIP: fp16 weights, fp32 LayerNorm)."""
    if checkpoint is None:
        raise ValueError(
            "ModelCfg.clip_checkpoint is not set: pass --clip-checkpoint PATH (CLIP weights, a local file) "
            "or --clip-checkpoint random (explicit random init, tests and smoke runs only)")
    if precision not in PRECISIONS:
        raise ValueError(f"ModelCfg.clip_precision={precision!r}; valid: {list(PRECISIONS)}")
    available = open_clip.list_models()
    if model_name not in available:
        ours = sorted(p.stem for p in CLIP_CONFIG_DIR.glob("*.json"))
        raise KeyError(f"ModelCfg.clip_model={model_name!r} not found; available: {ours} or any open_clip "
                       f"config (e.g. 'ViT-B-32', 'ViT-B-16')")
    if checkpoint == "random":
        # seeded, so that every process (embedding actors, training workers, prediction) builds the same
        # random CLIP and precomputed embeddings match the model's own; the global RNG is left untouched
        with _quiet_random_init(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_CLIP_SEED)
            return open_clip.create_model(model_name, pretrained=None, precision=precision,
                                          force_quick_gelu=quick_gelu)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--clip-checkpoint {checkpoint}: no such file (or use 'random')")
    if _is_torchscript(checkpoint) and not quick_gelu:
        raise ValueError(f"ModelCfg.clip_checkpoint={checkpoint!r} is OpenAI's TorchScript CLIP, trained with "
                         "QuickGELU: set model.clip_quick_gelu=true")
    state = _read_weights(checkpoint)
    with _quiet_random_init():
        model = open_clip.create_model(model_name, pretrained=None, precision=precision, force_quick_gelu=quick_gelu)
    _load_exactly(model, state, checkpoint, model_name)  # copies cast to each parameter's dtype
    return model


class FrozenCLIP(nn.Module):
    """Frozen open_clip model with CapeNext's prompts; every output is L2-normalised float32.

    Attributes:
        embed_dim: C, the joint embedding width (512 for ViT-B-32).
        image_size: side the crop is resized to for the image tower (224 for ViT-B-32).
    """

    def __init__(self, model_name: str = "ViT-B-32", checkpoint: str | None = None, quick_gelu: bool = True,
                 image_norm: str = "clip", precision: str = "fp32", text_encoder: str = "clip"):
        super().__init__()
        if image_norm not in ("clip", "imagenet"):
            raise ValueError(f"ModelCfg.clip_image_norm={image_norm!r}; valid: ['clip', 'imagenet']")
        self.text_encoder = check_text_encoder(text_encoder)
        self.prior = None if text_encoder == "clip" else load_text_prior(text_encoder)
        self.model = build_clip(model_name, checkpoint, quick_gelu, precision)
        self.model_name = model_name
        self.checkpoint, self.quick_gelu = checkpoint, quick_gelu
        self._weights_id: str | None = None
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cache = getattr(self.tokenizer, "cache", None)
        self._base_cache = dict(cache) if isinstance(cache, dict) else None  # the special tokens
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.embed_dim = int(self.model.text_projection.shape[1])
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = torch.tensor(getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        std = torch.tensor(getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        # x_clip = (x_imagenet * s_in + m_in - m_clip) / s_clip = x_imagenet * scale + shift
        scale = torch.tensor(IMAGENET_STD) / std
        shift = (torch.tensor(IMAGENET_MEAN) - mean) / std
        if image_norm == "imagenet":  # the reference's quirk: the ImageNet-normalised crop goes in as is
            scale, shift = torch.ones(3), torch.zeros(3)
        self.image_norm = image_norm
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.train(False)

    @classmethod
    def from_cfg(cls, m) -> "FrozenCLIP":
        """The frozen CLIP a :class:`~capenext.config.ModelCfg` names: model, weights, activation, image
        normalisation, precision and text encoder."""
        return cls(m.clip_model, m.clip_checkpoint, m.clip_quick_gelu, m.clip_image_norm, m.clip_precision,
                   m.text_encoder)

    @property
    def precision(self) -> str:
        """``fp16`` when the weights are half precision, else ``fp32``."""
        return "fp16" if self.model.text_projection.dtype == torch.float16 else "fp32"

    def _check_device(self) -> None:
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("ModelCfg.clip_precision='fp16' runs on a CUDA device only (the reference's GPU "
                             f"setting; here: {self.device.type}); use fp32 on CPU")

    @property
    def identity(self) -> tuple:
        """What this CLIP's embeddings depend on: ``(model, weights, activation, image normalisation,
        precision, text encoder)``, the weights as ``"random:<seed>"`` or the sha256 of the file (read once, on
        first use), the text encoder as ``clip`` or the prior's :attr:`~capenext.models.text_prior.TextPrior.identity`."""
        if self._weights_id is None:
            weights = str(self.checkpoint)
            if self.checkpoint == "random":
                weights = f"random:{RANDOM_CLIP_SEED}"
            elif self.checkpoint is not None and Path(self.checkpoint).is_file():
                weights = f"sha256:{file_sha256(self.checkpoint)}"
            self._weights_id = weights
        text = "clip" if self.prior is None else self.prior.identity
        return (self.model_name, self._weights_id, bool(self.quick_gelu), self.image_norm, self.precision, text)

    def _encode_checked(self, texts: list[str], what: str) -> list[list[int]] | None:
        """Each text's token ids (without start and end), tokenized once; one line for a text over the
        context. ``None`` for a tokenizer without ``encode`` (then it tokenizes, and cuts, itself)."""
        encode = getattr(self.tokenizer, "encode", None)
        context = getattr(self.tokenizer, "context_length", None)
        if encode is None or not context:
            return None
        out = []
        with _TOKENIZER_LOCK:
            try:
                for i, text in enumerate(texts):
                    ids = encode(text)
                    n = len(ids) + 2  # with the start and end tokens
                    if n > context:
                        short = text if len(text) <= 60 else text[:57] + "..."
                        name = what.format(i=i)
                        raise ValueError(f"{name} {short!r} is {n} CLIP tokens, more than the context of {context}: "
                                         "the reference's tokenizer refuses it (open_clip would cut it); shorten it")
                    out.append(ids)
            finally:
                cache = getattr(self.tokenizer, "cache", None)
                if self._base_cache is not None and isinstance(cache, dict) and len(cache) > TOKENIZER_CACHE_WORDS:
                    self.tokenizer.cache = dict(self._base_cache)
        return out

    def check_texts(self, texts: Sequence[str], what: str = "text") -> None:
        """Refuse, in one line naming ``what`` (``{i}`` in it becomes the text's index), a text over CLIP's
        context of 77 tokens; it costs tokenizing the texts, nothing more (no model)."""
        self._encode_checked(list(texts), what)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, context) token ids, as open_clip's tokenizer gives them, each text tokenized once; a text over
        the context is refused (one line), never cut."""
        texts = list(texts)
        ids = self._encode_checked(texts, "text")
        sot, eot = getattr(self.tokenizer, "sot_token_id", None), getattr(self.tokenizer, "eot_token_id", None)
        if ids is None or sot is None or eot is None or getattr(self.tokenizer, "reduction_fn", None) is not None:
            with _TOKENIZER_LOCK:
                return self.tokenizer(texts)
        tokens = torch.zeros(len(ids), self.tokenizer.context_length, dtype=torch.long)
        for i, row in enumerate(ids):
            row = [sot, *row, eot]
            tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return tokens

    def train(self, mode: bool = True) -> "FrozenCLIP":
        """Always eval (dropout off, as the reference's ``text_backbone.eval()``), whatever ``mode``."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._scale.device

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Raw texts (no template) → (T, C) L2-normalised; keypoint descriptions use this. With a packaged
        text encoder (``text_encoder``), its vectors through the frozen projection; a text over CLIP's context
        is refused whichever encodes it, so that every encoder accepts the same texts."""
        if len(texts) == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        if self.prior is not None:
            self.check_texts(texts)
            return self.prior.encode(texts, self.embed_dim).to(self.device)
        self._check_device()
        tokens = self.tokenize(texts).to(self.device)  # (T, L)
        emb = self.model.encode_text(tokens).float()  # (T, C)
        return F.normalize(emb, dim=-1)

    def encode_class(self, names: list[str]) -> torch.Tensor:
        """Category names → (T, C) L2-normalised embeddings of ``a photo of {name}``."""
        return self.encode_text([class_prompt(n) for n in names])

    @torch.no_grad()
    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised crops (B, 3, S, S) → (B, C) L2-normalised, with CLIP's own normalisation."""
        self._check_device()
        x = img.float() * self._scale + self._shift  # (B, 3, S, S) CLIP-normalised
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        conv = getattr(self.model.visual, "conv1", None)
        if conv is not None:  # fp16: the image goes in as the weights' type, as the reference's encode_image
            x = x.to(conv.weight.dtype)
        emb = self.model.encode_image(x).float()  # (B, C)
        return F.normalize(emb, dim=-1)
