"""Image decoding, the top-down crop, the training augmentation and the target heatmaps (mmpose's TopDown
pipeline).

Decoding (:func:`decode_image`) is the reference's: mmcv's ``imfrombytes`` with OpenCV
(``cv2.imdecode(buf, cv2.IMREAD_COLOR)``, then BGR → RGB). So, as there, the EXIF orientation is applied
(a JPEG stored 64 wide × 48 high with orientation 6 decodes to 48 × 64), 16-bit images are scaled to
8 bits, grey images are repeated over three channels, alpha is dropped without compositing, palette
images are expanded and CMYK JPEGs are converted by libjpeg's rule.

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
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

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
        with Image.open(io.BytesIO(data)) as im:
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


def crop(
    image: np.ndarray,
    bbox: tuple[float, float, float, float],
    size: int,
    padding: float = 1.25,
    scale: float = 1.0,
    rot_deg: float = 0.0,
) -> Crop:
    """Warp the (scaled, rotated) square box around ``bbox`` to ``size × size``, ImageNet-normalised."""
    center, side = box_center_scale(bbox, padding)
    m = affine_matrix(center, side * scale, rot_deg, size)
    warped = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR)
    x = (warped.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return Crop(np.ascontiguousarray(x.transpose(2, 0, 1)), m, invert_affine(m))


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
    points: np.ndarray, visible: np.ndarray, image_size: int, heatmap_size: int, sigma: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """MSRA Gaussian heatmaps and target weights (:func:`target_weights`).

    Args:
        points: (K, 2) keypoints in crop pixels. visible: (K,) bool.
    Returns:
        heatmaps (K, Hh, Hh) float32 with peak 1 at the rounded keypoint; weights (K,) float32.
    """
    stride = image_size / heatmap_size
    radius = sigma * 3
    weights = target_weights(points, visible, image_size, heatmap_size, sigma)
    heatmaps = np.zeros((len(points), heatmap_size, heatmap_size), dtype=np.float32)
    grid = np.arange(heatmap_size, dtype=np.float32)
    for j in np.flatnonzero(weights):
        mu_x, mu_y = int(points[j, 0] / stride + 0.5), int(points[j, 1] / stride + 0.5)
        # the reference's patch is (6σ+1)² wide: zero beyond 3σ on either axis
        gx = np.where(np.abs(grid - mu_x) <= radius, np.exp(-((grid - mu_x) ** 2) / (2 * sigma**2)), 0)
        gy = np.where(np.abs(grid - mu_y) <= radius, np.exp(-((grid - mu_y) ** 2) / (2 * sigma**2)), 0)
        heatmaps[j] = gy[:, None] * gx[None, :]
    return heatmaps, weights
