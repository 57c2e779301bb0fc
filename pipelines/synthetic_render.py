"""How one synthetic MP-100 image is drawn (the pixels; ``pipelines.synthetic`` makes the data).

An image is a cluttered gradient background with a few stray glyphs, sometimes an
unannotated object of another category cut by the frame, then one or two posed
instances of its category: a textured body (polygons, discs and limbs along the
skeleton) with a glyph at every kept keypoint, and opaque blobs over some of them.
``draw_scene`` composes it and reports, per instance, the keypoint positions, which
keypoints show and the body mask, from which the caller writes the annotations.

Every random choice is drawn from the caller's ``numpy`` generator in a fixed order,
so a seeded generator gives the same pixels. ``unit`` scales strokes and texture
periods with the image. Categories are ``pipelines.synthetic_categories.Category`` objects, whose
``glyphs`` give the glyph drawn at each kept keypoint.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipelines.synthetic_categories import Category

_BAR = np.array([(-0.9, -0.2), (0.9, -0.2), (0.9, 0.2), (-0.9, 0.2)])


def _rotation(angle: float) -> np.ndarray:
    """2x2 rotation matrix (radians)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


# --------------------------------------------------------------------------- glyphs


def _shape(spec: dict) -> np.ndarray:
    """A unit-radius glyph outline (closed polygon, y down) from its json spec.

    ``points`` lists the corners; otherwise ``sides`` corners go round from ``start`` degrees
    (or along ``arc``, from and to degrees) at the repeated ``radii``, then are scaled by
    ``stretch`` and moved by ``offset``.
    """
    if "points" in spec:
        return np.array(spec["points"], dtype=float)
    n = spec["sides"]
    if "arc" in spec:
        angles = np.linspace(*np.radians(spec["arc"]), n)
    else:
        angles = np.radians(spec.get("start", 0)) + 2 * np.pi * np.arange(n) / n
    r = np.resize(np.array(spec.get("radii", [1.0])), n)
    unit = np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)
    return unit * np.array(spec.get("stretch", [1.0, 1.0])) + np.array(spec.get("offset", [0.0, 0.0]))


@dataclass(frozen=True)
class Glyphs:
    """The glyph look: unit-radius outlines (y down), fills, and how many glyphs are in use."""

    shapes: tuple[np.ndarray, ...]
    fills: tuple[dict, ...]
    count: int  # stray background glyphs are drawn from 0..count-1

    @classmethod
    def from_specs(cls, shapes: Sequence[dict], fills: Sequence[dict], count: int) -> Glyphs:
        """The look from the json specs of the shapes (see ``_shape``) and the fills."""
        return cls(tuple(_shape(spec) for spec in shapes), tuple(fills), count)

    def draw(self, draw: ImageDraw.ImageDraw, glyph: int, center: np.ndarray, radius: float,
             angle: float, fg: tuple[int, ...], bg: tuple[int, ...]) -> None:
        """Draw glyph ``glyph``: shape ``glyph % shapes``, then fill ``glyph // shapes``.

        A fill paints the outline's inside ``outer``, then shrunken copies of the outline
        (``inner``: scale, colour) and bars across it (``bars``: degrees, colour), in order.
        """
        shapes, fills = self.shapes, self.fills
        shape, fill = shapes[glyph % len(shapes)], fills[glyph // len(shapes) % len(fills)]
        colours, rot = {"fg": fg, "bg": bg}, _rotation(angle)

        def pts(unit: np.ndarray, scale: float = 1.0) -> list[tuple[float, float]]:
            return [tuple(p) for p in center + radius * scale * unit @ rot.T]

        draw.polygon(pts(shape), fill=colours[fill["outer"]], outline=fg, width=max(1, round(radius * 0.3)))
        for scale, colour in fill.get("inner", []):
            draw.polygon(pts(shape, scale), fill=colours[colour])
        for degrees, colour in fill.get("bars", []):
            draw.polygon(pts(_BAR @ _rotation(math.radians(degrees)).T), fill=colours[colour])


# --------------------------------------------------------------------------- backgrounds


def _colour(h: float, s: float, v: float) -> tuple[int, int, int]:
    """HSV in [0, 1] -> RGB bytes."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _background(rng: np.random.Generator, width: int, height: int, glyph_radius: float, glyphs: Glyphs,
                unit: float = 1.0) -> Image.Image:
    """A colour gradient with random clutter shapes and a few stray glyphs (strokes ``unit`` times wider)."""
    a, b = (np.array(_colour(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.3, 1.0)))
            for _ in range(2))
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    gradient = np.broadcast_to(a * (1 - t) + b * t, (height, width, 3))
    image = Image.fromarray(gradient.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(rng.integers(6, 15)):
        colour = _colour(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 1.0))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.3, 2) * side
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        else:
            draw.line([x, y, x + w * rng.choice([-1, 1]), y + h], fill=colour,
                      width=max(1, round(int(rng.integers(1, 5)) * unit)))
    for _ in range(rng.integers(0, 3)):
        glyphs.draw(draw, int(rng.integers(glyphs.count)), rng.uniform((0, 0), (width, height)),
                    glyph_radius, rng.uniform(0, 2 * np.pi), _colour(rng.random(), 0.8, 0.2),
                    _colour(rng.random(), 0.2, 0.95))
    return image


# --------------------------------------------------------------------------- instances


def _pose(category: Category, rng: np.random.Generator) -> np.ndarray:
    """Articulate the category's layout: every part turns around its parent (forward kinematics)."""
    template = category.template
    limits = np.radians([p.joint for p in template.parts]) * category.joint_scale
    angles = rng.uniform(-1.0, 1.0, len(limits)) * limits
    pose, turned = np.zeros_like(category.nominal), np.zeros(len(limits))
    for i, parent in enumerate(template.parents):
        if parent < 0:
            pose[i] = category.nominal[i]
            continue
        turned[i] = turned[parent] + angles[i]
        offset = category.nominal[i] - category.nominal[parent]
        pose[i] = pose[parent] + _rotation(turned[i]) @ offset
    return pose * rng.uniform(0.9, 1.1, 2) + rng.normal(0.0, 0.02, pose.shape)


@dataclass
class Instance:
    """One drawn object: its template-part pixel positions, scale and rotation."""

    category: Category
    points: np.ndarray  # (parts, 2) pixel coordinates
    scale: float  # pixels per template unit
    angle: float

    @property
    def glyph_radius(self) -> float:
        """Glyph radius in pixels."""
        return max(3.0, 0.1 * self.scale)


def _place(category: Category, rng: np.random.Generator, center: np.ndarray, scale: float) -> Instance:
    """Pose the category and map it to pixels around ``center``."""
    template = category.template
    angle = float(np.radians(rng.uniform(-1, 1) * template.max_rotation))
    points = center + scale * _pose(category, rng) @ _rotation(angle).T
    return Instance(category, points, scale, angle)


def _draw_instance(image: Image.Image, instance: Instance, rng: np.random.Generator, glyphs: Glyphs,
                   unit: float = 1.0) -> Image.Image:
    """Draw the body (textured) and the glyphs of one instance; return its body mask."""
    category, points = instance.category, instance.points
    template, kept = category.template, set(category.kept)
    index = template.index
    mask = Image.new("L", image.size, 0)
    shape = ImageDraw.Draw(mask)
    for polygon in template.polygons:
        corners = [tuple(points[index[n]]) for n in polygon if index[n] in kept]
        if len(corners) >= 3:
            shape.polygon(corners, fill=255)
    for name, radius in template.discs:
        if index[name] in kept:
            (x, y), r = points[index[name]], radius * instance.scale
            shape.ellipse([x - r, y - r, x + r, y + r], fill=255)
    width = max(2, round(template.limb * category.limb * instance.scale))
    for a, b in category.skeleton:
        pa, pb = points[category.kept[a]], points[category.kept[b]]
        shape.line([tuple(pa), tuple(pb)], fill=255, width=width)
        for x, y in (pa, pb):
            shape.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    box = mask.getbbox()
    if box is not None:
        image.paste(_texture(category, rng, box, unit), box, mask.crop(box))
    draw = ImageDraw.Draw(image)
    fg = _colour(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.05, 0.3))
    bg = _colour(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.85, 1.0))
    for i, glyph in zip(category.kept, category.glyphs):
        glyphs.draw(draw, glyph, points[i], instance.glyph_radius, instance.angle, fg, bg)
    return mask


def _texture(category: Category, rng: np.random.Generator, box: tuple[int, int, int, int],
             unit: float = 1.0) -> Image.Image:
    """The body's colour and texture over ``box``: mostly near the category's hue.

    Texture periods are ``unit`` times their default length.
    """
    hue = category.hue + rng.normal(0, 0.05) if rng.random() < 0.75 else rng.random()
    saturation, value = rng.uniform(0.35, 0.9), rng.uniform(0.35, 0.85)
    base = np.array(_colour(hue, saturation, value), dtype=np.float32)
    second = np.array(_colour(hue + rng.uniform(-0.15, 0.15), saturation, value * 0.6), dtype=np.float32)
    w, h = box[2] - box[0], box[3] - box[1]
    y, x = np.mgrid[box[1]:box[3], box[0]:box[2]].astype(np.float32)
    kind, period = rng.choice(4, p=category.textures), rng.uniform(4, 12) * unit
    if kind == 1:
        direction = rng.uniform(0, np.pi)
        pattern = (x * math.cos(direction) + y * math.sin(direction)) / period % 1 < 0.5
    elif kind == 2:
        pattern = (np.sin(x / period * 2) * np.sin(y / period * 2)) > 0.6
    elif kind == 3:
        pattern = ((x // period + y // period) % 2) == 0
    else:
        pattern = np.zeros((h, w), dtype=bool)
    pixels = np.where(pattern[..., None], second, base)
    return Image.fromarray(pixels.astype(np.uint8))


def _layout(category: Category, rng: np.random.Generator, size: np.ndarray, pair: bool) -> list[Instance]:
    """Place one instance (sometimes shifted partly out of frame) or two side by side."""
    if pair:
        along = int(size[1] > size[0])  # split the longer side
        half = size.astype(float).copy()
        half[along] /= 2
        scale = min(half) * rng.uniform(0.3, 0.38)
        centers = [half / 2 + np.eye(2)[along] * half[along] * k for k in (0, 1)]
        return [_place(category, rng, c + rng.uniform(-0.05, 0.05, 2) * half, scale) for c in centers]
    scale = min(size) * rng.uniform(0.26, 0.4)
    center = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    shift = np.zeros(2)
    if rng.random() < 0.15:
        direction = rng.uniform(0, 2 * np.pi)
        shift = np.array([math.cos(direction), math.sin(direction)]) * rng.uniform(0.25, 0.45) * min(size)
    instance = _place(category, rng, center, scale)
    for fraction in (1.0, 0.5):
        moved = Instance(category, instance.points + shift * fraction, scale, instance.angle)
        if _in_frame(moved, size).mean() >= 0.6:
            return [moved]
    return [instance]


def _in_frame(instance: Instance, size: np.ndarray) -> np.ndarray:
    """Whether each kept keypoint lies inside the image."""
    points = instance.points[list(instance.category.kept)]
    return np.all((points >= 0) & (points < size), axis=1)


def _distractor(categories: list[Category], rng: np.random.Generator, size: np.ndarray) -> Instance:
    """An unannotated object of a random category, centred near a border so the frame cuts it."""
    category = categories[rng.integers(len(categories))]
    side = rng.integers(4)
    center = rng.uniform(0, 1, 2) * size
    center[side % 2] = (side // 2) * size[side % 2] + rng.uniform(-0.1, 0.1) * size[side % 2]
    return _place(category, rng, center, min(size) * rng.uniform(0.25, 0.4))


def _occlude(draw: ImageDraw.ImageDraw, instance: Instance, visible: np.ndarray,
             rng: np.random.Generator) -> None:
    """Hide some visible keypoints under opaque blobs (at most half of them); clears ``visible``."""
    r = instance.glyph_radius
    for k in np.flatnonzero(visible):
        if rng.random() < 0.08 and visible.sum() > len(visible) / 2:
            x, y = instance.points[instance.category.kept[k]] + rng.uniform(-0.3, 0.3, 2) * r
            extent = r * rng.uniform(1.7, 2.4)
            box = [x - extent, y - extent, x + extent, y + extent]
            colour = _colour(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 1.0))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
            visible[k] = False


# --------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """One drawn image and, per annotated instance, what its annotation is made from."""

    image: Image.Image
    instances: list[Instance]
    visible: list[np.ndarray]  # per instance: which kept keypoints are in frame and not occluded
    masks: list[Image.Image]  # per instance: its body mask


def draw_scene(category: Category, categories: list[Category], rng: np.random.Generator, size: np.ndarray,
               glyphs: Glyphs, unit: float = 1.0) -> Scene:
    """Draw an image of ``size`` (width, height) showing ``category``, distractors from ``categories``."""
    image = _background(rng, int(size[0]), int(size[1]), max(3.0, 0.03 * min(size)), glyphs, unit)
    if rng.random() < 0.3:
        _draw_instance(image, _distractor(categories, rng, size), rng, glyphs, unit)
    instances = _layout(category, rng, size, pair=rng.random() < 0.15)
    masks = [_draw_instance(image, instance, rng, glyphs, unit) for instance in instances]
    draw = ImageDraw.Draw(image)
    visible = [_in_frame(instance, size) for instance in instances]
    for instance, shown in zip(instances, visible):
        _occlude(draw, instance, shown, rng)
    return Scene(image, instances, visible, masks)
