"""The layering: ``capenext/`` is a pure PyTorch library (nothing under it imports ray, mlflow or gradio, nor\n``pipelines``/``jobs``); jobs take from ``pipelines`` only its runtime layer and public names."""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = {"ray", "mlflow", "gradio"}
LIBRARY = Path(__file__).resolve().parents[1] / "capenext"


def imported_roots(source: str) -> set[str]:
    """Top-level package names imported anywhere in ``source`` (module level or inside functions)."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_the_checker_sees_every_import_form():
    source = (
        "import os\nimport ray.train as rt\nfrom mlflow import log_metric\n"
        "def f():\n    import importlib\n    importlib.import_module('ray.data')\n    __import__('mlflow')\n"
        "from . import sibling\n"
    )
    assert imported_roots(source) == {"os", "ray", "mlflow", "importlib"}


def test_nothing_under_capenext_imports_ray_or_mlflow():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 5, "capenext/ sources not found"
    offenders = {str(f.relative_to(LIBRARY.parent)): sorted(imported_roots(f.read_text()) & FORBIDDEN)
                 for f in files}
    assert {f: mods for f, mods in offenders.items() if mods} == {}


JOBS = LIBRARY.parent / "jobs"


def test_the_library_imports_neither_pipelines_nor_jobs():
    offenders = {str(f.relative_to(LIBRARY.parent)): sorted(imported_roots(f.read_text()) & {"pipelines", "jobs"})
                 for f in sorted(LIBRARY.rglob("*.py"))}
    assert {f: mods for f, mods in offenders.items() if mods} == {}


def _imported_modules(source: str) -> set[str]:
    """Dotted names of the project modules imported anywhere in ``source``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_training_evaluation_prediction_and_serving_import_nothing_from_pipelines():
    """The data pipelines are not a dependency of training, evaluation, prediction or serving, nor of the
    runtime layer under the jobs: what they share with the pipelines is the library's."""
    users = [JOBS / f"{name}.py" for name in ("train", "evaluate", "predict", "serve")]
    for sub in ("training", "serving", "runtime"):
        users += sorted((JOBS / sub).glob("*.py"))
    offenders = {}
    for f in users:
        bad = sorted(m for m in _imported_modules(f.read_text()) if m.split(".")[0] == "pipelines")
        if bad:
            offenders[str(f.relative_to(JOBS.parent))] = bad
    assert len(users) > 12 and offenders == {}


def test_no_job_imports_a_private_name_of_another_module():
    """A job calls another job's public functions only (``from jobs.train import _x`` is refused)."""
    found = []
    for f in sorted(JOBS.rglob("*.py")) + sorted((LIBRARY.parent / "pipelines").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("jobs", "pipelines"):
                found += [f"{f.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []
