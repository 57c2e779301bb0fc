"""Image decoding as the reference decodes (mmcv ``imfrombytes``: OpenCV ``IMREAD_COLOR``, then BGR → RGB),
on files made here in the formats and modes real MP-100 mixes; and the image check the shard job and the
audit make with it."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from capenext.data.source import BadImage, read_checked
from capenext.data.transforms import (apply_affine, crop, decode_for_crop, decode_image, read_image,
                                      reduction_for)


def reference_decode(data: bytes) -> np.ndarray:
    """What the reference's loader returns for ``data``."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def pil_decode(data: bytes) -> np.ndarray:
    """A PIL decode (``convert("RGB")``), which differs from the reference's on some files."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def picture(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth (JPEG-friendly) RGB picture whose four corners differ."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([255 * x / (w - 1), 255 * y / (h - 1), 255 * (1 - x / (w - 1)) * (y / (h - 1))],
                    -1).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(picture()), "JPEG", quality=95, exif=exif.tobytes())


def png_16bit() -> bytes:
    values = np.random.default_rng(0).integers(0, 65536, (48, 64)).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")  # a 16-bit greyscale PNG (PIL mode I;16)


FILES = {  # name → (bytes, whether a PIL decode gives other pixels)
    "jpeg_exif_orientation_6": (exif_jpeg(6), True),
    "jpeg_exif_orientation_3": (exif_jpeg(3), True),
    "png_16bit": (png_16bit(), True),
    "jpeg_cmyk": (encode(Image.fromarray(picture()).convert("CMYK"), "JPEG", quality=95), True),
    # PIL agrees with OpenCV on these: they pin the three-channel expansion, the alpha drop (no
    # compositing) and the palette expansion
    "jpeg_grayscale": (encode(Image.fromarray(picture()).convert("L"), "JPEG", quality=95), False),
    "png_rgba": (encode(Image.fromarray(np.dstack([picture(), picture()[..., :1]]), "RGBA"), "PNG"), False),
    "png_palette": (encode(Image.fromarray(picture()).convert("P"), "PNG"), False),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_decode_equals_the_reference_decode(name):
    data, pil_differs = FILES[name]
    ours = decode_image(data, name)
    expected = reference_decode(data)
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3
    assert ours.shape == expected.shape and np.array_equal(ours, expected)
    if pil_differs:  # the case tells the two decoders apart
        pil = pil_decode(data)
        assert pil.shape != expected.shape or not np.array_equal(pil, expected)


def test_exif_orientation_6_turns_a_64x48_image_into_48x64():
    stored = picture()  # 48 high, 64 wide
    ours = decode_image(exif_jpeg(6), "rotated.jpg")
    assert ours.shape == (64, 48, 3)  # 48 wide, 64 high: turned a quarter clockwise
    # the stored top-left corner (red 0, green 0) is now the top-right one
    assert np.abs(ours[0, -1, :2].astype(int) - stored[0, 0, :2]).max() < 12
    assert np.abs(ours[0, 0, :2].astype(int) - stored[-1, 0, :2]).max() < 12


def test_16bit_png_is_scaled_to_8_bits():
    data = png_16bit()
    values = np.asarray(Image.open(io.BytesIO(data))).astype(np.uint16)
    ours = decode_image(data, "deep.png")
    assert np.array_equal(ours[..., 0], (values >> 8).astype(np.uint8))  # the high byte, as libpng's strip
    assert np.array_equal(ours[..., 0], ours[..., 2])


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"not an image at all", "not an image file"),
    (exif_jpeg(1)[:400], "corrupt"),
    (encode(Image.fromarray(picture(200, 300)), "PNG")[:2000], "corrupt PNG"),
])
def test_undecodable_bytes_are_one_line_naming_where(data, reason):
    with pytest.raises(ValueError) as err:
        decode_image(data, "shards/c0001.tar:a000000042")
    msg = str(err.value)
    assert msg.startswith("cannot decode shards/c0001.tar:a000000042: ") and reason in msg and "\n" not in msg


def test_read_image_decodes_a_file_as_decode_image(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(FILES["jpeg_cmyk"][0])
    assert np.array_equal(read_image(str(path)), reference_decode(path.read_bytes()))


def _file(tmp_path: Path, data: bytes, name: str = "a.jpg") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_read_checked_compares_the_size_after_exif_orientation(tmp_path):
    path = _file(tmp_path, exif_jpeg(6))  # stored 64x48, decoded 48x64
    assert read_checked(path, 48, 64) == path.read_bytes()
    with pytest.raises(BadImage) as err:
        read_checked(path, 64, 48)
    assert err.value.kind == "size mismatch"
    assert err.value.reason == \
        "is 48x64 after its EXIF orientation is applied (64x48 as stored), the json says 64x48"
    flipped = _file(tmp_path, exif_jpeg(3), "b.jpg")  # upside down: the size stays
    assert read_checked(flipped, 64, 48)


@pytest.mark.parametrize("name", sorted(FILES))
def test_read_checked_accepts_every_mode_at_its_decoded_size(tmp_path, name):
    data, _ = FILES[name]
    h, w = reference_decode(data).shape[:2]
    assert read_checked(_file(tmp_path, data), w, h) == data


def test_read_checked_reports_truncated_and_garbage_files_as_corrupt(tmp_path):
    good = encode(Image.fromarray(picture(300, 400)), "JPEG", quality=95)
    for data in (good[: len(good) // 2], b"GIF89a but not really"):
        with pytest.raises(BadImage) as err:
            read_checked(_file(tmp_path, data), 400, 300)
        assert err.value.kind == "corrupt image" and err.value.reason.startswith("cannot decode (")
        assert "\n" not in err.value.reason


# --- decoding only what the crop needs (DataCfg.reduced_decode) ------------------------------------------


def photo(h: int = 900, w: int = 1200) -> np.ndarray:
    """A camera-sized smooth picture with a bright dot at (x, y) = (601, 403)."""
    image = cv2.resize(picture(), (w, h), interpolation=cv2.INTER_LINEAR)
    cv2.circle(image, (601, 403), 12, (255, 255, 255), -1)
    return cv2.GaussianBlur(image, (0, 0), 2)


def jpeg(image: np.ndarray, orientation: int | None = None) -> bytes:
    tags = Image.Exif()
    if orientation is not None:
        tags[0x0112] = orientation
    return encode(Image.fromarray(image), "JPEG", quality=95, exif=tags.tobytes())


@pytest.mark.parametrize("step,expected",
                         [(1.0, 1), (3.9, 1), (4.0, 2), (8.0, 4), (15.9, 4), (16.0, 8), (90.0, 8)])
def test_reduction_keeps_two_reduced_pixels_per_crop_pixel(step, expected):
    assert reduction_for(step) == expected


def test_reduced_decode_is_libjpegs_scaled_decode_of_the_jpeg():
    data = jpeg(photo())
    image, r = decode_for_crop(data, "a.jpg", 1200, 900, step=9.0)
    assert r == 4 and image.shape == (225, 300, 3)
    reduced = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_4)
    expected = cv2.cvtColor(reduced, cv2.COLOR_BGR2RGB)
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("rot", [0.0, 25.0])
def test_reduced_crop_puts_every_pixel_where_the_full_crop_does(rot):
    data = jpeg(photo())
    bbox = (300.0, 150.0, 600.0, 500.0)  # box side 750 px for a 64 px crop: step 11.7, r = 4
    full = crop(decode_image(data), bbox, 64, rot_deg=rot)
    image, r = decode_for_crop(data, "a.jpg", 1200, 900, step=1.25 * 600 / 64)
    reduced = crop(image, bbox, 64, rot_deg=rot, reduction=r)
    assert r == 4
    assert np.array_equal(reduced.matrix, full.matrix) and np.array_equal(reduced.inverse, full.inverse)
    # the dot lands on the same crop pixel, and the crops differ by the resampling only
    x, y = apply_affine(np.array([601.0, 403.0]), full.matrix)
    for c in (full, reduced):
        iy, ix = np.unravel_index(c.image[0].argmax(), c.image[0].shape)
        assert abs(ix - x) <= 1 and abs(iy - y) <= 1
    assert np.abs(reduced.image - full.image).mean() < 0.05


@pytest.mark.parametrize("case", ["png", "exif_orientation_6", "small_box"])
def test_reduced_decode_falls_back_to_the_full_decode(case):
    image = photo()
    data = {"png": encode(Image.fromarray(image), "PNG"), "exif_orientation_6": jpeg(image, orientation=6),
            "small_box": jpeg(image)}[case]
    step = 2.0 if case == "small_box" else 9.0
    h, w = reference_decode(data).shape[:2]
    decoded, r = decode_for_crop(data, "a", w, h, step)
    assert r == 1 and np.array_equal(decoded, reference_decode(data))


def test_make_item_decodes_bytes_as_the_loader_and_reduced_changes_only_pixels():
    from capenext.config import DataCfg
    from capenext.data.dataset import make_item
    from capenext.data.mp100 import Category, Sample

    data = jpeg(photo())
    cat = Category(1, "thing", "things", ("a", "b", "c"), ((0, 1),))
    kp = np.array([[400, 300, 1], [601, 403, 1], [800, 600, 1]], dtype=np.float32)
    query = Sample(1, 1, 1, "q.jpg", 1200, 900, (300.0, 150.0, 600.0, 500.0), kp)
    support = Sample(2, 2, 1, "s.jpg", 1200, 900, (300.0, 150.0, 600.0, 500.0), kp.copy())
    cfg = DataCfg(image_size=64, heatmap_size=16)

    def item(image, cfg: DataCfg) -> dict:
        return make_item(image, query, support, cat, cfg, np.random.default_rng([0, 0, 5]))

    from_array, from_bytes = item(decode_image(data), cfg), item(data, cfg)
    assert all(torch.equal(from_array[k], from_bytes[k]) for k in from_array)
    reduced = item(data, DataCfg(image_size=64, heatmap_size=16, reduced_decode=True))
    assert all(torch.equal(from_array[k], reduced[k]) for k in from_array if k != "img")
    assert 0 < float((reduced["img"] - from_array["img"]).abs().mean()) < 0.05
    with pytest.raises(ValueError, match=r"cannot decode the image of annotation 1 \(q\.jpg\)"):
        item(data[:100], cfg)
