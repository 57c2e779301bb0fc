"""``pip install capenext`` (no extras) is enough for ``Predictor``: the library needs neither Ray, MLflow nor
the web stack, and ``pyproject.toml``'s core dependencies do not name them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

from tests.conftest import REPO

# the top-level modules of what only the extras install (train: Ray, MLflow and the formats' writers and
# readers; serve: Ray Serve and the web stack); tqdm and yaml are not here, the core's own dependencies
# (open_clip, timm) bring them
EXTRAS_ONLY = ("ray", "mlflow", "gradio", "fastapi", "starlette", "pydantic", "multipart", "python_multipart",
               "aiohttp", "webdataset", "pyarrow", "pandas", "matplotlib", "pycocotools")
NOT_CORE = {"ray", "mlflow", "gradio", "fastapi"}

# the child makes EXTRAS_ONLY unimportable as if not installed (ModuleNotFoundError on import), then saves a
# randomly initialised tiny model with capenext.checkpoint and predicts with it
CHILD = r'''
import importlib.abc, importlib.machinery, json, sys

BLOCKED = set(sys.argv[1].split(","))


class NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)  # origin None: a probe sees nothing to skip
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (an extra: not installed here)", name=spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, NotInstalled())
for name in BLOCKED:  # the blocker holds, before anything of ours is imported
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} is still importable")

import numpy as np
import torch

from capenext.checkpoint import save_checkpoint
from capenext.config import load_preset
from capenext.models import build_model
from capenext.predict import Predictor

cfg = load_preset("tiny")
torch.manual_seed(0)
save_checkpoint("tiny.pt", build_model(cfg.model), cfg)
predictor = Predictor("tiny.pt")
image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
points = predictor.predict(image, ["nose", "left eye", "tail"], "cat", [(0, 1), (0, 2)], (5, 5, 60, 40))
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps({"points": points, "loaded": loaded}))
'''


def test_predictor_works_without_ray_mlflow_or_the_web_stack(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(EXTRAS_ONLY)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [p["name"] for p in result["points"]] == ["nose", "left eye", "tail"]
    assert all(0.0 <= p["score"] <= 1.0 for p in result["points"])
    assert result["loaded"] == []


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalised (``open_clip_torch`` → ``open-clip-torch``)."""
    return {re.split(r"[\s\[<>=!~;]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_core_dependencies_name_no_ray_mlflow_or_web_stack():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = _names(project["dependencies"])
    assert not core & NOT_CORE, sorted(core & NOT_CORE)
    assert {"torch", "timm", "open-clip-torch"} <= core
    extras = project["optional-dependencies"]
    assert {"ray", "mlflow"} <= _names(extras["train"]) and {"ray", "gradio", "fastapi"} <= _names(extras["serve"])
    assert any(r.replace(" ", "").startswith("capenext[") and "train" in r and "serve" in r for r in extras["dev"])


# versions below these admit known vulnerabilities or keyword arguments we pass that are not there
FLOORS = {"torch": "2.6", "pillow": "10.3", "aiohttp": "3.12.14", "ray": "2.52"}


def _requirements() -> list:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    every = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    return [Requirement(r) for r in every if not r.replace(" ", "").startswith("capenext[")]


def test_no_requirement_admits_a_version_below_its_security_floor():
    from packaging.version import Version

    found = {name: [] for name in FLOORS}
    for req in _requirements():
        name = req.name.lower().replace("_", "-")
        if name in FLOORS:
            found[name].append(req)
            # a release just under the floor must be refused by every specifier naming the package
            probe = Version(FLOORS[name] + ".dev0")
            assert not req.specifier.contains(probe, prereleases=True), f"{req} admits {probe}"
    assert all(found.values()), {k: v for k, v in found.items() if not v}
    gradio = [r for r in _requirements() if r.name.lower() == "gradio"]
    assert gradio and all(not r.specifier.contains("7.0") for r in gradio), gradio


def test_the_lock_file_pins_every_requirement_within_its_range():
    """``cluster/requirements.lock`` (what the README's commands install with ``-c``) pins one version of
    every package pyproject asks for, inside the range asked."""
    from packaging.version import Version

    pins = {}
    for line in (REPO / "cluster" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = Version(version.strip())
    for req in _requirements():
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in cluster/requirements.lock (bash cluster/lock.sh)"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, outside {req}"
