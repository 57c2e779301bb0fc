"""``pipelines.validate``: every planted problem of a damaged copy is reported; real-world variety is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from PIL import Image

from capenext.data.mp100 import SPLITS, SUBSETS, annotation_path
from capenext.cli import run_main
from pipelines import validate as validate_job
from pipelines.validate import validate
from tests.conftest import run_cli


def run_validate(argv: list[str], capsys, monkeypatch) -> SimpleNamespace:
    """``python -m pipelines.validate ARGV`` in this process (its one real process is
    :func:`test_missing_data_root_is_one_line`): exit code, stdout, stderr."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what run_main sets: undone after the test
    with pytest.raises(SystemExit) as exc:
        run_main(validate_job.main, argv)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=exc.value.code, stdout=out.out, stderr=out.err)


def edit_annotations(root: Path, fn: Callable[[dict, Path], None]) -> None:
    """Apply ``fn(data, path)`` to every one of the 15 annotation files of ``root`` and write them back."""
    for split in SPLITS:
        for subset in SUBSETS:
            path = annotation_path(root, split, subset)
            data = json.loads(path.read_text())
            fn(data, path)
            path.write_text(json.dumps(data))


def single_instance_annotations(root: Path) -> list[tuple[dict, dict]]:
    """(annotation, image) pairs of split 1 whose image holds only that annotation, one per category."""
    anns, images, per_image = [], {}, {}
    for subset in SUBSETS:
        data = json.loads(annotation_path(root, 1, subset).read_text())
        images.update({im["id"]: im for im in data["images"]})
        anns += data["annotations"]
    for a in anns:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    out, seen = [], set()
    for a in sorted(anns, key=lambda a: a["id"]):
        if per_image[a["image_id"]] == 1 and a["category_id"] not in seen:
            seen.add(a["category_id"])
            out.append((a, images[a["image_id"]]))
    return out


def make_damaged_copy(src: Path, dst: Path) -> dict[str, dict]:
    """A copy of the synthetic set with one planted problem per kind; returns kind → what was planted."""
    shutil.copytree(src, dst)
    picks = single_instance_annotations(dst)
    assert len(picks) >= 7
    (a_missing, im_missing), (a_trunc, im_trunc), (a_size, im_size), (a_len, _), (a_skel, _), (a_cat, _), \
        (a_diff, _) = picks[:7]
    (dst / "images" / im_missing["file_name"]).unlink()
    trunc = dst / "images" / im_trunc["file_name"]
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    Image.new("RGB", (50, 40), "red").save(dst / "images" / im_size["file_name"], "JPEG")

    def plant(data: dict, path: Path) -> None:
        for a in data["annotations"]:
            if a["id"] == a_len["id"]:
                a["keypoints"] = a["keypoints"][:-3]
            if a["id"] == a_cat["id"]:
                a["category_id"] = 9999
            if a["id"] == a_diff["id"] and path.name.startswith("mp100_split2_"):
                a["bbox"] = [a["bbox"][0] + 1, *a["bbox"][1:]]  # split 2's copy differs from the others
        for c in data["categories"]:
            if c["id"] == a_skel["category_id"]:
                c["skeleton"] = [*c["skeleton"], [0, 999]]

    edit_annotations(dst, plant)
    annotation_path(dst, 5, "val").write_text('{"images": [')
    return {
        "missing image": {"ann": a_missing["id"], "file": im_missing["file_name"]},
        "corrupt image": {"ann": a_trunc["id"], "file": im_trunc["file_name"]},
        "size mismatch": {"ann": a_size["id"], "file": im_size["file_name"]},
        "keypoint length": {"ann": a_len["id"]},
        "skeleton index": {"category": a_skel["category_id"]},
        "unknown category": {"ann": a_cat["id"]},
        "inconsistent annotation": {"ann": a_diff["id"]},
        "annotation file": {"file": "mp100_split5_val.json"},
    }


def make_variety_copy(src: Path, dst: Path) -> dict:
    """A valid copy with what real MP-100 brings: mixed formats and modes, odd folder names,
    non-contiguous ids, a category without a skeleton, an annotation cleaning drops."""
    shutil.copytree(src, dst)
    picks = single_instance_annotations(dst)
    conversions = {  # (annotation, image) → new suffix, PIL mode
        0: (".png", "RGBA"), 1: (".png", "P"), 2: (".JPG", "L"), 3: (".jpeg", "CMYK"),
    }
    renamed: dict[str, str] = {}
    for i, (suffix, mode) in conversions.items():
        old = picks[i][1]["file_name"]
        new = str(Path(old).with_suffix(suffix))
        with Image.open(dst / "images" / old) as im:
            im.convert(mode).save(dst / "images" / new)
        (dst / "images" / old).unlink()
        renamed[old] = new
    rotated = picks[7][1]["file_name"]  # stored turned a quarter anticlockwise, EXIF orientation 6 turns it back
    with Image.open(dst / "images" / rotated) as im:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(dst / "images" / rotated, "JPEG", exif=exif.tobytes())
    odd_cat = picks[4][0]["category_id"]
    odd_folder = Path(picks[4][1]["file_name"]).parts[0]
    (dst / "images" / odd_folder).rename(dst / "images" / "Odd Folder (ü) #1")
    no_skeleton = picks[5][0]["category_id"]
    zeroed = picks[6][0]["id"]

    def vary(data: dict, path: Path) -> None:
        for im in data["images"]:
            im["file_name"] = renamed.get(im["file_name"], im["file_name"])
            parts = Path(im["file_name"]).parts
            if parts[0] == odd_folder:
                im["file_name"] = str(Path("Odd Folder (ü) #1", *parts[1:]))
            im["id"] = im["id"] * 13 + 5000
        for a in data["annotations"]:
            if a["id"] == zeroed:
                a["keypoints"] = [0] * len(a["keypoints"])
            a["id"] = a["id"] * 7 + 100003
            a["image_id"] = a["image_id"] * 13 + 5000
        for c in data["categories"]:
            if c["id"] == no_skeleton:
                del c["skeleton"]

    edit_annotations(dst, vary)
    return {"renamed": renamed, "odd_category": odd_cat, "no_skeleton": no_skeleton,
            "zeroed": zeroed * 7 + 100003, "rotated": rotated}


@pytest.fixture(scope="module")
def damaged(synthetic_root, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("damaged") / "mp100"
    return root, make_damaged_copy(synthetic_root, root)


def test_clean_synthetic_set_passes(synthetic_root, capsys, monkeypatch):
    proc = run_validate(["--data-root", str(synthetic_root)], capsys, monkeypatch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: nothing stops the shard job" in proc.stdout
    report = validate(synthetic_root, progress=False)
    assert report["ok"] and report["problems"] == []
    assert report["union"]["images"] == 600 and report["union"]["formats"] == {"JPEG": 600}
    assert report["union"]["usable_annotations"] == report["union"]["annotations"]
    for split in map(str, SPLITS):
        rows = report["splits"][split]
        assert sum(r["categories"] for r in rows.values()) == 20  # category-disjoint, all covered


def test_every_planted_problem_is_reported(damaged):
    root, planted = damaged
    report = validate(root, progress=False)
    assert not report["ok"]
    errors = {g["kind"]: g for g in report["problems"] if g["severity"] == "error"}
    assert set(planted) <= set(errors), sorted(errors)
    for kind, what in planted.items():
        text = " ".join(errors[kind]["examples"])
        if "ann" in what:
            assert f"annotation {what['ann']}" in text or f"annotations {what['ann']}" in text, (kind, text)
        if "file" in what:
            assert what["file"] in text, (kind, text)
        if "category" in what:
            assert f"category {what['category']}" in text, (kind, text)
    for kind in ("missing image", "corrupt image", "size mismatch"):  # grouped by top-level image folder
        assert errors[kind]["folders"] == {Path(planted[kind]["file"]).parts[0]: 1}
    assert report["splits"]["5"]["val"]["readable"] is False
    assert report["union"]["usable_annotations"] < report["union"]["annotations"]


def test_damaged_copy_fails_on_the_command_line_text_and_json(damaged, capsys, monkeypatch):
    root, planted = damaged
    proc = run_validate(["--data-root", str(root), "--json"], capsys, monkeypatch)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert set(planted) <= {g["kind"] for g in report["problems"]}
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    text = run_validate(["--data-root", str(root)], capsys, monkeypatch)
    assert text.returncode == 1
    for kind in planted:
        assert f"ERROR   {kind} x" in text.stdout, kind
    assert "FAIL:" in text.stdout


def test_real_world_variety_is_not_a_problem(synthetic_root, tmp_path):
    root = tmp_path / "mp100"
    made = make_variety_copy(synthetic_root, root)
    report = validate(root, progress=False)
    assert report["ok"], json.dumps(report["problems"], indent=1)
    union = report["union"]
    assert {"L", "RGBA", "P", "CMYK", "RGB"} <= set(union["modes"])
    assert {"PNG", "JPEG"} == set(union["formats"])
    assert union["categories_without_skeleton"] == 1
    for split in map(str, SPLITS):  # what cleaning drops is in the summary of every split
        dropped = [r["dropped"] for r in report["splits"][split].values()]
        assert sum(d.get("all-zero keypoints", 0) for d in dropped) == 1
    assert made["renamed"]
    # an EXIF-rotated image whose json size is its decoded (oriented) size is a warning, not an error
    (exif,) = [g for g in report["problems"] if g["kind"] == "exif orientation"]
    assert exif["severity"] == "warning" and exif["count"] == 1
    assert made["rotated"] in exif["examples"][0] and "orientation 6 is applied" in exif["examples"][0]


def test_exif_rotated_image_with_its_stored_size_in_the_json_is_a_size_mismatch(synthetic_root, tmp_path):
    root = tmp_path / "mp100"
    shutil.copytree(synthetic_root, root)
    (ann, image), *_ = [p for p in single_instance_annotations(root) if p[1]["width"] != p[1]["height"]]
    path = root / "images" / image["file_name"]
    with Image.open(path) as im:  # pixels as stored, orientation 6: the loader sees them turned
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(path, "JPEG", exif=exif.tobytes())
    report = validate(root, progress=False)
    (group,) = [g for g in report["problems"] if g["kind"] == "size mismatch"]
    assert group["severity"] == "error" and not report["ok"]
    w, h = image["width"], image["height"]
    assert f"is {h}x{w} after its EXIF orientation is applied ({w}x{h} as stored), the json says {w}x{h}" \
        in group["examples"][0] and f"annotation {ann['id']}" in group["examples"][0]


def test_missing_data_root_is_one_line(tmp_path):
    """As a user runs it: the entry point's one real process (the other command lines run in this one)."""
    proc = run_cli("pipelines.validate", "--data-root", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --data-root {tmp_path / 'nope'}: not a directory"


def test_audit_never_opens_an_image_named_outside_the_image_folder(synthetic_root, tmp_path):
    """An image record whose ``file_name`` climbs out of ``images/`` is reported (the data layer's one line)
    and never decoded: the audit opens only files inside the image folder."""
    root = tmp_path / "mp100"
    shutil.copytree(synthetic_root, root)
    (tmp_path / "secret.jpg").write_bytes(b"not an image at all")  # decoding it would be a corrupt image
    (_, im) = single_instance_annotations(root)[0]
    name = "../../secret.jpg"

    def climb(data, path):
        for record in data["images"]:
            if record["id"] == im["id"]:
                record["file_name"] = name

    edit_annotations(root, climb)
    report = validate(root, progress=False, workers=1)
    examples = [(g["kind"], e) for g in report["problems"] for e in g["examples"]]
    assert any(name in e and f"image {im['id']}" in e for _, e in examples), examples
    assert not any("secret.jpg" in e and kind != "image record" for kind, e in examples), examples
    assert report["ok"] is False
