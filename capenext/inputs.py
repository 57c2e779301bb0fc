"""A prediction's inputs, as people type them: keypoint names, class, skeleton and box, parsed and checked.

One set of rules for every way in (:class:`capenext.predict.Predictor`, ``python -m jobs.predict``, the
HTTP API and page of ``python -m jobs.serve``): the ``parse_*`` functions read text (a command-line flag, a
form field), the ``check_*`` functions check values against the model and the image. Every problem raises
``ValueError`` (``FileNotFoundError`` for a missing file) with one line naming what is wrong; ``field`` is
how the caller names the input in that line (``--keypoints``, ``'keypoints'``), so the line says what to fix.
A command line maps the error to its ``error:`` line, the server to a 400 answer.

Every text is bounded before anything else reads it (the server gets these from strangers): a keypoint name
or description and the class name at most :data:`MAX_TEXT_CHARS` characters (more than CLIP's 77-token
context holds in ordinary words, so no text the model can read is refused here; the model's own refusal of
a text over 77 tokens, :meth:`capenext.models.clip.FrozenCLIP.check_texts`, then costs at most tokenizing
that much), the keypoints field as a whole :data:`MAX_NAMES_TEXT_CHARS`, the skeleton
:data:`MAX_SKELETON_CHARS`, the box :data:`MAX_BBOX_CHARS`; names and class hold no control characters
(C0, DEL, C1, NUL included). JSON lists are read with their depth and numbers bounded (a refusal, never a
``RecursionError``).
"""

from __future__ import annotations

import json
import re
import reprlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from capenext.data.mp100 import text_of

__all__ = ["MAX_BBOX_CHARS", "MAX_NAMES_TEXT_CHARS", "MAX_SKELETON_CHARS", "MAX_TEXT_CHARS", "check_bbox",
           "check_class_name", "check_names", "check_skeleton", "check_text", "keypoint_texts", "parse_bbox",
           "parse_names", "parse_skeleton", "read_keypoints_file"]

EXAMPLE_NAMES = "nose,left eye"
MAX_TEXT_CHARS = 400  # one keypoint name or description, one class name (77 CLIP tokens of words fit in ~350)
MAX_NAMES_TEXT_CHARS = 256 * 1024  # the keypoints field: 100 names of MAX_TEXT_CHARS, JSON-escaped, fit
MAX_SKELETON_CHARS = 20_000  # a few thousand edges
MAX_BBOX_CHARS = 200  # four numbers
MAX_INDEX_DIGITS = 6  # a skeleton index (keypoint slots are a few hundred at most)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 (NUL included), DEL, C1

_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxlist, _short_repr.maxtuple = 3, 4, 4
_short_repr.maxstring, _short_repr.maxlong, _short_repr.maxother = 60, 40, 60


def short(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, safe on deep nesting and huge numbers (for error lines)."""
    return _short_repr.repr(value)


# --- text → values ---------------------------------------------------------------------------------


def _bounded(text: str, field: str, limit: int) -> str:
    if len(text) > limit:
        raise ValueError(f"{field} is {len(text)} characters, over the limit of {limit}")
    return text


def check_text(text: str, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` (a keypoint name or description, a class name) when it is at most ``limit`` characters and
    holds no control character; one line naming ``what`` otherwise."""
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters, over the limit of {limit} (shorten it)")
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(f"{what} contains the control character U+{ord(bad.group()):04X} at position "
                         f"{bad.start()} (names are printable text)")
    return text


def _json_list(text: str, field: str) -> list:
    """Text that starts with ``[``, read as the JSON list it must be (deep nesting and numbers too long to
    read are one line, as any other bad JSON)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{field} starts like a JSON list but is not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{field} starts like a JSON list but is not one we read (nested too deeply)") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise ValueError(f"{field} starts like a JSON list but holds a number with too many digits") from None
    if not isinstance(value, list):
        raise ValueError(f"{field} starts like a JSON list but is not one")
    return value


def parse_names(text: str | None, field: str = "keypoints", *, json_list: bool = False) -> list[str]:
    """Keypoint names: ``"nose,left eye"`` → ``["nose", "left eye"]`` (each stripped), or, with
    ``json_list``, a JSON list of strings (text starting with ``[``). One line for no names at all and for
    an empty name (``"nose,,eye"``)."""
    alternative = ", or a JSON list of strings" if json_list else ""
    if text is None or not text.strip():
        raise ValueError(f"no keypoint names: {field} is empty (comma-separated names, e.g. {EXAMPLE_NAMES}"
                         f"{alternative})")
    _bounded(text, field, MAX_NAMES_TEXT_CHARS)
    stripped = text.strip()
    if json_list and stripped.startswith("["):
        names = _json_list(stripped, field)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"{field} as JSON must be a list of strings")
        names = [n.strip() for n in names]
    else:
        names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise ValueError(f"no keypoint names: {field} holds only separators or blanks (comma-separated names, "
                         f"e.g. {EXAMPLE_NAMES}{alternative})")
    if not all(names):
        raise ValueError(f"{field} has an empty name at position {names.index('')}: {short(text)}")
    for i, name in enumerate(names):
        check_text(name, f"{field} name {i}")
    return names


def parse_skeleton(text: str | None, field: str = "skeleton", *, json_list: bool = False) -> list:
    """Edges: ``"0-1,0-2"`` → ``[(0, 1), (0, 2)]``, or, with ``json_list``, a JSON list of index pairs (text
    starting with ``[``; :func:`check_skeleton` checks its items). ``None`` or blank is no skeleton."""
    if text is None or not text.strip():
        return []
    _bounded(text, field, MAX_SKELETON_CHARS)
    if json_list and text.strip().startswith("["):
        return _json_list(text.strip(), field)
    edges = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = (p.strip() for p in part.partition("-"))
        if not sep or not a.isdecimal() or not b.isdecimal() or not (a.isascii() and b.isascii()):
            raise ValueError(f"skeleton edge {short(part)} is not of the form A-B with 0-based indices "
                             "(e.g. 0-1,0-2)")
        if max(len(a), len(b)) > MAX_INDEX_DIGITS:
            raise ValueError(f"skeleton edge {short(part)}: an index of more than {MAX_INDEX_DIGITS} digits")
        edges.append((int(a), int(b)))
    return edges


def parse_bbox(text: str | None, field: str = "bbox") -> tuple[float, float, float, float] | None:
    """``"x,y,w,h"`` → four floats (image pixels: top-left corner and size); ``None`` → ``None`` (the whole
    image). One line when it is not four numbers; :func:`check_bbox` checks it against the image."""
    if text is None:
        return None
    _bounded(text, field, MAX_BBOX_CHARS)
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ValueError(f"bbox {text.strip()!r} is not four numbers x,y,w,h (pixels, top-left corner and size)")
    return values  # type: ignore[return-value]


def read_keypoints_file(path: str | Path) -> dict[str, Any]:
    """A keypoints file, ``{"class", "names", "skeleton"}`` or an MP-100 category record (``{"name",
    "keypoints", "skeleton", "supercategory", "id"}``) → ``{"class", "names", "skeleton", "supercategory",
    "id"}`` (the skeleton as given: :func:`check_skeleton` checks it)."""
    path = Path(path)
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


def keypoint_texts(names: Sequence[str], class_name: str | None, descriptions: str | Path | None,
                   variant: str = "regular", supercategory: str = "", category_id: int | None = None) -> list[str]:
    """The texts the model reads for ``names``: the names themselves, or, with a ``descriptions`` file
    (``python -m pipelines.descriptions``, or a CapeX-style name → texts map), what it gives the category
    (its rules match the class name, ``supercategory`` and ``category_id``, as for an MP-100 category)."""
    from capenext.data.mp100 import Category, load_descriptions

    desc = load_descriptions(descriptions, variant) if descriptions else None
    if desc is None:
        return list(names)
    cat = Category(category_id if isinstance(category_id, int) else -1, class_name or "", supercategory,
                   tuple(names), ())
    return list(desc.apply(cat, f"category {class_name!r}").keypoints)


# --- values against the model and the image --------------------------------------------------------


def check_names(names: Sequence[str], slots: int) -> list[str]:
    """The keypoint names as the model reads them (``_`` → space, stripped); one-line errors (also for a
    name over :data:`MAX_TEXT_CHARS` characters or with a control character)."""
    if isinstance(names, str):
        raise ValueError(f"names must be a list of keypoint names, got the string {short(names)} "
                         "(split it: 'nose,left eye' → ['nose', 'left eye'])")
    names = list(names)
    if not names:
        raise ValueError("no keypoint names given: pass at least one name")
    if len(names) > slots:
        raise ValueError(f"{len(names)} keypoint names given, the model has {slots} keypoint slots "
                         f"(at most {slots} names)")
    texts = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not text_of(name):
            raise ValueError(f"keypoint name {i} is empty or not a string ({short(name)})")
        texts.append(check_text(text_of(name), f"keypoint name {i}"))
    return texts


def check_class_name(class_name: str | None, needed: bool, ablation: str,
                     how: str = "pass class_name (e.g. 'cat')", field: str = "class name") -> str | None:
    """The class name, stripped (``None`` when absent, blank or not a string); one line when the model
    reads a class embedding (``needed``, every ablation but ``baseline`` and ``img_only``) and there is no
    name (``how`` says how to give one), and for a name over :data:`MAX_TEXT_CHARS` characters or with a
    control character (``field`` names it)."""
    text = class_name.strip() if isinstance(class_name, str) else ""
    if needed and not text_of(text):
        raise ValueError(f"the {ablation!r} model reads a class name: {how}")
    if text:
        check_text(text, field)
    return text or None


def check_skeleton(skeleton: Sequence[Sequence[int]] | None, num_names: int) -> list[tuple[int, int]]:
    """Edges as 0-based ``(a, b)`` pairs of name indices; one-line errors for a bad pair or index."""
    edges = []
    for edge in skeleton or ():
        pair = tuple(edge) if isinstance(edge, (list, tuple)) else (edge,)
        if len(pair) != 2 or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in pair):
            raise ValueError(f"skeleton edge {short(edge)} is not a pair of integer keypoint indices")
        a, b = int(pair[0]), int(pair[1])
        if not (0 <= a < num_names and 0 <= b < num_names):
            raise ValueError(f"skeleton index out of range in edge {short(a)}-{short(b)}: {num_names} keypoint "
                             f"names, valid indices 0..{num_names - 1}")
        edges.append((a, b))
    return edges


def check_bbox(bbox: Sequence[float] | None, width: int, height: int) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` inside the ``width`` x ``height`` image (the whole image when ``None``)."""
    if bbox is None:
        return (0.0, 0.0, float(width), float(height))
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"bbox must be 4 numbers x, y, w, h, got {short(bbox)}") from None
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise ValueError(f"bbox {x:g},{y:g},{w:g},{h:g} must have a positive width and height")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise ValueError(f"bbox {x:g},{y:g},{w:g},{h:g} lies outside the {width}x{height} image (it needs "
                         f"0 <= x, 0 <= y, x + w <= {width}, y + h <= {height})")
    return (x, y, w, h)
