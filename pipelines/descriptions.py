"""The reference's keypoint texts as data: ``python -m pipelines.descriptions --reference DIR --out FILE``.

The CapeNext and CapeX reference code replaces MP-100's keypoint names by hand-written descriptions
(``left front paw`` → ``...``) in ``models/datasets/datasets/mp100/utils.py``: a dispatcher
``rename_points_descriptions(category, test_type)`` picks one function per text variant (the regular
texts the published weights were trained and tested with, and the typo, synonym, translation,
no-position and manual-rewrite variants of the robustness study), and each function is an if/elif chain
over ``category['supercategory']``, ``category['name']`` or ``category['id']`` whose first matching branch
gives the category's list of texts; its ``else`` keeps the annotation's names (``_`` → space, optionally
rewritten by substring replacements) or stops the program.

This job reads that file with Python's :mod:`ast` (it is never imported or run) and writes, per variant,
the ordered rules (``field``, ``values``, ``texts``, the source line) and what happens when no rule
matches, with provenance: the file's sha256 and the checkout's commit (read from ``.git`` without running
git where possible). The texts are the reference's; the file written is for the user's own runs
(``--descriptions FILE``), :func:`capenext.data.mp100.load_descriptions` reads it, and
:meth:`capenext.data.mp100.Descriptions.apply` applies it as the reference does.

Output (``format`` ``capenext-descriptions/1``)::

    {"format": ..., "source": {"file": "models/.../utils.py", "sha256": ..., "commit": ... or null},
     "variants": {"regular": {"function": "regular_descriptions", "line": 28,
                              "rules": [{"field": "supercategory", "values": ["animal_face"],
                                         "texts": [...], "line": 30}, ...],
                              "otherwise": {"kind": "names", "replace": []}}, ...}}

``otherwise.kind`` is ``names`` (the annotation's names, ``_`` → space, then each ``[old, new]`` of
``replace`` as the reference's loop applies it), ``keep`` (no ``else``: the names unchanged) or ``stop``
(the reference exits: a category no rule matches is an error).

A shape the reader does not know (another condition, a computed list, an unknown ``else``) is one line
naming the file and line; nothing is written unless the whole file reads.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from capenext.cli import run_main
from capenext.data.mp100 import DESCRIPTIONS_FORMAT, RULE_FIELDS, TEXT_VARIANTS
from capenext.files import file_sha256, write_atomic

REFERENCE_FILE = "models/datasets/datasets/mp100/utils.py"
DISPATCHER = "rename_points_descriptions"
# the reference's test_type for each of our variant names (the regular texts: "regular_test" in
# CapeNext, None in CapeX)
TEST_TYPES: dict[str, tuple[str | None, ...]] = {
    "regular": ("regular_test", None),
    "typo": ("typo_test",),
    "synonyms": ("synonyms_test",),
    "translate": ("translate_test",),
    "no_position": ("no_position_test",),
    "manual": ("manual_modification",),
    "manual_v1": ("manual_modification_v1",),
    "manual_paw": ("manual_modification_paw",),
    "manual_eye": ("manual_modification_eye",),
    "manual_elbow": ("manual_modification_elbow",),
    "manual_shoulder": ("manual_modification_shoulder",),
}
assert tuple(TEST_TYPES) == TEXT_VARIANTS
EXIT_CALLS = ("exit", "quit", "sys.exit", "os._exit")


class ReferenceShapeError(ValueError):
    """A shape of the reference file this reader does not know: ``FILE:LINE: what``."""


class _Reader:
    def __init__(self, path: Path, source: str):
        self.path = path
        try:
            self.tree = ast.parse(source, filename=str(path))
        except SyntaxError as err:
            raise ReferenceShapeError(f"{path}:{err.lineno}: not valid Python ({err.msg})") from None
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}

    def fail(self, node: ast.AST | None, what: str) -> ReferenceShapeError:
        line = getattr(node, "lineno", "?")
        return ReferenceShapeError(f"{self.path}:{line}: {what}")

    # --- the dispatcher: test_type → function -----------------------------------------------------

    def dispatch(self) -> dict[str | None, ast.FunctionDef]:
        fn = self.functions.get(DISPATCHER)
        if fn is None:
            raise ReferenceShapeError(f"{self.path}: no function {DISPATCHER}() (is this the reference's "
                                 f"{REFERENCE_FILE}?)")
        if len(fn.args.args) < 2:
            raise self.fail(fn, f"{DISPATCHER}() should take (category, test_type)")
        arg = fn.args.args[1].arg
        chain = [s for s in fn.body if not _is_docstring(s)]
        if not chain or not isinstance(chain[0], ast.If):
            raise self.fail(fn, f"{DISPATCHER}() is not an if/elif chain over {arg}")
        out: dict[str | None, ast.FunctionDef] = {}
        for test, body in _branches(chain[0])[0]:
            keys = self._test_types(test, arg)
            if len(body) != 1 or not isinstance(body[0], ast.Return) or not isinstance(body[0].value, ast.Call) \
                    or not isinstance(body[0].value.func, ast.Name):
                raise self.fail(test, f"a branch of {DISPATCHER}() that is not 'return function(category)'")
            name = body[0].value.func.id
            if name not in self.functions:
                raise self.fail(body[0], f"{DISPATCHER}() calls {name}(), which the file does not define")
            for key in keys:
                out.setdefault(key, self.functions[name])
        return out

    def _test_types(self, test: ast.expr, arg: str) -> list[str | None]:
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
            return [k for value in test.values for k in self._test_types(value, arg)]
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.left, ast.Name) \
                and test.left.id == arg and isinstance(test.comparators[0], ast.Constant):
            op, value = test.ops[0], test.comparators[0].value
            if isinstance(op, (ast.Eq, ast.Is)) and (value is None or isinstance(value, str)):
                return [value]
        raise self.fail(test, f"a condition of {DISPATCHER}() that is not '{arg} == \"...\"' or "
                              f"'{arg} is None'")

    # --- one variant's function: rules and what happens otherwise ----------------------------------

    def variant(self, fn: ast.FunctionDef) -> dict[str, Any]:
        if not fn.args.args:
            raise self.fail(fn, f"{fn.name}() takes no category argument")
        category = fn.args.args[0].arg
        body = [s for s in fn.body if not _is_docstring(s)]
        chains = [s for s in body if isinstance(s, ast.If)]
        ret = body[-1] if body else None
        if len(chains) != 1 or not isinstance(ret, ast.Return) or not isinstance(ret.value, ast.Name):
            raise self.fail(fn, f"{fn.name}() is not one if/elif chain followed by 'return <list>'")
        result = ret.value.id
        for s in body:
            if s is chains[0] or s is ret:
                continue
            if not (_assigns(s, result) and isinstance(s.value, ast.List) and not s.value.elts):
                raise self.fail(s, f"{fn.name}(): a statement outside the if/elif chain that is not "
                                   f"'{result} = []'")
        branches, orelse = _branches(chains[0])
        rules = []
        for test, stmts in branches:
            field, values = self._condition(test, category, fn.name)
            rules.append({"field": field, "values": values, "texts": self._texts(stmts, result, fn.name, test),
                          "line": test.lineno})
        return {"function": fn.name, "line": fn.lineno, "rules": rules,
                "otherwise": self._otherwise(orelse, category, result, fn.name, chains[0])}

    def _condition(self, test: ast.expr, category: str, fn: str) -> tuple[str, list]:
        ok = (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.In))
              and _is_field(test.left, category))
        if ok:
            field = test.left.slice.value
            right = test.comparators[0]
            if isinstance(test.ops[0], ast.Eq) and isinstance(right, ast.Constant):
                values = [right.value]
            elif isinstance(test.ops[0], ast.In) and isinstance(right, (ast.List, ast.Tuple, ast.Set)) \
                    and all(isinstance(e, ast.Constant) for e in right.elts):
                values = [e.value for e in right.elts]
            else:
                values = None
            if values is not None and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
                return field, values
        fields = " or ".join(f"{category}['{f}']" for f in RULE_FIELDS)
        raise self.fail(test, f"{fn}(): a condition that is not '{fields} == <constant>' or 'in [<constants>]'")

    def _texts(self, stmts: list[ast.stmt], result: str, fn: str, where: ast.AST) -> list[str]:
        if len(stmts) == 1 and _assigns(stmts[0], result) and isinstance(stmts[0].value, ast.List):
            elts = stmts[0].value.elts
            if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
                return [e.value for e in elts]
        node = stmts[0] if stmts else where
        raise self.fail(node, f"{fn}(): a branch that is not one '{result} = [<strings>]'")

    def _otherwise(self, stmts: list[ast.stmt], category: str, result: str, fn: str, chain: ast.If) -> dict:
        if not stmts:
            return {"kind": "keep"}
        for s in stmts:  # print(...) lines, then exit(): the reference stops on an unknown category
            if _calls(s, ("print",)):
                continue
            if _calls(s, EXIT_CALLS) or isinstance(s, ast.Raise):
                return {"kind": "stop", "line": s.lineno}
            break
        # the annotation's names with '_' → ' ', then optionally substring replacements
        first = stmts[0]
        if len(stmts) < 2 or not (_assigns(first, result) and _is_field(first.value, category)
                                  and first.value.slice.value == "keypoints"):
            raise self.fail(first, f"{fn}(): an else branch that is not the annotation's names "
                                   f"('{result} = {category}[\"keypoints\"]') or print + exit")
        if not _is_underscore_to_space(stmts[1], result):
            raise self.fail(stmts[1], f"{fn}(): expected '{result} = [k.replace(\"_\", \" \") for k in {result}]'")
        replace: list[list[str]] = []
        for s in stmts[2:]:
            replace += self._replacements(s, result, fn)
        return {"kind": "names", "replace": replace}

    def _replacements(self, loop: ast.stmt, result: str, fn: str) -> list[list[str]]:
        """``for i, prompt in enumerate(result): if 'old' in prompt: result[i] = prompt.replace('old', 'new')``."""
        shape = (f"{fn}(): an else statement that is not 'for i, p in enumerate({result}): "
                 f"if \"old\" in p: {result}[i] = p.replace(\"old\", \"new\")'")
        bad = self.fail(loop, shape)
        ok = (isinstance(loop, ast.For) and not loop.orelse and isinstance(loop.target, ast.Tuple)
              and len(loop.target.elts) == 2 and all(isinstance(e, ast.Name) for e in loop.target.elts)
              and isinstance(loop.iter, ast.Call) and isinstance(loop.iter.func, ast.Name)
              and loop.iter.func.id == "enumerate" and len(loop.iter.args) == 1
              and isinstance(loop.iter.args[0], ast.Name) and loop.iter.args[0].id == result)
        if not ok:
            raise bad
        index, prompt = (e.id for e in loop.target.elts)
        out = []
        for s in loop.body:
            if not (isinstance(s, ast.If) and not s.orelse and len(s.body) == 1):
                raise self.fail(s, shape)
            t, a = s.test, s.body[0]
            test_ok = (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.In)
                       and isinstance(t.left, ast.Constant) and isinstance(t.left.value, str)
                       and isinstance(t.comparators[0], ast.Name) and t.comparators[0].id == prompt)
            target_ok = (isinstance(a, ast.Assign) and len(a.targets) == 1 and isinstance(a.targets[0], ast.Subscript)
                         and isinstance(a.targets[0].value, ast.Name) and a.targets[0].value.id == result
                         and isinstance(a.targets[0].slice, ast.Name) and a.targets[0].slice.id == index)
            call = a.value if isinstance(a, ast.Assign) else None
            call_ok = (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                       and call.func.attr == "replace" and isinstance(call.func.value, ast.Name)
                       and call.func.value.id == prompt and len(call.args) == 2 and not call.keywords
                       and all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in call.args))
            if not (test_ok and target_ok and call_ok) or call.args[0].value != t.left.value:
                raise self.fail(s, f"{fn}(): a replacement that is not 'if \"old\" in {prompt}: "
                                   f"{result}[{index}] = {prompt}.replace(\"old\", \"new\")'")
            out.append([call.args[0].value, call.args[1].value])
        return out


def _is_docstring(s: ast.stmt) -> bool:
    return isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)


def _branches(chain: ast.If) -> tuple[list[tuple[ast.expr, list[ast.stmt]]], list[ast.stmt]]:
    """An if/elif chain as ``[(test, body), ...]`` in order, and the final ``else`` body."""
    out = []
    node = chain
    while True:
        out.append((node.test, node.body))
        if len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If):
            node = node.orelse[0]
            continue
        return out, node.orelse


def _assigns(s: ast.stmt, name: str) -> bool:
    return (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
            and s.targets[0].id == name)


def _is_field(node: ast.expr, category: str) -> bool:
    return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == category
            and isinstance(node.slice, ast.Constant)
            and node.slice.value in (*RULE_FIELDS, "keypoints"))


def _calls(s: ast.stmt, names: tuple[str, ...]) -> bool:
    return isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and ast.unparse(s.value.func) in names


def _is_underscore_to_space(s: ast.stmt, result: str) -> bool:
    if not (_assigns(s, result) and isinstance(s.value, ast.ListComp) and len(s.value.generators) == 1):
        return False
    gen, elt = s.value.generators[0], s.value.elt
    return (isinstance(gen.target, ast.Name) and isinstance(gen.iter, ast.Name) and gen.iter.id == result
            and not gen.ifs and isinstance(elt, ast.Call) and isinstance(elt.func, ast.Attribute)
            and elt.func.attr == "replace" and isinstance(elt.func.value, ast.Name)
            and elt.func.value.id == gen.target.id
            and [getattr(a, "value", None) for a in elt.args] == ["_", " "])


def read_reference(path: str | Path, variants: list[str]) -> dict[str, dict[str, Any]]:
    """``variant → {"function", "line", "rules", "otherwise"}`` for each asked variant, read from the
    reference's ``utils.py`` at ``path`` (parsed, never run)."""
    path = Path(path)
    reader = _Reader(path, path.read_text(encoding="utf-8"))
    dispatch = reader.dispatch()
    out = {}
    for variant in variants:
        fn = next((dispatch[t] for t in TEST_TYPES[variant] if t in dispatch), None)
        if fn is None:
            have = [v for v in TEXT_VARIANTS if any(t in dispatch for t in TEST_TYPES[v])]
            raise ReferenceShapeError(f"{path}: {DISPATCHER}() has no {variant!r} texts (test_type "
                                 f"{TEST_TYPES[variant][0]!r}); this file has {have}")
        out[variant] = reader.variant(fn)
    return out


def available_variants(path: str | Path) -> list[str]:
    """The variants the reference file's dispatcher offers, in our order."""
    path = Path(path)
    dispatch = _Reader(path, path.read_text(encoding="utf-8")).dispatch()
    return [v for v in TEXT_VARIANTS if any(t in dispatch for t in TEST_TYPES[v])]


# --- provenance --------------------------------------------------------------------------------------


def _git_dir(checkout: Path) -> Path | None:
    git = checkout / ".git"
    if git.is_file():  # a worktree or submodule: "gitdir: <path>"
        m = re.match(r"gitdir:\s*(.+)", git.read_text().strip())
        git = (checkout / m[1]).resolve() if m else None
    return git if git is not None and git.is_dir() else None


def git_commit(checkout: str | Path) -> str | None:
    """The checkout's HEAD commit, read from ``.git`` (HEAD, loose refs, packed-refs); ``git rev-parse``
    only when the files do not say; ``None`` when it is not a git checkout."""
    checkout = Path(checkout)
    git = _git_dir(checkout)
    if git is None:
        return None
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    head = (git / "HEAD").read_text().strip() if (git / "HEAD").is_file() else ""
    if re.fullmatch(r"[0-9a-f]{40}", head):
        return head
    if head.startswith("ref: "):
        ref = head[5:].strip()
        for base in dict.fromkeys([git, common]):
            loose = base / ref
            if loose.is_file() and re.fullmatch(r"[0-9a-f]{40}", loose.read_text().strip()):
                return loose.read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref and re.fullmatch(r"[0-9a-f]{40}", parts[0]):
                        return parts[0]
    if shutil.which("git"):
        proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False)
        if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", proc.stdout.strip()):
            return proc.stdout.strip()
    return None


def describe(reference: str | Path, variants: list[str]) -> dict[str, Any]:
    """The descriptions document for a reference checkout: provenance and the asked variants' rules."""
    reference = Path(reference)
    if not reference.is_dir():
        raise FileNotFoundError(f"--reference {reference}: no such folder (a checkout of yzrs/CapeNext or "
                                "matanr/capex)")
    path = reference / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--reference {reference}: no {REFERENCE_FILE} (pass the root of a checkout of "
                                "yzrs/CapeNext or matanr/capex)")
    if variants == ["all"]:
        variants = available_variants(path)
    return {
        "format": DESCRIPTIONS_FORMAT,
        "source": {"file": REFERENCE_FILE, "sha256": file_sha256(path), "commit": git_commit(reference)},
        "variants": read_reference(path, variants),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.descriptions",
        description="Read the reference's keypoint texts (the if/elif rules of models/datasets/datasets/mp100/"
                    "utils.py in a checkout of yzrs/CapeNext or matanr/capex; parsed, never run) into a "
                    "descriptions file for --descriptions, with the file's sha256 and the checkout's commit.",
        epilog="example:\n"
               "  git clone https://github.com/yzrs/CapeNext reference\n"
               "  python -m pipelines.descriptions --reference reference --out descriptions.json --variant all\n"
               "  python -m pipelines.embed --shards shards --out emb --clip-checkpoint ViT-B-32.pt "
               "--descriptions descriptions.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reference", type=Path, required=True, help="root of a checkout of yzrs/CapeNext or matanr/capex")
    p.add_argument("--out", type=Path, required=True, help="descriptions file to write (.json)")
    p.add_argument("--variant", default="regular", choices=[*TEXT_VARIANTS, "all"],
                   help="which texts: regular (default; the published weights'), a robustness variant, or all "
                        "the file has")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = describe(args.reference, [args.variant])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode())
    src = doc["source"]
    print(f"{REFERENCE_FILE} (sha256 {src['sha256'][:12]}, commit {(src['commit'] or 'unknown')[:12]}) → {args.out}")
    for name, v in doc["variants"].items():
        other = v["otherwise"]
        rest = {"names": "annotation names", "keep": "names unchanged", "stop": "stop"}[other["kind"]]
        if other.get("replace"):
            rest += " with " + ", ".join(f"{a} → {b}" for a, b in other["replace"])
        print(f"  {name:<16} {len(v['rules']):>3} rules ({v['function']}, line {v['line']}); otherwise: {rest}",
              file=sys.stdout)
    return 0


if __name__ == "__main__":
    run_main(main)
