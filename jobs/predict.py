"""Keypoints on your own images: ``python -m jobs.predict --checkpoint X --image IMG --keypoints "..." --class NAME``.

Text-only CAPE: no support image, only the keypoint names (all taken as visible), the class name and an
optional skeleton. For each image it prints one JSON line on stdout::

    {"image": "cat.jpg", "width": 640, "height": 480, "bbox": [0, 0, 640, 480], "class": "cat",
     "keypoints": [{"name": "nose", "x": 312.4, "y": 201.9, "score": 0.83, "inside_image": true}, ...],
     "picture": "cat.keypoints.png"}

(``x, y`` in original image pixels; ``score`` in [0, 1], see :mod:`capenext.predict`) and writes the
image with the keypoints, their names and the skeleton drawn. ``--images DIR`` does every image of a
folder (not recursive; .jpg .jpeg .png .bmp .webp .tif .tiff .gif), one line and one picture each.

Keypoint texts: the names as given, or, with ``--descriptions FILE [--text-variant V]``, the texts that
file gives the category (the reference's rules match the class name, and the keypoints file's
``supercategory`` and ``id`` when it has them: an MP-100 category record); the JSON keeps the names.

The checkpoint is a file, ``runs:/<run_id>/checkpoints/final.pt``, a training run id or a registered model
(``models:/NAME@ALIAS``), read from the MLflow store ``--tracking-uri``. It runs on CPU (or ``--device
cuda``); weights load with ``weights_only=True``. The names, class, skeleton and box are read and checked by
:mod:`capenext.inputs`, as the server reads them. Every bad input (an unreadable image, no names, more than
100 names, a skeleton index out of range, a bbox outside the image, a checkpoint of an unknown config) is
one ``error:`` line and exit code 2.

``--runtime onnx --onnx DIR`` (:func:`capenext.options.add_runtime`, as ``jobs.serve`` takes them) runs the
folder ``python -m jobs.export`` wrote from the same checkpoint with onnxruntime on CPU instead of PyTorch; the
points agree within float rounding. Its ``model.json`` sha256 is checked when the model loads, before any
picture is written: a folder exported from another checkpoint is one ``error:`` line and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from capenext.cli import UsageError, run_main
from capenext.options import (
    add_clip_precision,
    add_config_option,
    add_device,
    add_runtime,
    add_tracking_uri,
    check_runtime,
)
from jobs.runtime.checkpoints import CHECKPOINT_HELP

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
    add_config_option(p, "descriptions",
                      help="give the model the texts of this descriptions file (python -m pipelines.descriptions) "
                           "for the category instead of the names (default: the training config's file, if any)")
    add_config_option(p, "text_variant",
                      help="which of the reference's texts the descriptions file gives (default: the config's, "
                           "regular)")
    add_clip_precision(p)
    add_device(p)
    add_runtime(p)
    add_config_option(p, "clip_checkpoint",
                      help="where the frozen CLIP's weights are on this machine (default: the training config's)")
    add_tracking_uri(p)
    return p.parse_args(argv)


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

    from capenext.config import MAX_KEYPOINTS
    from capenext.inputs import (
        check_bbox,
        check_class_name,
        check_names,
        check_skeleton,
        keypoint_texts,
        parse_bbox,
        parse_names,
        parse_skeleton,
        read_keypoints_file,
    )
    from capenext.predict import Predictor, load_image, set_clip_precision
    from capenext.viz import draw_keypoints

    args = parse_args(argv)
    check_runtime(args)
    if args.keypoints_file is not None:
        spec = read_keypoints_file(args.keypoints_file)
    else:
        spec = {"class": None, "names": parse_names(args.keypoints, "--keypoints"), "skeleton": [],
                "supercategory": "", "id": None}
    names = spec["names"]
    class_name = args.class_name if args.class_name is not None else spec["class"]
    skeleton = parse_skeleton(args.skeleton) if args.skeleton is not None else spec["skeleton"]
    bbox = parse_bbox(args.bbox)
    check_names(names, MAX_KEYPOINTS)  # cheap checks before the model loads (again against the model's slots)
    check_skeleton(skeleton, len(names))
    files = image_files(args)
    first = None
    if args.image is not None:  # one image: a bad file or box fails before the model loads
        first = load_image(files[0])
        check_bbox(bbox, first.shape[1], first.shape[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but no CUDA device is visible")
    if args.clip_precision == "fp16" and args.device != "cuda":
        raise UsageError("--clip-precision fp16 runs on a CUDA device only (the reference's GPU setting): add "
                         "--device cuda, or use fp32")

    def texts_from(descriptions: str | None, variant: str) -> list[str]:
        return keypoint_texts(names, class_name, descriptions, variant, spec["supercategory"], spec["id"])

    texts = texts_from(args.descriptions, args.text_variant or "regular")

    with tempfile.TemporaryDirectory(prefix="capenext-predict-") as tmp:
        ckpt = args.checkpoint
        if not Path(ckpt).is_file():
            from jobs.runtime.checkpoints import resolve_checkpoint
            from jobs.runtime.tracking import tracking_uri

            ckpt = resolve_checkpoint(ckpt, tracking_uri(args.tracking_uri), Path(tmp)).path
        predictor = Predictor(ckpt, clip_checkpoint=args.clip_checkpoint, device=args.device, runtime=args.runtime,
                              onnx_dir=args.onnx)
    cfg = predictor.cfg
    check_class_name(class_name, predictor.model.needs_class_embedding, cfg.model.ablation,
                     "pass --class NAME (or 'class' in the keypoints file)")
    if args.descriptions is None and cfg.data.descriptions is not None:  # the training config's texts
        if not Path(cfg.data.descriptions).is_file():
            raise UsageError(f"the checkpoint was trained with --descriptions {cfg.data.descriptions}, which is not on "
                             "this machine: pass --descriptions FILE")
        texts = texts_from(cfg.data.descriptions, args.text_variant or cfg.data.text_variant)
    elif args.descriptions is None and args.text_variant is not None:
        raise UsageError(f"--text-variant {args.text_variant} needs --descriptions FILE (python -m pipelines.descriptions)")
    if args.clip_precision is not None:
        cfg.model.clip_precision = args.clip_precision
    if args.runtime == "torch":  # the exported towers are fp32
        set_clip_precision(predictor.model, cfg, predictor.device)

    for i, path in enumerate(files):
        image = first if (i == 0 and first is not None) else load_image(path)
        points = predictor.predict(image, texts, class_name, skeleton, bbox)
        for p, name in zip(points, names):  # the names as given; the model read ``texts``
            p["name"] = name
        out = picture_path(args, path)
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_keypoints(image, [[p["x"], p["y"]] for p in points], names, skeleton, [p["score"] for p in points],
                       bbox=bbox, inside=[p["inside_image"] for p in points]).save(out, format="PNG")
        h, w = image.shape[:2]
        record = {
            "image": str(path), "width": w, "height": h,
            "bbox": list(bbox) if bbox is not None else [0, 0, w, h], "class": class_name,
            "keypoints": [{"name": p["name"], "x": round(p["x"], 2), "y": round(p["y"], 2),
                           "score": round(p["score"], 4), "inside_image": p["inside_image"]} for p in points],
            "picture": str(out),
        }
        print(json.dumps(record), flush=True)
        if len(files) > 1:
            print(f"[{i + 1}/{len(files)}] {path.name} → {out}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
