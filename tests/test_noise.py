"""Noisy prompts: deterministic for a seed, and they change what they claim to, at the stated rate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from capenext.noise import keypoint_variants, load_template_maps, rewrite, typo, wrong_class

WORDS = ["left eye", "right eye", "nose", "left front paw", "tip of the spout", "top left of the backseat"]


def test_typo_is_deterministic_for_a_seed():
    assert [typo(w, 0.2, 1) for w in WORDS] == [typo(w, 0.2, 1) for w in WORDS]
    assert [typo(w, 0.2, 1) for w in WORDS] != [typo(w, 0.2, 2) for w in WORDS]


def test_typo_rate_zero_changes_nothing_and_spaces_survive():
    assert [typo(w, 0.0, 0) for w in WORDS] == WORDS
    for w in WORDS:
        assert typo(w, 0.5, 0).count(" ") == w.count(" ")


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_typo_hits_letters_at_the_stated_rate(rate):
    """Over many prompts, the edit distance per letter is close to the rate (a swap counts as 2 edits
    of 1 event, so the event rate is measured from the operations themselves: letters kept in place)."""
    texts = [f"keypoint number {i} of the left front paw" for i in range(400)]
    changed = sum(typo(t, rate, 0) != t for t in texts)
    letters = sum(c.isalpha() for c in texts[0])
    p_unchanged = (1 - rate) ** letters  # a prompt escapes only if no letter is hit
    assert changed / len(texts) == pytest.approx(1 - p_unchanged, abs=0.08)
    lengths = np.array([len(typo(t, rate, 0)) - len(t) for t in texts])
    # drops (-1) and inserts (+1) are equally likely: the mean length change stays near 0
    assert abs(lengths.mean()) < 0.1 + rate


def test_typo_rejects_a_rate_outside_unit_interval():
    with pytest.raises(ValueError, match="typo rate"):
        typo("nose", 1.5, 0)


def test_wrong_class_never_returns_the_true_class_and_is_seeded():
    names = ["tabby cat", "office chair", "garden chair", "sedan"]
    for seed in range(20):
        assert wrong_class("tabby cat", names, seed) != "tabby cat"
        assert wrong_class("tabby cat", names, seed) == wrong_class("tabby cat", names, seed)
    assert len({wrong_class("tabby cat", names, s) for s in range(20)}) == 3
    with pytest.raises(ValueError):
        wrong_class("sedan", ["sedan"], 0)


def test_default_template_maps_hold_the_papers_table5_rewrites():
    maps = load_template_maps()
    pairs = {(k, v) for m in maps.values() for k, v in m.items()}
    assert pairs == {("paw", "foreleg"), ("elbow", "forearm"), ("eye", "eyeball"), ("paw", "foot"),
                     ("shoulder", "upper arm")}


def test_rewrite_replaces_whole_words_only():
    assert rewrite("left front paws", {"paw": "foreleg"}) == "left front forelegs"
    assert rewrite("Left Eye", {"eye": "eyeball"}) == "Left eyeball"
    assert rewrite("eyebrow", {"eye": "eyeball"}) == "eyebrow"


def test_custom_flat_map_file_and_bad_file(tmp_path):
    (tmp_path / "mine.json").write_text(json.dumps({"spout": "nozzle"}))
    assert load_template_maps(tmp_path / "mine.json") == {"mine": {"spout": "nozzle"}}
    (tmp_path / "bad.json").write_text(json.dumps({"spout": 3}))
    with pytest.raises(ValueError, match="bad.json"):
        load_template_maps(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="--template-map"):
        load_template_maps(tmp_path / "none.json")


def test_keypoint_variants_hold_clean_typo_and_template_texts():
    v = keypoint_variants(WORDS, typo_rates=(0.1, 0.3), seed=0)
    assert v["clean"] == WORDS
    assert set(v) == {"clean", "typo@0.1", "typo@0.3"} | {f"template:{n}" for n in load_template_maps()}
    assert all(len(texts) == len(WORDS) for texts in v.values())
    assert v["template:paw-foreleg"][3] == "left front foreleg"
    assert v["typo@0.3"] != WORDS
