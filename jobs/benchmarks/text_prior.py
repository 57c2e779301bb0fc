"""``python -m jobs.benchmark text-prior``: which packaged language prior serves the synthetic benchmark.

Every text encoder (the tiny CLIP at random weights, and each registered prior of
:mod:`capenext.models.text_prior`) embeds the synthetic set's class prompts and keypoint names at the
model's text width (the tiny CLIP's 64, through the frozen projection the model uses) and at its own width.
Printed, per encoder:

* ``class_kin_at1``: leave-one-out, how often a category's nearest other class prompt is of its own
  supercategory ("a photo of koala face" → another "... face"): what lets the class stream of an unseen
  category borrow from the seen ones (chance is about 1/8);
* ``name_kin_at1``: the same for keypoint names against their side-swapped twin ("left front leg" →
  "right front leg") among all names: whether a name's vector says what part it is;
* ``offdiag_mean`` / ``offdiag_std``: mean and spread of the cosines between different texts (a large
  mean with a small spread crowds every text into one cone);
* ``load_s`` and ``texts_per_s``: loading and encoding cost on this machine, and ``texts_per_s_vs_clip``:
  the encoding rate over the random tiny CLIP's, measured in the same run (the baseline).

``--quick``: the 20 categories of the default synthetic set instead of all (a smoke of the whole measurement).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from capenext.models.clip import FrozenCLIP, class_prompt
from capenext.models.text_prior import PRIORS, load_text_prior

MODEL_WIDTH = 64  # the tiny CLIP's embed_dim: what the study's models see


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="the default set's 20 categories (a smoke run)")


def synthetic_texts(count: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """(class names, their supercategories, the keypoint vocabulary) of the synthetic set's first ``count``
    categories (default: every category the generator has)."""
    from pipelines.synthetic_categories import MAX_CATEGORIES, make_categories

    cats = make_categories(0, count or MAX_CATEGORIES)
    names = [c.name.replace("_", " ") for c in cats]
    supers = [c.template.supercategory for c in cats]
    vocabulary = sorted({k for c in cats for k in c.keypoints})
    return names, supers, vocabulary


def _twin(name: str) -> str | None:
    for a, b in (("left", "right"), ("right", "left")):
        if name.startswith(a + " "):
            return b + name[len(a):]
    return None


def kin_at1(emb: torch.Tensor, kin: list[set[int]]) -> float | None:
    """Leave-one-out: the fraction of rows with kin whose nearest other row is one of them (None: no row
    has kin)."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    nearest = sim.argmax(1).tolist()
    rows = [i for i, k in enumerate(kin) if k]
    return float(np.mean([nearest[i] in kin[i] for i in rows])) if rows else None


def _measure(encode, names: list[str], supers: list[str], vocabulary: list[str]) -> dict[str, Any]:
    prompts = [class_prompt(n) for n in names]
    start = time.perf_counter()
    cls = encode(prompts)
    kp = encode(vocabulary)
    seconds = time.perf_counter() - start
    same_super = [{j for j, s in enumerate(supers) if s == supers[i] and j != i} for i in range(len(names))]
    index = {n: i for i, n in enumerate(vocabulary)}
    twins = [{index[t]} if (t := _twin(n)) in index else set() for n in vocabulary]
    sim = cls @ cls.T
    off = sim[~torch.eye(len(prompts), dtype=torch.bool)]
    kin = {"class_kin_at1": kin_at1(cls, same_super), "name_kin_at1": kin_at1(kp, twins)}
    return {**{k: None if v is None else round(v, 3) for k, v in kin.items()},
            "offdiag_mean": round(float(off.mean()), 3), "offdiag_std": round(float(off.std()), 3),
            "texts_per_s": round((len(prompts) + len(vocabulary)) / max(seconds, 1e-9), 1)}


def run(args) -> dict[str, Any]:
    names, supers, vocabulary = synthetic_texts(20 if args.quick else None)
    out: dict[str, Any] = {"categories": len(names), "supercategories": len(set(supers)),
                           "keypoint_names": len(vocabulary), "model_width": MODEL_WIDTH, "encoders": {}}
    start = time.perf_counter()
    clip = FrozenCLIP("tiny", "random")
    out["encoders"]["clip (tiny, random)"] = {"load_s": round(time.perf_counter() - start, 2),
                                              **_measure(clip.encode_text, names, supers, vocabulary)}
    clip_rate = out["encoders"]["clip (tiny, random)"]["texts_per_s"]
    for name, spec in PRIORS.items():
        start = time.perf_counter()
        prior = load_text_prior(name)
        entry: dict[str, Any] = {"load_s": round(time.perf_counter() - start, 2), "dim": spec.dim,
                                 "identity": prior.identity}
        for width, label in ((MODEL_WIDTH, "at_model_width"), (spec.dim, "native")):
            entry[label] = _measure(lambda t, w=width, p=prior: p.encode(t, w), names, supers, vocabulary)
        entry["texts_per_s_vs_clip"] = round(entry["at_model_width"]["texts_per_s"] / clip_rate, 2)
        out["encoders"][name] = entry
    return out
