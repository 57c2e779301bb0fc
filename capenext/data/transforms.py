"""Image decoding, the top-down crop, the training augmentation and the target heatmaps (mmpose's TopDown
pipeline).

Decoding (:func:`decode_image`) is the reference's: mmcv's ``imfrombytes`` with OpenCV
(``cv2.imdecode(buf, cv2.IMREAD_COLOR)``, then BGR → RGB). So, as there, the EXIF orientation is applied
(a JPEG stored 64 wide × 48 high with orientation 6 decodes to 48 × 64), 16-bit images are scaled to
8 bits, grey images are repeated over three channels, alpha is dropped without compositing, palette
images are expanded and CMYK JPEGs are converted by libjpeg's rule. :func:`decode_for_crop` (behind
``DataCfg.reduced_decode``, off by default) decodes a JPEG only at the resolution its crop needs.

As the reference: the cleaned bbox is expanded to a square around its centre (``_xywh2cs``), scaled by
1.25, and warped affinely to ``S × S`` (``get_affine_transform`` + ``cv2.warpAffine``, bilinear, zero
border); the crop is normalised with ImageNet statistics. The affine map sends the box centre to
``(S/2, S/2)`` (mmpose's convention, not ``(S-1)/2``). Its inverse maps predictions back to image pixels.

Training augmentation (``TopDownGetRandomScaleRotation``): scale ``× clip(N(1, 0.15), 0.85, 1.15)``;
rotation ``clip(N(0, 15°), -30°, 30°)`` applied with probability 0.6; no flip, no colour change.

Targets (``TopDownGenerateTargetFewShot``, MSRA encoding): a Gaussian of sigma 1 on the heatmap grid
(stride ``S / heatmap_size``) centred on the *rounded* keypoint; the target weight is the visibility,
zeroed when the Gaussian patch falls wholly outside the heatmap (:func:`target_weights`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# the formats PIL may open from bytes anywhere in capenext (PIL would otherwise try every format it knows,
# an EPS file among them, which runs Ghostscript where it is installed)
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# OpenCV >= 4.10 decodes straight to RGB: the pixels of IMREAD_COLOR + BGR2RGB, one pass fewer
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """Encoded bytes → RGB uint8 (H, W, 3), decoded as the reference decodes (see the module docstring).

    Raises ValueError, one line naming ``where`` and why, for bytes OpenCV cannot decode.
    """
    buf = np.frombuffer(data, np.uint8)
    image = None
    if buf.size:
        try:
            image = cv2.imdecode(buf, cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB)
        except cv2.error as err:  # e.g. over OpenCV's pixel limit
            raise ValueError(f"cannot decode {where}: {' '.join(str(err).split())[-200:]}") from None
    if image is None:
        raise ValueError(f"cannot decode {where}: {_why_undecodable(data)}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if _IMREAD_RGB is None else image


def _why_undecodable(data: bytes) -> str:
    """A few words on bytes OpenCV refused (PIL names the format or the damage)."""
    if not data:
        return "empty file"
    fmt = None
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            fmt = im.format
            im.load()
    except UnidentifiedImageError:
        return f"not an image file ({len(data)} bytes)"
    except Exception as err:  # PIL raises many types for corrupt files
        return f"corrupt {fmt or 'image'} data ({' '.join(str(err).split())[:200]})"
    return f"OpenCV cannot decode this {fmt} file"


def read_image(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(f.read(), str(path))


def box_center_scale(bbox: tuple[float, float, float, float], padding: float = 1.25) -> tuple[np.ndarray, float]:
    """Square box around the bbox centre: ``(center (2,), side in pixels)`` (mmpose ``_xywh2cs``, aspect 1)."""
    x, y, w, h = bbox
    center = np.array([x + 0.5 * w, y + 0.5 * h], dtype=np.float64)
    return center, max(w, h) * padding


def affine_matrix(center: np.ndarray, side: float, rot_deg: float, size: int) -> np.ndarray:
    """2×3 map from image pixels to crop pixels: centre → (size/2, size/2), ``side`` → ``size``.

    Equal to mmpose's ``get_affine_transform(c, s, r, (size, size))`` with ``s = side / 200``: the
    rotation is counter-clockwise in image coordinates for positive ``rot_deg``.
    """
    k = size / side
    a = np.deg2rad(rot_deg)
    cos, sin = np.cos(a) * k, np.sin(a) * k
    m = np.array([[cos, sin, 0.0], [-sin, cos, 0.0]])
    m[:, 2] = np.array([size / 2.0, size / 2.0]) - m[:, :2] @ center
    return m


def invert_affine(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(m, dtype=np.float64))


def apply_affine(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(..., 2) points through a 2×3 affine map."""
    return points @ m[:, :2].T + m[:, 2]


@dataclass
class Crop:
    image: np.ndarray  # (3, S, S) float32, ImageNet-normalised
    matrix: np.ndarray  # (2, 3) image → crop
    inverse: np.ndarray  # (2, 3) crop → image


def random_scale_rotation(
    rng: np.random.Generator, scale_sigma: float, scale_clip: float, rot_sigma: float, rot_prob: float
) -> tuple[float, float]:
    """The reference's random scale factor and rotation in degrees."""
    s = float(np.clip(rng.normal() * scale_sigma + 1.0, 1.0 - scale_clip, 1.0 + scale_clip))
    r = float(np.clip(rng.normal() * rot_sigma, -2 * rot_sigma, 2 * rot_sigma))
    return s, (r if rng.random() <= rot_prob else 0.0)


# (3, 256): channel c's normalised value of each uint8 level
_NORMALISED = ((np.arange(256, dtype=np.float32)[:, None] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).T.copy()


def normalise(warped: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 → (3, S, S) float32 ``(x / 255 - mean) / std``, through a per-channel table (the same
    float32 operations on each of the 256 values, so the same numbers as computing them per pixel)."""
    out = np.empty((3, *warped.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(_NORMALISED[c], warped[:, :, c], out=out[c])
    return out


def crop(
    image: np.ndarray,
    bbox: tuple[float, float, float, float],
    size: int,
    padding: float = 1.25,
    scale: float = 1.0,
    rot_deg: float = 0.0,
    reduction: int = 1,
) -> Crop:
    """Warp the (scaled, rotated) square box around ``bbox`` to ``size × size``, ImageNet-normalised.

    ``image`` may be the image decoded at 1/``reduction`` of its size (:func:`decode_for_crop`): the warp
    then reads it through the map that sends image pixels to its pixels, and ``matrix`` stays image pixels
    → crop pixels, so keypoints map exactly as with the full image.
    """
    center, side = box_center_scale(bbox, padding)
    m = affine_matrix(center, side * scale, rot_deg, size)
    warp = m if reduction == 1 else m @ reduced_to_full(reduction)
    warped = cv2.warpAffine(image, warp, (size, size), flags=cv2.INTER_LINEAR)
    return Crop(normalise(warped), m, invert_affine(m))


# ---------------------------------------------------------------- decoding only what the crop needs

REDUCTIONS = (8, 4, 2)  # the DCT-domain scales libjpeg decodes to (1/8, 1/4, 1/2)
_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# a reduction is used when the crop still reads at least this many reduced pixels per crop pixel
MIN_REDUCED_STEP = 2.0


def reduced_to_full(r: int) -> np.ndarray:
    """3×3 map from the pixels of an image decoded at 1/r to its full-size pixels: reduced pixel ``i`` is the
    mean of full pixels ``r·i .. r·i + r - 1``, centred at ``r·i + (r - 1) / 2``."""
    return np.array([[r, 0.0, (r - 1) / 2], [0.0, r, (r - 1) / 2], [0.0, 0.0, 1.0]])


def reduction_for(step: float, min_step: float | None = None) -> int:
    """The largest reduction ``r`` (8, 4, 2, else 1) with ``step / r >= min_step`` (default
    :data:`MIN_REDUCED_STEP`), where ``step`` is the crop's sampling step in image pixels (the warped box
    side over the crop side)."""
    min_step = MIN_REDUCED_STEP if min_step is None else min_step
    return next((r for r in REDUCTIONS if step / r >= min_step), 1)


def decode_for_crop(data: bytes, where: str, width: int, height: int, step: float) -> tuple[np.ndarray, int]:
    """``(image, r)``: a JPEG decoded at 1/r in the DCT domain (:func:`reduction_for`; libjpeg's scaled
    IDCT, ``cv2.IMREAD_REDUCED_COLOR_r``), or anything else decoded in full by :func:`decode_image` (r = 1).

    This departs from the reference, which decodes in full and lets the bilinear warp skip pixels: a
    reduced pixel is the mean of r × r full pixels, so the crop is slightly smoother (mean |Δ| of the
    normalised crop about 0.01 on this rule's items); where a pixel lands, and so every target, is the same
    (:func:`crop` with ``reduction=r``).

    The full decode is kept for non-JPEG data, for a JPEG with an EXIF orientation (OpenCV would turn the
    reduced image and its last partial row or column would land on the other side) and whenever the
    reduced size is not ``ceil(width / r) × ceil(height / r)`` of the ``width × height`` image.
    """
    r = reduction_for(step)
    if r == 1 or data[:3] != b"\xff\xd8\xff" or _has_orientation(data):
        return decode_image(data, where), 1
    # IMREAD_REDUCED_COLOR_r is IMREAD_COLOR plus the scale bits: keep the scale, ask for RGB
    flag = _REDUCED_FLAGS[r] if _IMREAD_RGB is None else (_REDUCED_FLAGS[r] & ~cv2.IMREAD_COLOR) | _IMREAD_RGB
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or image.shape[:2] != (-(-height // r), -(-width // r)):
        return decode_image(data, where), 1
    return (cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if _IMREAD_RGB is None else image), r


def _has_orientation(data: bytes) -> bool:
    """Whether a JPEG carries an EXIF orientation other than 1 (no EXIF block: no)."""
    if data.find(b"Exif\x00\x00", 0, 1 << 16) < 0:
        return False
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            return int(im.getexif().get(0x0112, 1)) != 1
    except Exception:  # an unreadable EXIF block: leave the orientation to the full decode
        return True


def target_weights(points: np.ndarray, visible: np.ndarray, image_size: int, heatmap_size: int,
                   sigma: float = 1.0) -> np.ndarray:
    """The reference's target weight (``TopDownGenerateTargetFewShot``, MSRA): the visibility, zeroed for a
    keypoint whose (6σ+1)² Gaussian patch around its rounded heatmap position lies wholly off the heatmap.

    Args:
        points: (K, 2) keypoints in crop pixels. visible: (K,) bool.
    Returns:
        (K,) float32 in {0, 1}.
    """
    stride = image_size / heatmap_size
    radius = sigma * 3
    weights = visible.astype(np.float32).copy()
    for j in np.flatnonzero(weights):
        # int() truncates towards zero, as the reference's does (a point just left of 0 rounds to 0)
        mu_x, mu_y = int(points[j, 0] / stride + 0.5), int(points[j, 1] / stride + 0.5)
        ul = int(mu_x - radius), int(mu_y - radius)
        br = int(mu_x + radius + 1), int(mu_y + radius + 1)
        if ul[0] >= heatmap_size or ul[1] >= heatmap_size or br[0] < 0 or br[1] < 0:
            weights[j] = 0
    return weights


def heatmap_targets(
    points: np.ndarray, visible: np.ndarray, image_size: int, heatmap_size: int, sigma: float = 1.0,
    slots: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MSRA Gaussian heatmaps and target weights (:func:`target_weights`): the reference's pasted
    (6σ+1)² patch for an integer σ (its configs use 1).

    Args:
        points: (K, 2) keypoints in crop pixels. visible: (K,) bool. slots: the heatmaps' first dimension
            (zero beyond K), K when None.
    Returns:
        heatmaps (slots, Hh, Hh) float32 with peak 1 at the rounded keypoint; weights (K,) float32.
    """
    stride = image_size / heatmap_size
    radius = sigma * 3
    weights = target_weights(points, visible, image_size, heatmap_size, sigma)
    heatmaps = np.zeros((len(points) if slots is None else slots, heatmap_size, heatmap_size), dtype=np.float32)
    grid = np.arange(heatmap_size, dtype=np.float32)
    half = int(np.floor(radius))
    for j in np.flatnonzero(weights):
        mu_x, mu_y = int(points[j, 0] / stride + 0.5), int(points[j, 1] / stride + 0.5)
        # the reference's patch is (6σ+1)² wide: zero beyond 3σ on either axis
        x0, x1 = max(0, mu_x - half), min(heatmap_size, mu_x + half + 1)
        y0, y1 = max(0, mu_y - half), min(heatmap_size, mu_y + half + 1)
        if x1 <= x0 or y1 <= y0:  # kept by the weight rule, but no grid point within 3σ
            continue
        gx = np.exp(-((grid[x0:x1] - mu_x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((grid[y0:y1] - mu_y) ** 2) / (2 * sigma**2))
        np.multiply(gy[:, None], gx[None, :], out=heatmaps[j, y0:y1, x0:x1])
    return heatmaps, weights


def clean_bbox(bbox: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The reference's bbox sanitising; ``None`` when nothing is left.

    A NaN or infinite value is a ``ValueError``, never clamped: ``max(0.0, nan)`` is 0 and ``min(w, inf)`` is
    the image's edge, which would turn a broken box into a plausible one.
    """
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"bbox holds a non-finite value: {[x, y, w, h]}")
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 > x1 and y2 > y1:
        return (x1, y1, x2 - x1, y2 - y1)
    return None
