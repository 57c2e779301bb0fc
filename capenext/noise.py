"""Noisy prompts for the robustness evaluation (paper Tables 4 and 5), defined once and seeded.

Three kinds, shared by the embedding pipeline (which precomputes the noisy keypoint variants) and the
evaluation job:

* ``class``: each query's class prompt is replaced by a random *other* name of a list of category names, as
  the reference's Table 4 run does it (``capex.py`` up to commit 4e08e71: per query, a uniformly drawn
  other index of its 100 MP-100 names); the list is the reference's own when a checkout is given
  (:func:`reference_class_names`, read, never run), else the category names of the annotation files; the
  draw is seeded per (query, support) pair (:func:`query_class`), the reference's was not;
* ``class_per_category``: one wrong name per test category and seed (:func:`wrong_class`): an
  approximation of Table 4 with far fewer draws (about 20 per split), kept for comparison;
* ``typo``: keypoint names get character swaps, drops, insertions and substitutions, each letter hit
  with probability ``rate`` (:func:`typo`; "left eey", "nosse", as in CapeX's typo study);
* ``template``: keypoint names are rewritten by a word map (:func:`rewrite`). The default maps ship as
  ``capenext/data/template_maps.json`` and hold the paper's Table 5 rewrites (paw → foreleg,
  elbow → forearm, eye → eyeball, paw → foot, shoulder → upper arm); a custom map is a JSON object
  ``{"word": "replacement", ...}``.

Every function takes its randomness from a generator seeded by ``(seed, salt)``, where the salt is a
stable digest of the text or category, so the same prompt gets the same noise whatever else is drawn.

A fourth kind, ``reference:VARIANT``, swaps in the reference's own texts for the robustness study (its
typo, synonym, translation, no-position and manual-rewrite variants, read from the reference by
``python -m pipelines.descriptions``): whole categories get the variant's texts, applied to the
annotation's names as the reference applies them (:meth:`capenext.data.mp100.Descriptions.apply`).

The kinds are a registry (:func:`register_noise`, :func:`noise_kinds`, :func:`get_noise`): each
:class:`NoiseKind` says what it changes, which options it takes and how it turns them into the
:class:`Variant` rows an evaluation reports (``clean``, ``class``, ``typo@0.1``,
``template:paw-foreleg``), and whether a set of embedding tables already holds a variant. ``jobs.evaluate``
and ``jobs.report`` read the registry, so a kind registered here reaches both.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

TEMPLATE_MAPS_FILE = Path(__file__).parent / "data" / "template_maps.json"
DEFAULT_TYPO_RATE = 0.1
LETTERS = string.ascii_lowercase


def _rng(seed: int, *salt: str | int) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(s) for s in salt).encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def typo(text: str, rate: float, seed: int) -> str:
    """Each letter, with probability ``rate``, is swapped with the next, dropped, doubled by an
    inserted letter, or substituted. Spaces and non-letters are kept. ``rate=0`` returns ``text``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"typo rate must lie in [0, 1], got {rate}")
    rng = _rng(seed, "typo", text)
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if not c.isalpha() or rng.random() >= rate:
            out.append(c)
            i += 1
            continue
        op = rng.integers(4)
        if op == 0 and i + 1 < len(chars) and chars[i + 1].isalpha() and chars[i + 1] != c:  # swap
            out += [chars[i + 1], c]
            i += 2
            continue
        if op == 1 and sum(ch.isalpha() for ch in chars) > 1:  # drop
            pass
        elif op == 2:  # insert a letter after this one
            out += [c, LETTERS[rng.integers(26)]]
        else:  # substitute with a different letter
            out.append(LETTERS[(LETTERS.find(c.lower()) + 1 + rng.integers(25)) % 26])
        i += 1
    return "".join(out)


def wrong_class(name: str, others: list[str], seed: int) -> str:
    """A random category name other than ``name`` from ``others`` (the benchmark's categories)."""
    pool = sorted({o for o in others if o != name})
    if not pool:
        raise ValueError(f"class noise needs at least one category other than {name!r}")
    return pool[int(_rng(seed, "class", name).integers(len(pool)))]


def query_class(name: str, names: list[str], seed: int, query_ann: int, support_ann: int) -> str:
    """The reference's per-query class noise, seeded: a name of ``names`` at an index other than ``name``'s
    first (the reference draws ``randint(0, 99)`` until it differs from ``names.index(name)``; a name the
    list lacks draws from all of it). Keyed by the (query, support) pair, so a pair's noise is one draw."""
    if len(names) < 2:
        raise ValueError("class noise needs a list of at least two category names")
    own = names.index(name) if name in names else None
    rng = _rng(seed, "query-class", query_ann, support_ann)
    if own is None:
        return names[int(rng.integers(len(names)))]
    j = int(rng.integers(len(names) - 1))
    return names[j + (j >= own)]


REFERENCE_CLASS_FILE = "models/models/detectors/capex.py"  # where the reference lists MP-100's 100 names


def reference_class_names(checkout: str | Path) -> list[str]:
    """The reference's list of MP-100 category names for its class-noise run (``self.category_names`` in
    ``capex.py``, present up to commit 4e08e71), read with ``ast`` from a checkout, never run. One line
    when the file or the list is not there."""
    import ast

    path = Path(checkout) / REFERENCE_CLASS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--class-names {checkout}: {REFERENCE_CLASS_FILE} not found (a checkout of the "
                                "official code, yzrs/CapeNext)")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and any(
                isinstance(t, ast.Attribute) and t.attr == "category_names" for t in node.targets):
            names = [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(names) == len(node.value.elts) and len(names) >= 2:
                return names
    raise ValueError(f"{path}: no list of category names (self.category_names = [...]); the reference has it up to "
                     "commit 4e08e71: git checkout 4e08e71 -- models/models/detectors/capex.py")


def load_template_maps(path: str | Path | None = None) -> dict[str, dict[str, str]]:
    """Named word maps. ``None``: the paper's Table 5 maps. A file holding one flat map
    ``{"word": "replacement"}`` is returned as ``{<file stem>: map}``."""
    p = Path(path) if path is not None else TEMPLATE_MAPS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"template map not found: {p} (--template-map)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid json ({err})") from None
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        data = {p.stem: data}
    ok = isinstance(data, dict) and all(
        isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
        for m in data.values()
    )
    if not ok or not data:
        raise ValueError(f"{p}: expected {{'word': 'replacement'}} or {{'name': {{'word': 'replacement'}}}}")
    return data


def rewrite(text: str, word_map: dict[str, str]) -> str:
    """Replace whole words (case-insensitive, a plural ``s`` kept): "left front paws" → "left front forelegs"."""
    for word, repl in word_map.items():
        text = re.sub(rf"\b{re.escape(word)}(s?)\b", lambda m: repl + m.group(1), text, flags=re.IGNORECASE)
    return text


def keypoint_variants(
    texts: list[str],
    typo_rates: tuple[float, ...] = (0.1,),
    template_maps: dict[str, dict[str, str]] | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The keypoint-text variants the embedding job precomputes: ``clean``, ``typo@<rate>`` per rate and
    ``template:<name>`` per map. Each variant has one text per keypoint."""
    maps = load_template_maps() if template_maps is None else template_maps
    out = {"clean": list(texts)}
    for rate in typo_rates:
        out[typo_variant(rate)] = [typo(t, rate, seed) for t in texts]
    for name, word_map in maps.items():
        out[f"template:{name}"] = [rewrite(t, word_map) for t in texts]
    return out


def typo_variant(rate: float) -> str:
    return f"typo@{rate:g}"


# --- the registry of noise kinds -------------------------------------------------------------------


@dataclass
class Variant:
    """One result row of a noisy evaluation: its kind, its name (``clean``, ``class``, ``typo@0.1``,
    ``template:paw-foreleg``), how it rewrites a keypoint text, and whether the class prompt is wrong."""

    noise: str
    name: str
    text: Callable[[str], str]
    wrong_class: bool = False
    per_query: bool = False  # the wrong class is drawn per (query, support) pair, not per category
    word_map: dict[str, str] | None = None
    rate: float | None = None
    # category (with the annotation's names) → its keypoint texts, for kinds that rewrite whole categories
    category_texts: Callable[[Any], list[str]] | None = None

    def texts_of(self, category: Any, annotation_category: Any | None = None) -> list[str]:
        """The variant's keypoint texts of ``category`` (whose ``keypoints`` are the clean texts); a
        whole-category kind starts from ``annotation_category``, the annotation's names."""
        if self.category_texts is not None:
            return self.category_texts(annotation_category if annotation_category is not None else category)
        return [self.text(t) for t in category.keypoints]


@dataclass(frozen=True)
class NoiseKind:
    """A kind of prompt noise.

    Attributes:
        name: what ``--noise`` takes.
        changes: ``"class"`` (the class prompt) or ``"keypoints"`` (the keypoint texts), or ``"nothing"``.
        help: one line for ``--help``.
        options: the option names it takes (``rate``, ``template_map``, ``variant``); another kind's option
            is refused.
        variants: options (``rate``, ``template_map``, ``seed``, ``variant``, ``descriptions``) → the result
            rows.
        in_tables: (variant, the tables' metadata, seed) → whether the tables hold its keypoint texts.
    """

    name: str
    changes: str
    help: str
    variants: Callable[..., list[Variant]]
    in_tables: Callable[[Variant, dict[str, Any], int], bool]
    options: tuple[str, ...] = field(default=())


_NOISE: dict[str, NoiseKind] = {}


def register_noise(kind: NoiseKind) -> NoiseKind:
    if kind.name in _NOISE:
        raise ValueError(f"noise kind {kind.name!r} is registered already")
    _NOISE[kind.name] = kind
    return kind


def noise_kinds() -> list[str]:
    """The registered kinds, in registration order (``none`` first)."""
    return list(_NOISE)


def get_noise(name: str) -> NoiseKind:
    if name not in _NOISE:
        raise KeyError(f"unknown noise kind {name!r}; available: {noise_kinds()}")
    return _NOISE[name]


def _typo_rows(rate: float | None = None, seed: int = 0, **_: Any) -> list[Variant]:
    rate = DEFAULT_TYPO_RATE if rate is None else rate
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"--typo-rate must lie in [0, 1], got {rate}")
    return [Variant("typo", typo_variant(rate), lambda t: typo(t, rate, seed), rate=rate)]


def _template_rows(template_map: str | None = None, **_: Any) -> list[Variant]:
    return [Variant("template", f"template:{name}", (lambda t, m=m: rewrite(t, m)), word_map=m)
            for name, m in load_template_maps(template_map).items()]


register_noise(NoiseKind(
    "none", "nothing", "the clean prompts", lambda **_: [Variant("none", "clean", lambda t: t)],
    lambda v, meta, seed: True))
register_noise(NoiseKind(
    "class", "class", "each query's class prompt becomes another name of the category list, drawn per query "
    "(the paper's Table 4; the list: --class-names CHECKOUT, else the annotations' categories)",
    lambda **_: [Variant("class", "class", lambda t: t, wrong_class=True, per_query=True)],
    lambda v, meta, seed: True))
register_noise(NoiseKind(
    "class_per_category", "class", "one wrong category name per test category and seed (an approximation of "
    "Table 4)", lambda **_: [Variant("class_per_category", "class_per_category", lambda t: t, wrong_class=True)],
    lambda v, meta, seed: True))
register_noise(NoiseKind(
    "typo", "keypoints", f"typos in the keypoint texts at --typo-rate (default {DEFAULT_TYPO_RATE})", _typo_rows,
    lambda v, meta, seed: (v.name in {typo_variant(r) for r in meta.get("typo_rates", [])}
                           and meta.get("noise_seed") == seed),
    options=("rate",)))
register_noise(NoiseKind(
    "template", "keypoints", "keypoint texts rewritten by word maps (default: the paper's Table 5 maps)",
    _template_rows,
    lambda v, meta, seed: meta.get("template_maps", {}).get(v.name.split(":", 1)[1]) == v.word_map,
    options=("template_map",)))


def _reference_rows(variant: str | None = None, descriptions: str | None = None, **_: Any) -> list[Variant]:
    from capenext.data.mp100 import TEXT_VARIANTS, load_descriptions

    if variant is None:
        raise ValueError(f"--noise reference needs a variant: --noise reference:VARIANT, one of {list(TEXT_VARIANTS)}")
    if descriptions is None:
        raise ValueError(f"--noise reference:{variant} reads the reference's texts from --descriptions FILE "
                         "(python -m pipelines.descriptions --reference CHECKOUT --out FILE --variant all)")
    desc = load_descriptions(descriptions, variant)
    if desc.variant is None:
        raise ValueError(f"--noise reference:{variant}: {descriptions} is a map of category name → texts, not the "
                         "reference's rules (python -m pipelines.descriptions)")
    return [Variant("reference", f"reference:{variant}", lambda t: t,
                    category_texts=lambda cat: list(desc.apply(cat).keypoints))]


register_noise(NoiseKind(
    "reference", "keypoints", "the reference's own texts of a variant (reference:typo, reference:synonyms, ...), "
    "from --descriptions FILE", _reference_rows,
    lambda v, meta, seed: False, options=("variant",)))
