"""Registering a capenext checkpoint as an MLflow model (what ``python -m jobs.register`` and
``jobs.train --register`` do); see :mod:`jobs.register` for what is stored and how it is read back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from capenext.cli import UsageError
from capenext.files import file_sha256
from jobs.runtime.checkpoints import CHECKPOINT_ARTIFACT, RUN_ID, resolve_checkpoint
from jobs.runtime.tracking import ensure_experiment, find_run, require_store
from jobs.runtime.tracking import tracking_uri as resolve_uri

DEFAULT_EXPERIMENT = "capenext"
# MLflow's own rules are looser; these keep models:/NAME@ALIAS and models:/NAME/VERSION unambiguous
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,254}")
ALIAS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,254}")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise UsageError(f"--name {name!r}: a model name is letters, digits, '_', '-', '.' and spaces, starting "
                         "with a letter or digit (no '/', '@' or ':')")
    return name


def check_alias(alias: str | None) -> str | None:
    if alias is None:
        return None
    if not ALIAS_RE.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise UsageError(f"--alias {alias!r}: an alias is letters, digits, '_' and '-', starting with a letter, "
                         "and neither 'latest' nor v<number> (MLflow reserves those)")
    return alias


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's SQL registry looks the LoggedModel up through the process-wide tracking URI when a version
    is created; point it at ``uri`` for the duration, then put back exactly what was there (the global and
    ``MLFLOW_TRACKING_URI``, which ``mlflow.set_tracking_uri`` also writes)."""
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def register(source: str, name: str, alias: str | None = None, tracking_uri: str | None = None) -> int:
    """Log ``source`` (a checkpoint file, ``runs:/...`` or a run id) as a LoggedModel, register it as a new
    version of ``name`` and, with ``alias``, point the alias at that version. Returns the version number.

    ``tracking_uri``: the MLflow store (default: ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``). Raises
    ``UsageError`` / ``FileNotFoundError`` / ``ValueError`` with one line for a bad name, alias, source or
    checkpoint.
    """
    from mlflow.tracking import MlflowClient

    from capenext.checkpoint import FORMAT, read_checkpoint
    from capenext.config import flatten, to_dict

    check_name(name)
    check_alias(alias)
    uri = resolve_uri(tracking_uri)
    if not Path(source).is_file() and (source.startswith(("runs:/", "models:/")) or RUN_ID.fullmatch(source)):
        require_store(uri)  # reading a run from a store that is not there would create an empty one
    with tempfile.TemporaryDirectory(prefix="capenext-register-") as tmp:
        src = resolve_checkpoint(source, uri, Path(tmp) / "download")
        ckpt = read_checkpoint(src.path)  # weights_only=True; one line for a foreign or broken file
        cfg, meta = ckpt["run_config"], dict(ckpt.get("meta") or {})
        client = MlflowClient(uri, registry_uri=uri)
        run = find_run(client, src.run_id or meta.get("run_id"))
        run_id = run.info.run_id if run is not None else None
        experiment_id = run.info.experiment_id if run is not None else ensure_experiment(client, DEFAULT_EXPERIMENT,
                                                                                          uri)
        sha = file_sha256(src.path)
        stage = Path(tmp) / "model"
        stage.mkdir()
        shutil.copyfile(src.path, stage / CHECKPOINT_ARTIFACT)
        info: dict[str, Any] = {
            "format": FORMAT, "file": CHECKPOINT_ARTIFACT, "sha256": sha, "source": src.spec,
            "run_id": run_id, "ablation": cfg.model.ablation, "backbone": cfg.model.backbone,
            "clip_model": cfg.model.clip_model,
            "load": "capenext.checkpoint.read_checkpoint(path) (torch.load with weights_only=True)",
        }
        (stage / "capenext.json").write_text(json.dumps(info, indent=2) + "\n")
        tags = {"capenext.format": FORMAT, "capenext.sha256": sha, "capenext.ablation": cfg.model.ablation,
                "capenext.backbone": cfg.model.backbone, "capenext.clip_model": cfg.model.clip_model}
        params = {k: str(v)[:6000] for k, v in flatten(to_dict(cfg)).items()}
        with _process_tracking_uri(uri):
            logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags,
                                                params=params, model_type="capenext")
            try:
                client.log_model_artifacts(logged.model_id, str(stage))
            except Exception:
                client.finalize_logged_model(logged.model_id, "FAILED")
                raise
            client.finalize_logged_model(logged.model_id, "READY")
            try:
                client.get_registered_model(name)
            except Exception:  # RESOURCE_DOES_NOT_EXIST: the first version of this name
                client.create_registered_model(name, description="CapeNext checkpoints (text-guided "
                                                                  "category-agnostic pose estimation)")
            version = client.create_model_version(
                name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id,
                tags=tags, description=f"{cfg.model.ablation} / {cfg.model.backbone} from {src.spec}")
            if alias is not None:
                client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


