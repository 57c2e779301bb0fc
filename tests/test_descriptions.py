"""The reference's keypoint texts and test episodes: ``pipelines.descriptions`` reads a reference-shaped
``utils.py`` (written here: the project ships the reader, never the reference's texts), the data layer
applies the rules as the reference does, ``jobs.evaluate`` takes ``--descriptions``, ``--noise
reference:V`` and ``--episodes reference``, and our reference episodes equal an independent
re-implementation of mmpose's ``make_paired_samples`` on the synthetic set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from capenext.cli import run_main
from capenext.data.embeddings import text_source
from capenext.data.episodes import reference_episodes, reference_order, reference_pairs
from capenext.data.mp100 import Category, DataError, load_descriptions, load_split
from pipelines import descriptions as reader

UTILS = "models/datasets/datasets/mp100/utils.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# the shape of the reference's file, with texts of our own, written for the synthetic set's split-1 test
# categories: 6 ketchup_bottle (bottle, 8 keypoints), 9 dress_shirt (shirt, 10), 10 dog_face
# (animal_face, 9), 15 round_table (table, 9)
REFERENCE = '''
def rename_points_descriptions(category, test_type="regular_test"):
    if test_type is None or test_type == "regular_test":
        return regular_descriptions(category)
    elif test_type == "typo_test":
        return typo_test(category)
    elif test_type == "manual_modification":
        return manual_modification_v0(category)
    else:
        raise ValueError("Invalid test_type: {}".format(test_type))


def regular_descriptions(category):
    updated_point_names = []
    if category['supercategory'] == 'animal_face':
        updated_point_names = ['face point %d']
    elif category['name'] == 'dress_shirt':
        updated_point_names = ['shirt point %d']
    elif category['id'] == 15:
        updated_point_names = ['table point %d']
    elif category['name'] in ['dog_face', 'ketchup_bottle']:
        # dog_face matched the first rule already: the first match wins
        updated_point_names = ['bottle point %d']
    else:
        updated_point_names = category['keypoints']
        updated_point_names = [k.replace("_", " ") for k in updated_point_names]

    return updated_point_names


def typo_test(category):
    if category['supercategory'] == 'animal_face':
        updated_point_names = ['fcae point %d']
    elif category['name'] in ['ketchup_bottle', 'dress_shirt', 'round_table']:
        updated_point_names = ['tyop point %d']
    else:
        print(f"{category['name']} was not changed. Exiting...")
        exit(-1)
    return updated_point_names


def manual_modification_v0(category):
    updated_point_names = []
    if category['name'] == 'no_such_category':
        updated_point_names = ['unused']
    else:
        updated_point_names = category['keypoints']
        updated_point_names = [k.replace("_", " ") for k in updated_point_names]

        for i, prompt in enumerate(updated_point_names):
            if 'left' in prompt:
                updated_point_names[i] = prompt.replace('left', 'port')
            if 'base' in prompt:
                updated_point_names[i] = prompt.replace('base', 'bottom')
    return updated_point_names
'''
LENGTHS = {"face": 9, "shirt": 12, "table": 7, "bottle": 8, "fcae": 9, "tyop": 10}  # 12 > 10, 7 < 9


def _texts(word: str, n: int) -> str:
    return ", ".join(f"'{word} point {i}'" for i in range(n))


def reference_source() -> str:
    src = REFERENCE
    for word, n in LENGTHS.items():
        src = src.replace(f"['{word} point %d']", f"[{_texts(word, n)}]")
    return src


def checkout(base: Path, source: str | None = None, git: str = "loose") -> Path:
    """A reference-shaped checkout: ``utils.py`` and a ``.git`` whose HEAD resolves to ``COMMIT``."""
    root = base / "reference"
    (root / UTILS).parent.mkdir(parents=True, exist_ok=True)
    (root / UTILS).write_text(source if source is not None else reference_source())
    dot = root / ".git"
    (dot / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    if git == "detached":
        (dot / "HEAD").write_text(COMMIT + "\n")
    else:
        (dot / "HEAD").write_text("ref: refs/heads/main\n")
        if git == "loose":
            (dot / "refs" / "heads" / "main").write_text(COMMIT + "\n")
        else:
            (dot / "packed-refs").write_text(f"# pack-refs with: peeled\n{COMMIT} refs/heads/main\n")
    return root


def _run(capsys, main, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.fixture
def rules_file(tmp_path, capsys) -> Path:
    out = tmp_path / "descriptions.json"
    code, _, err = _run(capsys, reader.main, "--reference", checkout(tmp_path), "--out", out, "--variant", "all")
    assert code == 0, err
    return out


def cat(id_: int, name: str, supercategory: str, keypoints: list[str]) -> Category:
    return Category(id_, name, supercategory, tuple(keypoints), ())


# --- the reader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("git", ["loose", "packed", "detached"])
def test_reader_writes_ordered_rules_with_provenance(tmp_path, capsys, git):
    ref = checkout(tmp_path, git=git)
    out = tmp_path / "d.json"
    code, stdout, err = _run(capsys, reader.main, "--reference", ref, "--out", out, "--variant", "all")
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["source"] == {"file": UTILS, "sha256": hashlib.sha256((ref / UTILS).read_bytes()).hexdigest(),
                             "commit": COMMIT}
    assert list(doc["variants"]) == ["regular", "typo", "manual"]
    regular = doc["variants"]["regular"]
    assert regular["function"] == "regular_descriptions"
    assert [(r["field"], r["values"], len(r["texts"])) for r in regular["rules"]] == [
        ("supercategory", ["animal_face"], 9), ("name", ["dress_shirt"], 12), ("id", [15], 7),
        ("name", ["dog_face", "ketchup_bottle"], 8)]
    assert regular["rules"][0]["texts"][:2] == ["face point 0", "face point 1"]
    lines = reference_source().splitlines()
    assert all("category[" in lines[r["line"] - 1] for r in regular["rules"])  # each rule names its source line
    assert regular["otherwise"] == {"kind": "names", "replace": []}
    assert doc["variants"]["typo"]["otherwise"]["kind"] == "stop"
    assert doc["variants"]["manual"]["otherwise"] == {"kind": "names", "replace": [["left", "port"], ["base", "bottom"]]}
    assert "regular" in stdout and "4 rules" in stdout


def test_default_variant_is_regular_and_a_variant_the_file_lacks_is_one_line(tmp_path, capsys):
    ref = checkout(tmp_path)
    out = tmp_path / "d.json"
    code, _, err = _run(capsys, reader.main, "--reference", ref, "--out", out)
    assert code == 0, err
    assert list(json.loads(out.read_text())["variants"]) == ["regular"]
    code, _, err = _run(capsys, reader.main, "--reference", ref, "--out", tmp_path / "s.json", "--variant", "synonyms")
    _one_line_error(code, err, "no 'synonyms' texts", "['regular', 'typo', 'manual']")
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("case", ["computed list", "other condition", "unknown else", "extra statement"])
def test_a_shape_the_reader_does_not_know_is_one_line_naming_the_line(tmp_path, capsys, case):
    old, new = {
        "computed list": ("updated_point_names = [" + _texts("shirt", 12) + "]",
                          "updated_point_names = ['a'] * 12"),
        "other condition": ("elif category['id'] == 15:", "elif category['name'].startswith('round'):"),
        "unknown else": ("        print(f\"{category['name']} was not changed. Exiting...\")\n        exit(-1)",
                         "        updated_point_names = sorted(category['keypoints'])"),
        "extra statement": ("    return updated_point_names\n\n\ndef typo_test",
                        "    updated_point_names.append('x')\n    return updated_point_names\n\n\ndef typo_test"),
    }[case]
    source = reference_source()
    assert source.count(old) == 1
    source = source.replace(old, new)
    line = next(i + 1 for i, text in enumerate(source.splitlines()) if new.splitlines()[0] in text)
    out = tmp_path / "d.json"
    code, _, err = _run(capsys, reader.main, "--reference", checkout(tmp_path, source), "--out", out,
                        "--variant", "all")
    _one_line_error(code, err, f"utils.py:{line}:")
    assert not out.exists()


def test_a_folder_without_the_reference_file_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "d.json"
    code, _, err = _run(capsys, reader.main, "--reference", tmp_path / "empty", "--out", out)
    _one_line_error(code, err, UTILS)
    assert not out.exists()


# --- applying the rules as the reference does ------------------------------------------------------


def test_first_rule_wins_and_list_lengths_follow_the_reference(rules_file, caplog):
    desc = load_descriptions(rules_file, "regular")
    face = desc.apply(cat(10, "dog_face", "animal_face", [f"n{i}" for i in range(9)]))
    assert face.keypoints == tuple(f"face point {i}" for i in range(9))  # rule 1, not the 'in' rule below it
    bottle = desc.apply(cat(6, "ketchup_bottle", "bottle", [f"n{i}" for i in range(8)]))
    assert bottle.keypoints == tuple(f"bottle point {i}" for i in range(8))
    with caplog.at_level(logging.WARNING):
        shirt = desc.apply(cat(9, "dress_shirt", "shirt", [f"n{i}" for i in range(10)]))
        table = desc.apply(cat(15, "round_table", "table", [f"n_{i}" for i in range(9)]))
    assert shirt.keypoints == tuple(f"shirt point {i}" for i in range(10))  # the first K of a longer list
    assert table.keypoints == (*(f"table point {i}" for i in range(7)), "n_7", "n_8")  # the rest keep their names
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "12 texts for 10 keypoints" in warnings[0] and "7 texts for 9" in warnings[1]
    other = desc.apply(cat(3, "tall_lamp", "lamp", ["left_base", "top"]))
    assert other.keypoints == ("left base", "top")  # no rule: the names, '_' → ' '


def test_replacements_start_from_the_name_so_the_last_match_wins(rules_file):
    desc = load_descriptions(rules_file, "manual")
    out = desc.apply(cat(6, "ketchup_bottle", "bottle", ["left base", "left shoulder", "top base", "cap"]))
    # the reference's loop rewrites each name from the original: 'left base' → 'left bottom', not 'port bottom'
    assert out.keypoints == ("left bottom", "port shoulder", "top bottom", "cap")


def test_a_category_no_rule_matches_stops_a_stop_variant(rules_file):
    desc = load_descriptions(rules_file, "typo")
    assert desc.apply(cat(10, "dog_face", "animal_face", ["x"] * 9)).keypoints[0] == "fcae point 0"
    with pytest.raises(DataError, match="no rule of the reference's 'typo' texts .* reference stops there"):
        desc.apply(cat(3, "tall_lamp", "lamp", ["a", "b"]))


def test_file_of_another_variant_or_a_plain_map_with_a_variant_is_one_line(tmp_path, capsys, rules_file):
    ref = checkout(tmp_path)
    only = tmp_path / "regular.json"
    assert _run(capsys, reader.main, "--reference", ref, "--out", only)[0] == 0
    with pytest.raises(DataError, match=r"holds the reference's \['regular'\] texts, not 'typo'"):
        load_descriptions(only, "typo")
    plain = tmp_path / "map.json"
    plain.write_text(json.dumps({"dog_face": ["a"] * 9}))
    with pytest.raises(DataError, match="has no variants"):
        load_descriptions(plain, "typo")
    # what the embedding tables record: a map's sha256; the rules' sha256 and variant
    assert text_source(str(plain)) == f"descriptions:{hashlib.sha256(plain.read_bytes()).hexdigest()}"
    assert text_source(str(rules_file), "typo").endswith(":typo")
    assert text_source(str(rules_file), "regular") != text_source(str(rules_file), "typo")


def test_annotation_files_and_shards_read_the_same_texts(synthetic_root, rules_file):
    subset = load_split(synthetic_root, 1, "test", rules_file, text_variant="regular")
    kps = {c.name: c.keypoints for c in subset.categories.values()}
    assert kps["dog_face"][0] == "face point 0" and kps["ketchup_bottle"][7] == "bottle point 7"
    assert len(kps["dress_shirt"]) == 10 and len(kps["round_table"]) == 9


# --- the reference's test episodes -------------------------------------------------------------------


def mmpose_paired_samples(data: dict, num_shots: int, num_queries: int, num_episodes: int) -> list[list[int]]:
    """An independent re-implementation of the reference's TestPoseDataset: COCO-API indexing, its
    ``_get_db`` cleaning with running object ids, then ``make_paired_samples`` with the global ``random``;
    returns ``[support ann ids..., query ann id]`` rows."""
    anns = {a["id"]: a for a in data["annotations"]}
    img_to_anns: dict = {}
    for a in data["annotations"]:
        img_to_anns.setdefault(a["image_id"], []).append(a)
        a.setdefault("iscrowd", False)
    imgs = {im["id"]: im for im in data["images"]}
    cat_ids = [c["id"] for c in data["categories"]]
    class_to_ind = dict(zip([c["name"] for c in data["categories"]], cat_ids))
    valid_class_ids = [class_to_ind[c["name"]] for c in data["categories"]]
    cat2obj = {i: [] for i in cat_ids}
    db, obj_id = [], 0
    for img_id in list(imgs.keys()):
        img = imgs[img_id]
        objs = [anns[a["id"]] for a in img_to_anns.get(img_id, []) if a["iscrowd"] == False]
        valid = []
        for obj in objs:
            if "bbox" not in obj:
                continue
            x, y, w, h = obj["bbox"]
            x1, y1 = max(0, x), max(0, y)
            x2, y2 = min(img["width"] - 1, x1 + max(0, w - 1)), min(img["height"] - 1, y1 + max(0, h - 1))
            if ("area" not in obj or obj["area"] > 0) and x2 > x1 and y2 > y1:
                valid.append(obj)
        for obj in valid:
            if "keypoints" not in obj or max(obj["keypoints"]) == 0:
                continue
            if "num_keypoints" in obj and obj["num_keypoints"] == 0:
                continue
            cat2obj[obj["category_id"]].append(obj_id)
            db.append(obj["id"])
            obj_id += 1
    random.seed(1)
    np.random.seed(0)
    samples = []
    for cls in valid_class_ids:
        for _ in range(num_episodes):
            shots = random.sample(cat2obj[cls], num_shots + num_queries)
            for q in shots[num_shots:]:
                samples.append(shots[:num_shots] + [q])
    return [[db[i] for i in row] for row in samples]


def shuffled_test_file(root: Path) -> dict:
    """The synthetic split-1 test file with its images and annotations out of id order, and records the
    reference's cleaning drops (a crowd annotation, one without bbox, one of zero area, all-zero keypoints)."""
    data = json.loads((root / "annotations" / "mp100_split1_test.json").read_text())
    rng = random.Random(7)
    rng.shuffle(data["images"])
    rng.shuffle(data["annotations"])
    anns = data["annotations"]
    anns[0]["iscrowd"] = 1
    del anns[1]["bbox"]
    anns[2]["area"] = 0
    anns[3]["keypoints"] = [0] * len(anns[3]["keypoints"])
    anns[4].pop("iscrowd", None)  # no iscrowd: not crowd, as xtcocotools sets it
    data["categories"] = data["categories"][::-1]
    return data


def test_reference_episodes_equal_an_independent_reimplementation(synthetic_root):
    data = shuffled_test_file(synthetic_root)
    expected = mmpose_paired_samples(json.loads(json.dumps(data)), 1, 15, 20)
    state = random.getstate()
    classes, cat2obj = reference_order(data)
    ours = reference_episodes(classes, cat2obj, 20, 15)
    assert [s + [q] for s, q in ours] == expected
    assert random.getstate() == state  # the global generator is left alone
    dropped = {a["id"] for a in data["annotations"][:4]}
    assert not dropped & {a for ids in cat2obj.values() for a in ids}
    assert data["annotations"][4]["id"] in {a for ids in cat2obj.values() for a in ids}


def test_reference_pairs_index_the_samples_and_refuse_a_missing_annotation(synthetic_root):
    data = json.loads((synthetic_root / "annotations" / "mp100_split1_test.json").read_text())
    subset = load_split(synthetic_root, 1, "test")
    index = {s.ann_id: i for i, s in enumerate(subset.samples)}
    pairs = reference_pairs(data, index, 2, 3)
    rows = mmpose_paired_samples(json.loads(json.dumps(data)), 1, 3, 2)
    assert [[subset.samples[s].ann_id, subset.samples[q].ann_id] for q, s in pairs] == rows
    del index[rows[0][1]]
    with pytest.raises(ValueError, match=f"annotation {rows[0][1]} .* not among the samples"):
        reference_pairs(data, index, 2, 3)
    names = {c["id"]: c["name"] for c in data["categories"]}
    with pytest.raises(ValueError, match=r"category 6 \(ketchup_bottle\) has \d+ annotations.* 1 \+ 400"):
        reference_episodes(*reference_order(data), 1, 400, names=names)


# --- jobs.evaluate with the reference's texts and episodes ------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny CapeNext whose config asks for 2 episodes x 3 queries per test category."""
    from capenext.checkpoint import save_checkpoint
    from capenext.config import load_preset
    from capenext.models import build_model

    cfg = load_preset("tiny")
    cfg.data.test_episodes, cfg.data.queries = 2, 3
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(path, build_model(cfg.model), cfg, {})
    return path


def converted(tiny: Path, tmp_path: Path) -> Path:
    import torch

    ckpt = torch.load(tiny, weights_only=True)
    ckpt["meta"] = {"converted_from": "official", "keypoint_texts": "reference:regular"}
    out = tmp_path / "converted.pt"
    torch.save(ckpt, out)
    return out


def _evaluate(capsys, *argv) -> tuple[int, dict | None, str]:
    from jobs import evaluate

    code, out, err = _run(capsys, evaluate.main, *argv, "--split", "1", "--no-mlflow", "--pictures", "0", "--quiet")
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def test_evaluate_reads_the_reference_texts_noise_and_episodes(prepared, synthetic_root, tiny_checkpoint, rules_file,
                                                               tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = converted(tiny_checkpoint, tmp_path)
    code, result, err = _evaluate(capsys, "--checkpoint", ckpt, "--shards", prepared / "shards",
                                  "--descriptions", rules_file, "--noise", "reference:typo",
                                  "--sampler", "reference", "--data-root", synthetic_root)
    assert code == 0, err
    (row,) = result["rows"]
    assert row["noise_variant"] == "reference:typo" and row["embeddings"].startswith("in-process")
    assert row["test/queries"] == 4 * 2 * 3 and row["noise/changed_fraction"] == 1.0
    assert "the reference's episodes" in err


@pytest.mark.parametrize("case", ["converted without texts", "texts not in the tables", "variant not in the file",
                                  "reference episodes without data root"])
def test_evaluate_refuses_wrong_texts_and_episodes_in_one_line(prepared, tiny_checkpoint, rules_file, tmp_path, capsys,
                                                               monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    only_regular = tmp_path / "regular.json"
    doc = json.loads(rules_file.read_text())
    doc["variants"] = {"regular": doc["variants"]["regular"]}
    only_regular.write_text(json.dumps(doc))
    shards, emb = prepared / "shards", prepared / "emb"
    argv, fragments = {
        "converted without texts": (["--checkpoint", converted(tiny_checkpoint, tmp_path)],
                                    ["converted from the published weights", "--descriptions FILE"]),
        "texts not in the tables": (["--checkpoint", tiny_checkpoint, "--embeddings", emb, "--descriptions", rules_file],
                                    ["keypoint_texts='annotations'", ":regular"]),
        "variant not in the file": (["--checkpoint", tiny_checkpoint, "--descriptions", only_regular, "--noise",
                                     "reference:typo"], ["not 'typo'"]),
        "reference episodes without data root": (["--checkpoint", tiny_checkpoint, "--sampler", "reference"],
                                                 ["--data-root ROOT"]),
    }[case]
    code, _, err = _evaluate(capsys, *argv, "--shards", shards)
    _one_line_error(code, err, *fragments)
    assert not (tmp_path / "evaluation").exists()
