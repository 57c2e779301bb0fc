"""Checkpoint sources: what every ``--checkpoint`` (and ``--init-checkpoint``) takes, resolved to a local file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from jobs.runtime.tracking import sqlite_path

RUN_ID = re.compile(r"[0-9a-f]{32}")
FINAL_ARTIFACT = "checkpoints/final.pt"
CHECKPOINT_ARTIFACT = "checkpoint.pt"  # a registered model version's file (jobs.runtime.registry)
# what every --checkpoint takes (resolve_checkpoint), for the jobs' --help
CHECKPOINT_HELP = ("a checkpoint file, runs:/<run_id>/checkpoints/final.pt (or best.pt), a training run id (its "
                   "checkpoints/final.pt), models:/NAME@ALIAS or models:/NAME/VERSION, from the MLflow store")


# --- checkpoint sources ----------------------------------------------------------------------------


@dataclass
class Source:
    """Where a checkpoint came from: the local file, what the user wrote, the training run id when known."""

    path: Path
    spec: str
    run_id: str | None


def resolve_checkpoint(spec: str, tracking_uri: str, download_to: Path) -> Source:
    """A local file, ``runs:/<run_id>/<artifact path>``, a bare run id (its ``checkpoints/final.pt``), or a
    registered model version, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (its ``checkpoint.pt``, as
    :mod:`jobs.runtime.registry` stores it), fetched from the MLflow store at ``tracking_uri`` into ``download_to``.
    One line when it cannot be had (no such model, alias or version names what there is)."""
    if Path(spec).is_file():
        return Source(Path(spec), spec, None)
    if RUN_ID.fullmatch(spec):
        spec = f"runs:/{spec}/{FINAL_ARTIFACT}"
    if not spec.startswith(("runs:/", "models:/")):
        raise FileNotFoundError(f"checkpoint not found: {spec} (expected a file, runs:/<run_id>/{FINAL_ARTIFACT}"
                                ", an MLflow run id, models:/NAME@ALIAS or models:/NAME/VERSION)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one file: no bar in the log
    import mlflow.artifacts

    def fetch(uri: str) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download_to),
                                                            tracking_uri=tracking_uri))
        except Exception as err:  # MlflowException, OSError ... one line either way
            msg = " ".join(str(err).split())[:300]
            raise FileNotFoundError(f"cannot fetch checkpoint {spec} from {tracking_uri}: {msg}") from None

    if spec.startswith("runs:/"):
        return Source(fetch(spec), spec, spec[len("runs:/"):].split("/", 1)[0])

    # a registered model version: looked up with an explicit client (MLflow's models:/ artifact
    # repository would read the process-wide registry URI instead of ``tracking_uri``)
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", spec)
    if m is None:
        raise FileNotFoundError(f"checkpoint {spec!r}: a registered model is models:/NAME@ALIAS or "
                                "models:/NAME/VERSION")
    name, alias, version = m.groups()
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # never create an empty store just to look a model up
        raise FileNotFoundError(f"checkpoint {spec}: no MLflow store at {db} (set MLFLOW_TRACKING_URI to the "
                                "store the model was registered in)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        model = client.get_registered_model(name)
    except Exception:  # RESOURCE_DOES_NOT_EXIST, or a store without a registry
        try:
            known = sorted(r.name for r in client.search_registered_models(max_results=20))
        except Exception:
            known = []
        raise FileNotFoundError(f"checkpoint {spec}: no registered model {name!r} in {tracking_uri} "
                                f"(registered: {', '.join(known) or 'none'})") from None
    if alias is not None:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            listed = ", ".join(f"@{a} → version {v}" for a, v in sorted(aliases.items())) or "none"
            raise FileNotFoundError(f"checkpoint {spec}: model {name!r} has no alias {alias!r} (aliases: {listed})")
        version = str(aliases[alias])
    try:
        mv = client.get_model_version(name, version)
        location = client.get_model_version_download_uri(name, version)
    except Exception:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise FileNotFoundError(f"checkpoint {spec}: model {name!r} has no version {version} (versions: "
                                f"{', '.join(map(str, versions)) or 'none'})") from None
    path = fetch(f"{location.rstrip('/')}/{CHECKPOINT_ARTIFACT}")
    return Source(path, spec, mv.run_id or None)
