"""Synthetic MP-100: a small, fair category-agnostic pose estimation (CAPE) benchmark.

``python -m pipelines.synthetic --out DIR`` writes a dataset with MP-100's exact
layout, so every pipeline that reads MP-100 runs unchanged on it::

    DIR/annotations/mp100_split{1..5}_{train,val,test}.json   (COCO keypoints)
    DIR/images/<category_name>/<image_id>.jpg                 (file_name is relative to images/)

Each json holds the ``images``, ``annotations`` and ``categories`` of one subset
only. Category ``keypoints`` are text names ("left eye", "top", ...) and
``skeleton`` is a list of 0-based index pairs, as in the GraphCape/CapeX files.
Category names use underscores like MP-100 ("office_chair"); read them as text by
replacing ``_`` with a space.

What makes it a fair CAPE benchmark, and able to show what text guidance buys:

* **Category-disjoint splits.** Five splits, each with train/val/test categories
  in MP-100's 70/10/20 proportions (20 categories -> 14/2/4). The five test sets
  partition the categories, so every category is tested once; each validation set
  comes from another split's test group. Every test set holds categories whose
  supercategory is seen in training (the paper's setting), never the categories
  themselves. This is the default split rule (``--split-rule default``).
* **A polysemy-stress split rule** (``--split-rule polysemy``): the same images
  and categories, other splits, to test the claim that the class prompt resolves
  polysemous names. Every test category has a polysemous keypoint name that a
  *training* category of another supercategory also has (the name is seen in
  training with another look and geometry), and a training category of its own
  supercategory. Test sets hold 20 % of the categories (4 of 20), differ from
  split to split and need not partition the categories: a category may be tested
  in several splits or in none (those without a polysemous name never are).
  Validation is 10 % of the categories, drawn from the rest so that the rule still
  holds; training is the rest. The test sets are built greedily, least-tested
  categories first, in a seeded order (:func:`_polysemy_splits`). Each annotation
  file's ``info`` records ``"split_rule": "polysemy"`` (the default rule's files
  carry no such key).
* **Keypoint names come from one shared vocabulary, and a part's look follows its
  name.** Every visible keypoint carries a small glyph (a shape and a fill
  pattern) chosen by its name, so "left eye" looks the same on a cat face, a fox
  face and a horse body, up to colour scheme, scale and rotation. A model can
  learn the link from a name to an appearance and carry it to unseen categories.
* **Polysemy.** The names in ``POLYSEMOUS`` ("neck", "top", "handle", the legs,
  the shoulders) get a different glyph in each supercategory: a chair's "left
  front leg" does not look like a horse's. Only the class prompt tells them apart.
  Each category lists the indices of such keypoints as ``polysemous_keypoints``,
  so that evaluation reports PCK over them and over the others.
* **Class names carry information.** A category's name shares its head word with
  its supercategory ("office_chair", "garden_chair" in "chair"; "cat_face" in
  "animal_face"), so the prompt of an unseen category says what it resembles.
* **Supercategory templates, perturbed per category.** Each of eight
  supercategories is a template: a tree of named parts with a nominal 2-D layout.
  Each category rescales it, moves its parts and drops some optional parts, so
  categories differ in proportions and in keypoint count (6..16).
* **Instance variation.** Colour scheme, texture (plain, stripes, spots, checks),
  scale, rotation, aspect and articulation (every joint turns within a range)
  change per image, so a whole-image cue helps and memorising one support fails.
* **Distractors.** Cluttered backgrounds, stray glyphs, unannotated partial
  objects of other categories cut by the frame, and some images with a second
  annotated instance of the same category.
* **Visibility.** Keypoints hidden under an occluder or outside the frame have
  ``v=0`` and are stored as ``0, 0, 0`` (COCO convention); visible ones have
  ``v=2``. ``num_keypoints`` counts the visible ones.

Image sides are 128..256 px (256..512 px with ``--full-size``). With
``--mp100-sized`` the images have MP-100's camera-photo sizes instead: the long
side in 600..1600 px, a camera aspect ratio (4:3, 3:2, 16:9 or 1:1, landscape or
portrait) and JPEG quality 85..95. Objects, strokes and textures scale with the
image, so an object's box is large next to the model's 256-px crop and a loader
pays MP-100's decode and resize costs; layout and annotations are unchanged, and
``--full-size --mp100-sized`` gives MP-100's scale (100 categories x 180 images).

Generation is deterministic for a seed: the same arguments give byte-identical json
and images (every category draws from its own ``numpy`` generator seeded with
``(seed, category index)``, and JPEGs are written at quality 90, or a drawn quality
with ``--mp100-sized``). The default (20 categories x 30 images) takes a few
seconds; ``--full-size`` (100 categories x 180 images) is meant for benchmarks.
Files are written under a temporary name and moved into place, so re-running into
the same folder overwrites cleanly. The templates, the polysemous names and the
glyph shapes and fills are data, read from ``synthetic_templates.json`` by
``pipelines.synthetic_categories`` (the templates and :class:`Category`);
``pipelines.synthetic_render`` draws the images.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from capenext.cli import UsageError, run_main
from capenext.data.mp100 import SPLITS, SUBSETS, annotation_path
from pipelines.synthetic_categories import (GLYPH_FILLS, GLYPH_KEYS, GLYPH_SHAPES, MAX_CATEGORIES, Category,
                                            make_categories)
from pipelines.synthetic_render import Glyphs, Instance, draw_scene

MIN_CATEGORIES = 10
SPLIT_RULES = ("default", "polysemy")

_SIZES = {False: (128, 256), True: (256, 512)}
_DEFAULT_COUNTS = {False: (20, 30), True: (100, 180)}
_STREAM_SPLITS = 1_000_002
_STREAM_POLYSEMY = 1_000_003
_POLYSEMY_ATTEMPTS = 200
_JPEG_QUALITY = 90
# --mp100-sized: long side, camera aspect ratios (long / short) and their odds, landscape odds,
# JPEG qualities, and the short side at which strokes and texture periods have their default size
_MP100_LONG_SIDE = (600, 1600)
_CAMERA_ASPECTS = ((4 / 3, 0.4), (3 / 2, 0.3), (16 / 9, 0.2), (1.0, 0.1))
_LANDSCAPE = 0.75
_MP100_QUALITY = (85, 95)
_UNIT_SIDE = 192
GLYPHS = Glyphs.from_specs(GLYPH_SHAPES, GLYPH_FILLS, len(GLYPH_KEYS))  # the look of each vocabulary entry


# --------------------------------------------------------------------------- splits


Splits = dict[int, dict[str, list[Category]]]  # split -> subset -> categories


def _assign_splits(categories: list[Category], seed: int) -> Splits:
    """Split -> subset -> categories; test groups partition the categories (70/10/20)."""
    rng = np.random.default_rng([seed, _STREAM_SPLITS])
    n_val = max(1, round(len(categories) / 10))

    def attempt() -> dict[int, dict[str, list[Category]]]:
        groups = np.array_split(rng.permutation(len(categories)), len(SPLITS))
        result = {}
        for k, split in enumerate(SPLITS):
            test = set(groups[k].tolist())
            val = set(groups[(k + 1) % len(SPLITS)][:n_val].tolist())
            train = set(range(len(categories))) - test - val
            result[split] = {name: [categories[i] for i in sorted(members)]
                             for name, members in zip(SUBSETS, (train, val, test))}
        return result

    def fair(splits: dict[int, dict[str, list[Category]]]) -> bool:
        """Every test set holds a category whose supercategory is seen in training."""
        return all(
            {c.template.supercategory for c in s["test"]}
            & {c.template.supercategory for c in s["train"]}
            for s in splits.values()
        )

    for _ in range(1000):
        splits = attempt()
        if fair(splits):
            return splits
    raise RuntimeError(f"no fair split found for {len(categories)} categories (seed {seed})")


def _seen_with_another_look(test: list[Category], train: list[Category]) -> bool:
    """The polysemy rule on one split: every test category has a training category of its own
    supercategory, and shares a polysemous name with a training category of another supercategory."""
    for c in test:
        others = [t for t in train if t.template.supercategory != c.template.supercategory]
        if len(others) == len(train) or not any(c.polysemous_names & t.polysemous_names for t in others):
            return False
    return True


def _pick(order: list[int], n: int, fits: Callable[[list[int]], bool]) -> list[int] | None:
    """``n`` of ``order`` taken greedily in order, each kept only while the chosen ones still ``fits``."""
    chosen: list[int] = []
    for i in order:
        if fits([*chosen, i]):
            chosen.append(i)
            if len(chosen) == n:
                return chosen
    return None


def _polysemy_splits(categories: list[Category], seed: int) -> Splits:
    """Split -> subset -> categories under the polysemy-stress rule (module docstring).

    A test set is taken greedily from the categories with a polysemous name, the least tested so far first
    (ties in a seeded order), each kept while the rule holds with the others in training; validation is
    then taken from a seeded order of the rest, each kept while the rule still holds. A test set equal to
    an earlier split's is drawn again. ``ValueError`` naming ``--categories`` when no split is found.
    """
    rng = np.random.default_rng([seed, _STREAM_POLYSEMY])
    n_test, n_val = max(1, round(len(categories) / 5)), max(1, round(len(categories) / 10))
    everyone = set(range(len(categories)))
    eligible = np.array([i for i, c in enumerate(categories) if c.polysemous_names], dtype=np.int64)

    def holds(test: list[int], val: list[int] | tuple[()] = ()) -> bool:
        train = sorted(everyone - set(test) - set(val))
        return _seen_with_another_look([categories[i] for i in test], [categories[i] for i in train])

    tested, seen, result = np.zeros(len(categories), dtype=np.int64), set(), {}
    for split in SPLITS:
        for _ in range(_POLYSEMY_ATTEMPTS):
            order = eligible[np.lexsort((rng.random(len(eligible)), tested[eligible]))].tolist()
            test = _pick(order, n_test, holds)
            if test is None or frozenset(test) in seen:
                continue
            val = _pick(rng.permutation(sorted(everyone - set(test))).tolist(), n_val, partial(holds, test))
            if val is not None:
                break
        else:
            raise ValueError(f"--split-rule polysemy found no split {split} of {len(categories)} categories whose "
                             f"{n_test} test categories each share a polysemous name with a training category of "
                             "another supercategory; use more categories (--categories)")
        seen.add(frozenset(test))
        tested[test] += 1
        train = everyone - set(test) - set(val)
        result[split] = {name: [categories[i] for i in sorted(members)]
                         for name, members in zip(SUBSETS, (train, val, test))}
    return result


_SPLITTERS: dict[str, Callable[[list[Category], int], Splits]] = {
    "default": _assign_splits, "polysemy": _polysemy_splits}


# --------------------------------------------------------------------------- images and annotations


def _annotation(instance: Instance, visible: np.ndarray, mask: Image.Image, ann_id: int,
                image_id: int) -> dict:
    """The COCO annotation of one instance (v=0 keypoints stored as 0, 0, 0)."""
    keypoints: list[float] = []
    for k, i in enumerate(instance.category.kept):
        x, y = instance.points[i]
        keypoints += [round(float(x), 2), round(float(y), 2), 2] if visible[k] else [0, 0, 0]
    left, top, right, bottom = mask.getbbox() or (0, 0, 0, 0)
    shown = instance.points[list(instance.category.kept)][visible]
    if len(shown):
        r = instance.glyph_radius
        left, top = min(left, float(shown[:, 0].min() - r)), min(top, float(shown[:, 1].min() - r))
        right, bottom = max(right, float(shown[:, 0].max() + r)), max(bottom, float(shown[:, 1].max() + r))
    left, top = max(0.0, left), max(0.0, top)
    right, bottom = min(float(mask.width), right), min(float(mask.height), bottom)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": instance.category.id,
        "bbox": [round(left, 2), round(top, 2), round(right - left, 2), round(bottom - top, 2)],
        "keypoints": keypoints,
        "num_keypoints": int(visible.sum()),
        "area": float(np.count_nonzero(np.asarray(mask))),
        "iscrowd": 0,
    }


def _image_size(rng: np.random.Generator, full_size: bool, mp100_sized: bool) -> np.ndarray:
    """(width, height): uniform sides, or with ``mp100_sized`` a camera photo's long side and aspect."""
    if not mp100_sized:
        low, high = _SIZES[full_size]
        return rng.integers(low, high + 1, 2)
    long_side = int(rng.integers(_MP100_LONG_SIDE[0], _MP100_LONG_SIDE[1] + 1))
    aspects, odds = zip(*_CAMERA_ASPECTS)
    short_side = round(long_side / aspects[rng.choice(len(aspects), p=odds)])
    return np.array((long_side, short_side) if rng.random() < _LANDSCAPE else (short_side, long_side))


def _render_category(category: Category, categories: list[Category], out: Path, seed: int, count: int,
                     full_size: bool, mp100_sized: bool = False) -> Iterator[tuple[dict, list[dict]]]:
    """Render and write the images of one category; yield each image record and its annotations."""
    rng = np.random.default_rng([seed, category.index, 1])
    block = 10 ** max(3, len(str(count)))
    folder = out / "images" / category.name
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(count):
        image_id = category.index * block + j + 1
        size = _image_size(rng, full_size, mp100_sized)
        unit = min(size) / _UNIT_SIDE if mp100_sized else 1.0  # stroke and texture scale
        scene = draw_scene(category, categories, rng, size, GLYPHS, unit)
        quality = _JPEG_QUALITY
        if mp100_sized:
            quality = int(rng.integers(_MP100_QUALITY[0], _MP100_QUALITY[1] + 1))
        file_name = f"{category.name}/{image_id:06d}.jpg"
        _write(out / "images" / file_name, lambda tmp: scene.image.save(tmp, "JPEG", quality=quality))
        record = {"id": image_id, "file_name": file_name, "width": int(size[0]), "height": int(size[1])}
        yield record, [_annotation(*drawn, image_id * 10 + k + 1, image_id)
                       for k, drawn in enumerate(zip(scene.instances, scene.visible, scene.masks))]


# --------------------------------------------------------------------------- output


def _write(path: Path, save: Callable[[Path], object]) -> None:
    """Write through ``save(tmp_path)`` then atomically move into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate(out: str | Path, seed: int = 0, categories: int | None = None,
             images_per_category: int | None = None, full_size: bool = False,
             progress: bool = True, mp100_sized: bool = False, split_rule: str = "default") -> dict:
    """Write the synthetic MP-100 dataset under ``out`` and return a summary.

    ``categories`` / ``images_per_category`` default to 20 / 30, or 100 / 180 with
    ``full_size`` (which also doubles the image sides). ``mp100_sized`` draws MP-100-like
    image sizes and JPEG qualities instead (see the module docstring). ``split_rule``
    (``SPLIT_RULES``) chooses the splits; the images are the same either way. Raises
    ``ValueError('<what> (<where>)')`` on out-of-range arguments, before writing anything.
    """
    default_categories, default_images = _DEFAULT_COUNTS[full_size]
    categories = default_categories if categories is None else categories
    images_per_category = default_images if images_per_category is None else images_per_category
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed} (--seed)")
    if not MIN_CATEGORIES <= categories <= MAX_CATEGORIES:
        raise ValueError(f"categories must be in {MIN_CATEGORIES}..{MAX_CATEGORIES}, "
                         f"got {categories} (--categories)")
    if images_per_category < 2:
        raise ValueError(f"images per category must be >= 2, got {images_per_category} "
                         "(--images-per-category)")
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"split rule must be one of {list(SPLIT_RULES)}, got {split_rule!r} (--split-rule)")
    start, out = time.perf_counter(), Path(out)
    cats = make_categories(seed, categories)
    splits = _SPLITTERS[split_rule](cats, seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images: dict[int, list[dict]] = {c.id: [] for c in cats}
    annotations: dict[int, list[dict]] = {c.id: [] for c in cats}
    with tqdm(total=categories * images_per_category, unit="img", desc="synthetic MP-100",
              disable=not progress) as bar:
        for category in cats:
            for record, anns in _render_category(category, cats, out, seed, images_per_category,
                                                 full_size, mp100_sized):
                images[category.id].append(record)
                annotations[category.id].extend(anns)
                bar.update()
    for split, subsets in splits.items():
        for subset, members in subsets.items():
            info = {"description": "capenext synthetic MP-100", "seed": seed, "split": split, "subset": subset}
            if split_rule != "default":  # the default rule's files stay as they were
                info["split_rule"] = split_rule
            data = {
                "info": info,
                "images": [r for c in members for r in images[c.id]],
                "annotations": [a for c in members for a in annotations[c.id]],
                "categories": [c.coco() for c in members],
            }
            text = json.dumps(data, separators=(",", ":"))
            _write(annotation_path(out, split, subset), lambda tmp: tmp.write_text(text))
    return {
        "out": str(out),
        "categories": categories,
        "images": sum(map(len, images.values())),
        "annotations": sum(map(len, annotations.values())),
        "keypoint_names": len({name for c in cats for name in c.keypoints}),
        "seconds": round(time.perf_counter() - start, 2),
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.synthetic",
        description="Generate a synthetic MP-100-layout CAPE benchmark (5 category-disjoint "
                    "splits, COCO keypoint json, JPEG images).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--categories", type=int, default=None,
                        help=f"number of categories, {MIN_CATEGORIES}..{MAX_CATEGORIES} "
                             "(default 20, or 100 with --full-size)")
    parser.add_argument("--images-per-category", type=int, default=None,
                        help="images per category, >= 2 (default 30, or 180 with --full-size)")
    parser.add_argument("--full-size", action="store_true",
                        help="benchmark size: 100 categories x 180 images, 256..512 px sides")
    parser.add_argument("--mp100-sized", action="store_true",
                        help="MP-100-like camera photos: long side 600..1600 px, aspect 4:3, 3:2, 16:9 "
                             "or 1:1, JPEG quality 85..95; objects scale with the image (combines "
                             "with --full-size)")
    parser.add_argument("--split-rule", choices=SPLIT_RULES, default="default",
                        help="how the 5 splits are chosen, same images and categories either way. default: "
                             "the test sets partition the categories (70/10/20). polysemy: every test "
                             "category has a polysemous keypoint name that a training category of another "
                             "supercategory also has, and its own supercategory in training; 20%% of the "
                             "categories per test set (4 of 20), 10%% validation; the test sets need not "
                             "partition the categories (default: default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = generate(args.out, seed=args.seed, categories=args.categories,
                           images_per_category=args.images_per_category, full_size=args.full_size,
                           progress=not args.quiet, mp100_sized=args.mp100_sized, split_rule=args.split_rule)
    except OSError as error:
        raise UsageError(f"{error.strerror or error} ({error.filename or args.out})") from error
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
