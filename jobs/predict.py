"""Keypoints on your own images: ``python -m jobs.predict --checkpoint X --image IMG --keypoints "..." --class NAME``.

Text-only CAPE: no support image, only the keypoint names (all taken as visible), the class name and an
optional skeleton. For each image it prints one JSON line on stdout::

    {"image": "cat.jpg", "width": 640, "height": 480, "bbox": [0, 0, 640, 480], "class": "cat",
     "keypoints": [{"name": "nose", "x": 312.4, "y": 201.9, "score": 0.83}, ...], "picture": "cat.keypoints.png"}

(``x, y`` in original image pixels; ``score`` in [0, 1], see :mod:`capenext.predict`) and writes the
image with the keypoints, their names and the skeleton drawn. ``--images DIR`` does every image of a
folder (not recursive; .jpg .jpeg .png .bmp .webp .tif .tiff .gif), one line and one picture each.

Keypoint texts: the names as given, or, with ``--descriptions FILE [--text-variant V]``, the texts that
file gives the category (the reference's rules match the class name, and the keypoints file's
``supercategory`` and ``id`` when it has them: an MP-100 category record); the JSON keeps the names.

The checkpoint is a file, ``runs:/<run_id>/checkpoints/final.pt`` or a training run id (read from the
MLflow tracking store). It runs on CPU; weights load with ``weights_only=True``. Every bad input (an
unreadable image, no names, more than 100 names, a skeleton index out of range, a bbox outside the
image, a checkpoint of an unknown config) is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from capenext.cli import UsageError, run_main
from jobs.common import CHECKPOINT_HELP

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.predict",
        description="Predict keypoints on your own images from their names (no support image) with a trained "
                    "CapeNext checkpoint: prints one JSON line per image (name, x, y in image pixels, score) and "
                    "writes each image with the keypoints, names and skeleton drawn.",
        epilog="examples:\n"
               "  python -m jobs.predict --checkpoint final.pt --image cat.jpg --keypoints \"nose,left eye,right eye\" "
               "--class cat --skeleton 0-1,0-2 --out cat_pred.png\n"
               "  python -m jobs.predict --checkpoint runs:/<run_id>/checkpoints/final.pt --images photos/ "
               "--keypoints-file chair.json --out predictions/\n"
               "keypoints file: {\"class\": \"chair\", \"names\": [\"seat\", ...], \"skeleton\": [[0, 1], ...]} "
               "(an MP-100 category record, {\"name\", \"keypoints\", \"skeleton\"}, works too)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="one image file")
    src.add_argument("--images", type=Path, metavar="DIR", help="every image in a folder")
    kp = p.add_mutually_exclusive_group(required=True)
    kp.add_argument("--keypoints", metavar="NAMES", help="comma-separated keypoint names, e.g. \"nose,left eye\"")
    kp.add_argument("--keypoints-file", type=Path, metavar="JSON",
                    help="JSON with class, names and (optional) skeleton")
    p.add_argument("--class", dest="class_name", default=None,
                   help="the object's category, e.g. cat (overrides the keypoints file's)")
    p.add_argument("--skeleton", default=None,
                   help="edges between keypoints as 0-based index pairs, e.g. 0-1,0-2 (overrides the file's)")
    p.add_argument("--bbox", default=None, metavar="X,Y,W,H",
                   help="box around the object in image pixels (default: the whole image); with --images it "
                        "applies to every image")
    p.add_argument("--out", type=Path, default=None,
                   help="picture to write: with --image a PNG path (default ./<image stem>.keypoints.png; an "
                        "existing folder gets <stem>.keypoints.png inside), with --images a folder "
                        "(default ./predictions)")
    p.add_argument("--descriptions", default=None,
                   help="give the model the texts of this descriptions file (python -m pipelines.descriptions) for "
                        "the category instead of the names (default: the training config's file, if any)")
    p.add_argument("--text-variant", default=None,
                   help="which of the reference's texts the descriptions file gives (default: the config's, regular)")
    p.add_argument("--clip-precision", choices=("fp32", "fp16"), default=None,
                   help="CLIP's precision (default: the config's, fp32); fp16 as the reference on a GPU, CUDA only")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--clip-checkpoint", default=None,
                   help="where the frozen CLIP's weights are on this machine (default: the training config's)")
    return p.parse_args(argv)


def read_keypoints_file(path: Path) -> dict[str, Any]:
    """``{"class", "names", "skeleton"}`` (or an MP-100 category record); one-line errors."""
    if not path.is_file():
        raise FileNotFoundError(f"keypoints file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid json ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{\"class\", \"names\", \"skeleton\"}}")
    names = data.get("names", data.get("keypoints"))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: 'names' must be a list of strings (the keypoint names)")
    cls = data.get("class", data.get("name"))
    if cls is not None and not isinstance(cls, str):
        raise ValueError(f"{path}: 'class' must be a string")
    skeleton = data.get("skeleton") or []
    if not isinstance(skeleton, list):
        raise ValueError(f"{path}: 'skeleton' must be a list of [a, b] index pairs")
    return {"class": cls, "names": names, "skeleton": skeleton,
            "supercategory": str(data.get("supercategory", "")), "id": data.get("id")}


def described(names: list[str], class_name: str | None, spec: dict[str, Any], descriptions: str | None,
              variant: str) -> list[str]:
    """The texts the model reads for ``names``: the names, or what the descriptions file gives the category."""
    from capenext.data.mp100 import Category, load_descriptions

    desc = load_descriptions(descriptions, variant) if descriptions else None
    if desc is None:
        return list(names)
    cat = Category(spec.get("id") if isinstance(spec.get("id"), int) else -1, class_name or "",
                   spec.get("supercategory", ""), tuple(names), ())
    return list(desc.apply(cat, f"category {class_name!r}").keypoints)


def image_files(args: argparse.Namespace) -> list[Path]:
    if args.image is not None:
        if not args.image.is_file():
            raise FileNotFoundError(f"image not found: {args.image}")
        return [args.image]
    if not args.images.is_dir():
        raise FileNotFoundError(f"--images: no such folder: {args.images}")
    found = sorted(p for p in args.images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"--images: no image files in {args.images} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return found


def picture_path(args: argparse.Namespace, image: Path) -> Path:
    if args.images is not None:
        return (args.out or Path("predictions")) / f"{image.stem}.png"
    if args.out is None:
        return Path(f"{image.stem}.keypoints.png")
    if args.out.is_dir():
        return args.out / f"{image.stem}.keypoints.png"
    return args.out


def main(argv: list[str] | None = None) -> int:
    import torch

    from capenext.predict import (Predictor, check_bbox, check_names, check_skeleton, load_image, parse_bbox,
                                  parse_skeleton)
    from capenext.viz import draw_keypoints

    args = parse_args(argv)
    if args.keypoints_file is not None:
        spec = read_keypoints_file(args.keypoints_file)
    else:
        parts = [n.strip() for n in args.keypoints.split(",")]
        if not any(parts):
            raise UsageError("no keypoint names: --keypoints is empty (e.g. --keypoints \"nose,left eye\")")
        if not all(parts):
            raise UsageError(f"--keypoints has an empty name at position {parts.index('')}: {args.keypoints!r}")
        spec = {"class": None, "names": parts, "skeleton": [], "supercategory": "", "id": None}
    names = spec["names"]
    class_name = args.class_name if args.class_name is not None else spec["class"]
    skeleton = parse_skeleton(args.skeleton) if args.skeleton is not None else spec["skeleton"]
    bbox = parse_bbox(args.bbox) if args.bbox is not None else None
    from capenext.config import MAX_KEYPOINTS

    check_names(names, MAX_KEYPOINTS)  # cheap checks before the model loads (again against the model's slots)
    check_skeleton(skeleton, len(names))
    files = image_files(args)
    first = None
    if args.image is not None:  # one image: a bad file or box fails before the model loads
        first = load_image(files[0])
        check_bbox(bbox, first.shape[1], first.shape[0])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but no CUDA device is visible")
    if args.clip_precision == "fp16" and not args.device.startswith("cuda"):
        raise UsageError("--clip-precision fp16 runs on a CUDA device only (the reference's GPU setting): add "
                         "--device cuda, or use fp32")
    texts = described(names, class_name, spec, args.descriptions, args.text_variant or "regular")

    with tempfile.TemporaryDirectory(prefix="capenext-predict-") as tmp:
        ckpt = args.checkpoint
        if not Path(ckpt).is_file():
            from jobs.common import resolve_checkpoint
            from jobs.tracking import tracking_uri

            ckpt = resolve_checkpoint(ckpt, tracking_uri(), Path(tmp)).path
        predictor = Predictor(ckpt, clip_checkpoint=args.clip_checkpoint, device=args.device)
    if predictor.model.needs_class_embedding and not class_name:
        raise UsageError(f"the checkpoint's {predictor.cfg.model.ablation!r} model reads a class name: pass "
                         "--class NAME (or 'class' in the keypoints file)")
    cfg = predictor.cfg
    if args.descriptions is None and cfg.data.descriptions is not None:  # the training config's texts
        if not Path(cfg.data.descriptions).is_file():
            raise UsageError(f"the checkpoint was trained with --descriptions {cfg.data.descriptions}, which is not on "
                             "this machine: pass --descriptions FILE")
        texts = described(names, class_name, spec, cfg.data.descriptions, args.text_variant or cfg.data.text_variant)
    elif args.descriptions is None and args.text_variant is not None:
        raise UsageError(f"--text-variant {args.text_variant} needs --descriptions FILE (python -m pipelines.descriptions)")
    precision = args.clip_precision or cfg.model.clip_precision
    if precision != predictor.model.clip.precision:
        from capenext.models.clip import FrozenCLIP

        if precision == "fp16" and not args.device.startswith("cuda"):
            raise UsageError("the checkpoint's CLIP runs in fp16, on a CUDA device only: add --device cuda, or "
                             "pass --clip-precision fp32")
        cfg.model.clip_precision = precision
        predictor.model.clip = FrozenCLIP.from_cfg(cfg.model).to(predictor.device)

    for i, path in enumerate(files):
        image = first if (i == 0 and first is not None) else load_image(path)
        points = predictor.predict(image, texts, class_name, skeleton, bbox)
        for p, name in zip(points, names):  # the names as given; the model read ``texts``
            p["name"] = name
        out = picture_path(args, path)
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_keypoints(image, [[p["x"], p["y"]] for p in points], names, skeleton,
                       [p["score"] for p in points], bbox=bbox).save(out, format="PNG")
        h, w = image.shape[:2]
        record = {
            "image": str(path), "width": w, "height": h,
            "bbox": list(bbox) if bbox is not None else [0, 0, w, h], "class": class_name,
            "keypoints": [{"name": p["name"], "x": round(p["x"], 2), "y": round(p["y"], 2),
                           "score": round(p["score"], 4)} for p in points],
            "picture": str(out),
        }
        print(json.dumps(record), flush=True)
        if len(files) > 1:
            print(f"[{i + 1}/{len(files)}] {path.name} → {out}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
