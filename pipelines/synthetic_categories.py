"""What a synthetic MP-100 category is: the supercategory templates (a tree of named parts, read from
``synthetic_templates.json``), the shared keypoint vocabulary and its glyphs, and :class:`Category`, a
template perturbed once. ``pipelines.synthetic`` writes the data set from them and
``pipelines.synthetic_render`` draws their instances; both import this module, which imports neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

TEMPLATES_PATH = Path(__file__).with_name("synthetic_templates.json")
_STREAM_NAMES = 1_000_001


# --------------------------------------------------------------------------- templates and glyphs


@dataclass(frozen=True)
class Part:
    """One named part of a template: nominal position (y down), parent, articulation."""

    name: str
    x: float
    y: float
    parent: str | None = None
    optional: bool = False
    joint: float = 0.0  # the part turns around its parent by up to this many degrees


@dataclass(frozen=True)
class Template:
    """A supercategory: a tree of parts, how to draw its body, and its category names."""

    supercategory: str
    head: str  # the word every category name of the supercategory ends with
    modifiers: tuple[str, ...]
    parts: tuple[Part, ...]
    extra_edges: tuple[tuple[str, str], ...] = ()
    polygons: tuple[tuple[str, ...], ...] = ()
    discs: tuple[tuple[str, float], ...] = ()  # (part, radius) filled circles
    limb: float = 0.12  # width of the limbs along skeleton edges
    max_rotation: float = 20.0

    @cached_property
    def index(self) -> dict[str, int]:
        """Part name -> index."""
        return {part.name: i for i, part in enumerate(self.parts)}

    @cached_property
    def parents(self) -> tuple[int, ...]:
        """Parent index of each part (-1 for the root); parents always come first."""
        index = self.index
        return tuple(-1 if p.parent is None else index[p.parent] for p in self.parts)


def _template(spec: dict) -> Template:
    """A template from its json entry (lists become tuples, parts become ``Part``)."""
    return Template(**{**spec, "modifiers": tuple(spec["modifiers"]),
                       "parts": tuple(Part(**part) for part in spec["parts"]),
                       "extra_edges": tuple(map(tuple, spec.get("extra_edges", ()))),
                       "polygons": tuple(map(tuple, spec.get("polygons", ()))),
                       "discs": tuple(map(tuple, spec.get("discs", ())))})


_DATA = json.loads(TEMPLATES_PATH.read_text())
POLYSEMOUS = frozenset(_DATA["polysemous"])
TEMPLATES = tuple(_template(spec) for spec in _DATA["templates"])
MAX_CATEGORIES = sum(len(t.modifiers) for t in TEMPLATES)
# every distinct look: (name, "") for plain names, (name, supercategory) for polysemous ones
GLYPH_KEYS = tuple(sorted({(p.name, t.supercategory if p.name in POLYSEMOUS else "")
                           for t in TEMPLATES for p in t.parts}))
_GLYPH_INDEX = {key: i for i, key in enumerate(GLYPH_KEYS)}
GLYPH_SHAPES, GLYPH_FILLS = _DATA["glyph_shapes"], _DATA["glyph_fills"]


def glyph_id(name: str, supercategory: str) -> int:
    """The glyph drawn at keypoint ``name``: shared across supercategories unless polysemous."""
    return _GLYPH_INDEX[(name, supercategory if name in POLYSEMOUS else "")]


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True)
class Category:
    """One category: a template perturbed once (proportions, kept parts, look)."""

    index: int
    id: int
    name: str
    template: Template
    kept: tuple[int, ...]  # template part indices annotated in this category
    nominal: np.ndarray  # (parts, 2) perturbed nominal layout
    limb: float
    hue: float
    joint_scale: float
    textures: np.ndarray  # probabilities of plain, stripes, spots, checks

    @cached_property
    def keypoints(self) -> list[str]:
        """Keypoint names in annotation order."""
        return [self.template.parts[i].name for i in self.kept]

    @cached_property
    def glyphs(self) -> tuple[int, ...]:
        """The glyph drawn at each keypoint, in annotation order."""
        return tuple(glyph_id(name, self.template.supercategory) for name in self.keypoints)

    @cached_property
    def skeleton(self) -> list[list[int]]:
        """0-based edges: each kept part to its nearest kept ancestor, plus the template's extras."""
        parents, position = self.template.parents, {part: k for k, part in enumerate(self.kept)}

        def kept_ancestor(i: int) -> int:
            while i >= 0 and i not in position:
                i = parents[i]
            return i

        edges = [[position[kept_ancestor(parents[i])], position[i]]
                 for i in self.kept if kept_ancestor(parents[i]) >= 0]
        index = self.template.index
        edges += [[position[index[a]], position[index[b]]] for a, b in self.template.extra_edges
                  if index[a] in position and index[b] in position]
        return edges

    @cached_property
    def polysemous(self) -> list[int]:
        """0-based indices of the keypoints whose names are polysemous (``POLYSEMOUS``), in order."""
        return [k for k, name in enumerate(self.keypoints) if name in POLYSEMOUS]

    @cached_property
    def polysemous_names(self) -> frozenset[str]:
        """The polysemous names among the keypoints (what the polysemy split rule compares)."""
        return frozenset(self.keypoints) & POLYSEMOUS

    def coco(self) -> dict:
        """The COCO ``categories`` entry; ``polysemous_keypoints`` only when it has some, so that a category
        without polysemous names is written as MP-100's are."""
        entry = {"id": self.id, "name": self.name, "supercategory": self.template.supercategory,
                 "keypoints": self.keypoints, "skeleton": self.skeleton}
        if self.polysemous:
            entry["polysemous_keypoints"] = self.polysemous
        return entry


def make_categories(seed: int, count: int) -> list[Category]:
    """Build ``count`` categories over min(8, count // 2) supercategories (>= 2 each)."""
    templates = TEMPLATES[: min(len(TEMPLATES), count // 2)]
    names_rng = np.random.default_rng([seed, _STREAM_NAMES])
    modifiers = [list(names_rng.permutation(t.modifiers)) for t in templates]

    def build(index: int) -> Category:
        template = templates[index % len(templates)]
        rng = np.random.default_rng([seed, index, 0])
        optional = [i for i, p in enumerate(template.parts) if p.optional]
        kept = sorted({i for i, p in enumerate(template.parts) if not p.optional}
                      | {i for i in optional if rng.random() < 0.5})
        layout = np.array([(p.x, p.y) for p in template.parts])
        nominal = layout * rng.uniform(0.75, 1.3, 2) + rng.normal(0.0, 0.05, layout.shape)
        return Category(
            index=index,
            id=index + 1 + index // 6,  # gaps, as in MP-100's category ids
            name=f"{modifiers[index % len(templates)][index // len(templates)]}_{template.head}",
            template=template,
            kept=tuple(kept),
            nominal=nominal,
            limb=float(rng.uniform(0.8, 1.25)),
            hue=float(rng.random()),
            joint_scale=float(rng.uniform(0.7, 1.3)),
            textures=rng.dirichlet(np.ones(4)),
        )

    return [build(i) for i in range(count)]
