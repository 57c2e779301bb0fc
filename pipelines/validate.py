"""Audit a user's MP-100 copy before anything runs: ``python -m pipelines.validate --data-root DIR [--json]``.

Checks the 15 annotation files and their schema (with the data layer's own parser, in its collecting
mode, so the messages are the ones the loader would raise), the categories of every split, every image
the json references (exists, is complete, decodes as the loader decodes it, and its size after the EXIF
orientation is applied matches the json), keypoint list lengths, skeleton indices, annotations and
categories that differ between files, and what cleaning will drop.

Prints a summary (categories, images and annotations per split; problems grouped by kind and by
top-level image folder, with the first few examples) and exits 1 when a problem would stop the shard job
(``pipelines.shard``), 0 otherwise. Warnings (images no surviving annotation uses, splits whose subsets
share categories, tiny categories, EXIF-rotated images ...) do not fail the audit. ``--json`` prints the
same report as JSON on stdout.

Real MP-100 is assembled from 13 datasets: mixed formats (JPEG, PNG ...) and modes (RGB, L, RGBA, P,
CMYK), odd folder names, non-contiguous ids, categories without a skeleton and several instances per
image are all valid and only counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capenext.cli import run_main
from capenext.data.mp100 import SPLITS, SUBSETS, DataError
from capenext.files import unsafe_file_name
from capenext.data.source import BadImage, Source, collect, read_checked

ERROR, WARNING = "error", "warning"
EXAMPLES = 3  # examples shown per kind of problem
NO_FOLDER = "(no image)"


@dataclass
class Problem:
    kind: str  # "missing image", "skeleton index" ...
    severity: str  # "error" stops the shard job; "warning" does not
    folder: str  # top-level image folder the problem concerns, or NO_FOLDER
    message: str  # one line naming the file and the record


def top_folder(file_name: str | None) -> str:
    """``"dog_face/000001.jpg"`` → ``"dog_face"``; a bare file name → ``"."``."""
    if not file_name:
        return NO_FOLDER
    parts = Path(file_name).parts
    return parts[0] if len(parts) > 1 else "."


# ---------------------------------------------------------------- images


@dataclass
class ImageInfo:
    file_name: str
    width: int
    height: int
    used_by: list[int]  # ids of surviving annotations on this image (empty: no sample needs it)
    format: str = ""
    mode: str = ""
    problem: BadImage | None = None
    orientation: int = 1  # EXIF orientation tag (1 = none)


def inspect_image(root: Path, info: ImageInfo) -> ImageInfo:
    """Fill in format, mode, EXIF orientation, or the problem of one image (thread-safe)."""
    from PIL import Image

    try:
        data = read_checked(root / info.file_name, info.width, info.height)
    except BadImage as err:
        info.problem = err
        return info
    with Image.open(io.BytesIO(data)) as im:
        info.format, info.mode = im.format or "?", im.mode
        try:
            info.orientation = int(im.getexif().get(0x0112, 1))
        except Exception:  # a broken EXIF block is not our problem
            info.orientation = 1
    return info


def referenced_images(source: Source, problems: list[Problem]) -> list[ImageInfo]:
    """Every image record of every file, one per file name; conflicting sizes are reported."""
    used: dict[str, list[int]] = defaultdict(list)
    for s in source.samples:
        used[s.file_name].append(s.ann_id)
    infos: dict[str, ImageInfo] = {}
    for fname, records in source.raw_images.items():
        for im in records.values():
            name, w, h = im.get("file_name"), im.get("width"), im.get("height")
            if not isinstance(name, str) or not isinstance(w, int) or not isinstance(h, int):
                continue  # reported by the data layer already
            if unsafe_file_name(name) is not None:
                continue  # outside the image folder: reported by the data layer, never opened here
            known = infos.setdefault(name, ImageInfo(name, w, h, used.get(name, [])))
            if (known.width, known.height) != (w, h):
                problems.append(Problem(
                    "image size conflict", ERROR if known.used_by else WARNING, top_folder(name),
                    f"{fname}: image {im['id']} ({name}) is {w}x{h}, another record says "
                    f"{known.width}x{known.height}"))
    return sorted(infos.values(), key=lambda i: i.file_name)


def check_images(source: Source, infos: list[ImageInfo], workers: int, progress: bool) -> list[Problem]:
    """Decode every image in a thread pool (OpenCV and PIL release the GIL while decoding)."""
    from tqdm import tqdm

    root = source.image_root
    problems = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda i: inspect_image(root, i), infos)
        for info in tqdm(results, total=len(infos), unit="img", desc="images",
                         disable=None if progress else True):
            problems.extend(_image_problems(root, info))
    return problems


def _image_problems(root: Path, info: ImageInfo) -> list[Problem]:
    folder = top_folder(info.file_name)
    ids = info.used_by
    listed = ", ".join(map(str, ids[:5])) + (" ..." if len(ids) > 5 else "")
    who = f"annotation{'s' if len(ids) > 1 else ''} {listed}" if ids else "no surviving annotation uses it"
    out = []
    if info.problem is not None:
        out.append(Problem(info.problem.kind, ERROR if ids else WARNING, folder,
                           f"{root / info.file_name}: {info.problem.kind}, {info.problem.reason} ({who})"))
    elif info.orientation != 1:
        out.append(Problem("exif orientation", WARNING, folder,
                           f"{root / info.file_name}: EXIF orientation {info.orientation} is applied when "
                           f"decoding (as the reference does), so its keypoints must be in the oriented frame "
                           f"({who})"))
    return out


# ---------------------------------------------------------------- splits


def split_problems(source: Source) -> list[Problem]:
    """Category lists per split: subsets that share categories, splits that cover different data."""
    out = []
    all_ids = {s.ann_id for s in source.samples}
    all_cats = set(source.categories)
    for split, subsets in sorted(source.splits.items()):
        names = sorted(subsets)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                shared = sorted(set(subsets[a]) & set(subsets[b]))
                if shared:
                    out.append(Problem("split overlap", WARNING, NO_FOLDER,
                                       f"split {split}: {a} and {b} share categories {shared[:10]} (splits "
                                       "should be category-disjoint)"))
        if len(subsets) == len(SUBSETS):
            missing = sorted(all_cats - {c for cats in subsets.values() for c in cats})
            if missing:
                out.append(Problem("split coverage", WARNING, NO_FOLDER,
                                   f"split {split}: categories {missing[:10]} are in no subset of this split"))
            ids = {s.ann_id for (k, _), sub in source.subsets.items() if str(k) == split for s in sub.samples}
            if ids != all_ids:
                out.append(Problem("split coverage", WARNING, NO_FOLDER,
                                   f"split {split}: holds {len(ids)} of the {len(all_ids)} annotations the "
                                   "splits hold together"))
    for (split, name), sub in sorted(source.subsets.items()):
        for cid, idx in sorted(sub.by_category().items()):
            if len(idx) < 2:
                out.append(Problem("small category", WARNING, NO_FOLDER,
                                   f"{sub.path}: category {cid} ({sub.categories[cid].name}) has {len(idx)} "
                                   "annotation(s) after cleaning; an episode needs 2"))
    return out


# ---------------------------------------------------------------- the report


def validate(data_root: str | Path, progress: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Audit ``data_root``; returns the report (``report["ok"]`` is False when the shard job would stop)."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {root}: not a directory")
    errors: list[DataError] = []
    source = collect(root, errors)
    problems = [Problem(e.kind, ERROR, top_folder(e.image), str(e)) for e in errors]
    if not (root / "images").is_dir():
        problems.append(Problem("layout", ERROR, NO_FOLDER,
                                f"{root / 'images'}: no images/ folder (file_name in the json is relative to it)"))
    problems.extend(split_problems(source))
    infos = referenced_images(source, problems)
    problems.extend(check_images(source, infos, workers or min(8, 2 * (os.cpu_count() or 1)), progress))
    bad_files = {i.file_name for i in infos if i.problem is not None}
    usable = sum(1 for s in source.samples if s.file_name not in bad_files)
    n_err = sum(p.severity == ERROR for p in problems)
    return {
        "data_root": str(root),
        "ok": n_err == 0,
        "errors": n_err,
        "warnings": len(problems) - n_err,
        "splits": _split_summary(source),
        "union": {
            "categories": len(source.categories),
            "categories_without_skeleton": sum(not c.skeleton for c in source.categories.values()),
            "images": len(infos),
            "annotations": len(source.samples),
            "usable_annotations": usable,
            "formats": dict(Counter(i.format for i in infos if i.format).most_common()),
            "modes": dict(Counter(i.mode for i in infos if i.mode).most_common()),
        },
        "problems": group(problems),
    }


def _split_summary(source: Source) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        for name in SUBSETS:
            sub = source.subsets.get((split, name))
            row: dict[str, Any] = {"categories": 0, "images": 0, "annotations": 0, "dropped": {},
                                   "readable": False}
            if sub is not None:
                row = {**{k: v for k, v in sub.summary().items() if k != "keypoints"},
                       "dropped": dict(sorted(sub.dropped.items())), "readable": True}
            out.setdefault(str(split), {})[name] = row
    return out


def group(problems: list[Problem]) -> list[dict[str, Any]]:
    """Problems grouped by (severity, kind): count, count per top-level folder, the first few messages."""
    groups: dict[tuple[str, str], list[Problem]] = defaultdict(list)
    for p in problems:
        groups[(p.severity, p.kind)].append(p)
    out = []
    for (severity, kind), items in sorted(groups.items(), key=lambda kv: (kv[0][0] != ERROR, kv[0][1])):
        out.append({
            "kind": kind,
            "severity": severity,
            "count": len(items),
            "folders": dict(Counter(p.folder for p in items).most_common()),
            "examples": [p.message for p in items[:EXAMPLES]],
        })
    return out


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary."""
    lines = [f"MP-100 audit of {report['data_root']}", "",
             f"{'split':<6}{'subset':<7}{'categories':>11}{'images':>8}{'annotations':>12}  dropped by cleaning"]
    for split, subsets in report["splits"].items():
        for name, row in subsets.items():
            dropped = ", ".join(f"{k} {v}" for k, v in row["dropped"].items()) or "-"
            if not row["readable"]:
                dropped = "(file unreadable)"
            lines.append(f"{split:<6}{name:<7}{row['categories']:>11}{row['images']:>8}{row['annotations']:>12}  "
                         f"{dropped}")
    u = report["union"]
    fmt = ", ".join(f"{k} {v}" for k, v in u["formats"].items()) or "-"
    modes = ", ".join(f"{k} {v}" for k, v in u["modes"].items()) or "-"
    lines += ["", f"all splits: {u['categories']} categories "
                  f"({u['categories_without_skeleton']} without skeleton), "
                  f"{u['images']} images ({fmt}; modes {modes}), {u['annotations']} annotations after cleaning, "
                  f"{u['usable_annotations']} with a good image", ""]
    if report["problems"]:
        lines.append("problems:")
    for g in report["problems"]:
        folders = ", ".join(f"{k} {v}" for k, v in list(g["folders"].items())[:8])
        more = " ..." if len(g["folders"]) > 8 else ""
        lines.append(f"  {g['severity'].upper():<8}{g['kind']} x{g['count']}  (by folder: {folders}{more})")
        lines += [f"            e.g. {m}" for m in g["examples"]]
    if report["ok"]:
        lines.append(f"OK: nothing stops the shard job ({report['warnings']} warning(s)).")
    else:
        lines.append(f"FAIL: {report['errors']} problem(s) would stop the shard job (python -m pipelines.shard); "
                     "image problems can be skipped there with --skip-bad.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.validate",
        description="Audit an MP-100 copy (annotations/mp100_split{1..5}_{train,val,test}.json + images/): json "
                    "schema, categories per split, every referenced image (exists, decodes, size), keypoint "
                    "lengths, skeleton indices, what cleaning drops. Exit 1 when a problem would stop "
                    "python -m pipelines.shard, 0 otherwise.",
    )
    p.add_argument("--data-root", type=Path, required=True, help="the MP-100 root folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--workers", type=int, default=None, help="threads decoding images (default 2 x cores, max 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = validate(args.data_root, progress=not args.quiet, workers=args.workers)
    text = json.dumps(report, indent=1) if args.json else format_report(report)
    print(text, flush=True)
    if not report["ok"]:
        print(f"error: {report['errors']} problem(s) in {args.data_root} would stop the shard job "
              "(see the report above)", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_main(main)

