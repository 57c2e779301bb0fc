"""The paper's sweep: ``python -m jobs.sweep --splits 1-5 --ablations full,no_hcmi,... [--backbones swinv2_t]``.

What ``ray job submit`` runs. Every (split, ablation, backbone[, seed]) is one *trial*: one training run of
:mod:`jobs.train` (its own ``TorchTrainer``), launched from a Ray task. The trial task itself holds no CPU
(``num_cpus=0``), so the Train workers it starts get the cluster's CPUs/GPUs; at most ``--max-concurrent``
trials run at once (default: as many as the cluster's GPUs, or CPUs, hold with ``--num-workers`` ×
``--cpus-per-worker`` each). Ray Tune wrapping a trainer is deprecated in Train V2 and not used.

MLflow: one experiment (``--experiment``), one *parent* run per sweep (found again by its tag
``capenext.sweep=<experiment>``, so a re-submitted sweep reuses it) and one *child* run per trial
(``mlflow.parentRunId``, tags split/ablation/backbone/seed), named ``{experiment}-split{K}-{ablation}-{backbone}``
(plus ``-{text encoder}`` when ``model.text_encoder`` is not ``clip``, and ``-seed{S}`` with ``--seeds``).
Concurrent trials never write one SQLite file: when
``MLFLOW_TRACKING_URI`` is a SQLite store (or unset, which means ``sqlite:///./mlflow.db``), the sweep says
so, starts ``mlflow server`` on 127.0.0.1 (a free port, that store, artifacts beside it) for its duration,
points every trial at it and stops it at the end (one machine only: on a multi-node cluster a SQLite store
is refused; give the URI of a server every node reaches).

Re-submitting the same sweep skips the trials whose child run is FINISHED (with the same number of
epochs) and resumes the others from their checkpoints (same run name, same ``--storage-path``; a run
that finished its epochs goes straight to its test; a run that died before its first checkpoint is marked
KILLED and starts afresh). A failed trial does not stop the others: its child
run is marked FAILED, the sweep goes on, and ends with a summary table (finished, skipped, failed and
why); the exit code is 1 when any trial failed. Unknown splits, ablations or backbones, and bad training
options, are one line before anything starts.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from capenext.checkpoint import resumable_checkpoint
from capenext.cli import UsageError, offline, one_line, run_main
from capenext.data.mp100 import SPLITS
from jobs.training import driver
from jobs.training.spec import TrainRun, add_arguments, from_args, resolve_config
from jobs.runtime.cluster import check_cluster
from jobs.runtime.tracking import MlflowServer, ensure_experiment, sqlite_path, tracking_uri

SWEEP_TAG = "capenext.sweep"  # on the parent run: the sweep's name (its experiment)
KIND_TAG = "capenext.kind"  # "sweep" on the parent run
EPOCHS_TAG = "capenext.epochs"  # on a child the sweep saw finish: the epochs it was trained for


# --- command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every split x ablation (x backbone) of the paper as concurrent Ray trials, each\n"
                    "its own Ray Train run, recorded as child runs of one MLflow parent run. Re-submitting\n"
                    "skips finished trials and resumes the others from their checkpoints. Run names:\n"
                    "{experiment}-split{K}-{ablation}-{backbone}[-{text encoder}][-seed{S}].",
        epilog="""examples:
  python -m jobs.sweep --splits 1-5 --ablations full,no_hcmi,no_dsfr,no_lw,baseline,img_only,cls_only \\
      --shards /shared/shards --embeddings /shared/emb --storage-path /shared/runs \\
      --clip-checkpoint /shared/weights/ViT-B-32.pt --device cuda --experiment mp100
  ray job submit --working-dir . --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}' \\
      -- python -m jobs.sweep --splits 1-5 --ablations full,baseline ...   (docs/sweep.md)

MLflow: MLFLOW_TRACKING_URI (default sqlite:///./mlflow.db). A SQLite store is served by an
`mlflow server` on 127.0.0.1 that the sweep starts and stops, so trials never write the file directly.
Data (--shards, --embeddings) and checkpoints (--storage-path) belong on storage every node sees, never
in the job's working directory, which Ray deletes.""",
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--splits", default="1-5",
                   help="MP-100 splits: a range '1-5', a list '1,3' or both '1-2,5' (default 1-5)")
    from capenext.models import available_ablations

    g.add_argument("--ablations", default="full",
                   help=f"comma-separated ablation presets (default full); registered: "
                        f"{','.join(available_ablations())}")
    g.add_argument("--backbones", default="swinv2_t",
                   help="comma-separated backbones (default swinv2_t)")
    g.add_argument("--seeds", default=None,
                   help="comma-separated seeds, one trial each (run names get -seed{S}); default: --seed only")
    g.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: what the cluster's GPUs, or CPUs, hold: "
                        "GPUs // --num-workers, or CPUs // (--num-workers x --cpus-per-worker))")
    add_arguments(p, sweep=True)
    return p.parse_args(argv)


def parse_splits(text: str) -> list[int]:
    """``'1-5'`` → [1..5]; ``'1,3'`` → [1, 3]; ``'1-2,5'`` → [1, 2, 5]. Order kept, duplicates dropped."""
    out: list[int] = []
    for part in (s.strip() for s in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise UsageError(f"--splits {text!r}: cannot read {part!r}; use a range like 1-5 or a list like 1,3")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise UsageError(f"--splits {text!r}: range {part!r} runs backwards; write {hi}-{lo}")
        for k in range(lo, hi + 1):
            if k not in SPLITS:
                raise UsageError(f"unknown split {k} in --splits {text!r}; MP-100 has splits 1-5")
            if k not in out:
                out.append(k)
    return out


def parse_names(text: str, available: list[str], option: str, what: str) -> list[str]:
    """A comma-separated list of registered names, each checked (one line naming the valid ones)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{option} is empty; available: {available}")
    for name in names:
        if name not in available:
            raise UsageError(f"unknown {what} {name!r} in {option}; available: {available}")
    return list(dict.fromkeys(names))


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected integers like 0,1,2") from None
    if not seeds:
        raise UsageError("--seeds is empty; give integers like 0,1,2")
    return list(dict.fromkeys(seeds))


# --- trials -----------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One training run of the sweep."""

    split: int
    ablation: str
    backbone: str
    seed: int | None  # None: the training options' --seed, and no suffix in the run name
    run_name: str
    epochs: int = 0  # resolved from the config
    status: str = "pending"  # pending | finished | skipped | failed
    reason: str = ""  # failed: the one-line why; skipped/finished: a note
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None


def run_name_of(experiment: str, split: int, ablation: str, backbone: str, seed: int | None,
                text_encoder: str = "clip") -> str:
    """``{experiment}-split{K}-{ablation}-{backbone}[-{text encoder}][-seed{S}]``: the encoder only when it is
    not CLIP's, so that sweeps of one experiment with other text encoders never share a run name."""
    name = f"{experiment}-split{split}-{ablation}-{backbone}"
    if text_encoder != "clip":
        name = f"{name}-{text_encoder}"
    return name if seed is None else f"{name}-seed{seed}"


def trial_run(args: argparse.Namespace, trial: Trial, parent_run_id: str | None) -> TrainRun:
    """The training run of one trial: the sweep's training options with the trial's split, ablation,
    backbone, seed and name."""
    named = {"ablation": trial.ablation, "backbone": trial.backbone}
    if trial.seed is not None:
        named["seed"] = trial.seed
    cfg = resolve_config(args, **named)
    return from_args(args, cfg, trial.split, trial.run_name, parent_run_id)


def plan(args: argparse.Namespace) -> list[Trial]:
    """Every trial, its config resolved now so that bad options fail before anything starts."""
    from capenext.models import available_ablations, available_backbones

    splits = parse_splits(args.splits)
    ablations = parse_names(args.ablations, available_ablations(), "--ablations", "ablation")
    backbones = parse_names(args.backbones, available_backbones(), "--backbones", "backbone")
    seeds = parse_seeds(args.seeds)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    if args.local:
        raise UsageError("--local runs one trial in-process; a sweep needs Ray workers (drop --local)")
    for what, path in (("--shards", args.shards), ("--embeddings", args.embeddings)):
        if not path.is_dir():
            raise UsageError(f"{what} {path} is not a directory (absolute paths on shared storage in a Ray job)")
    trials = []
    for backbone in backbones:
        for ablation in ablations:
            for split in splits:
                for seed in seeds or [None]:
                    t = Trial(split, ablation, backbone, seed, "")
                    cfg = trial_run(args, t, None).cfg
                    t.run_name = run_name_of(args.experiment, split, ablation, backbone, seed, cfg.model.text_encoder)
                    t.epochs = cfg.optim.epochs
                    trials.append(t)
    return trials


def run_trial(run: TrainRun, tracking: str) -> dict[str, Any]:
    """The body of one trial's Ray task: the training driver with the sweep's tracking server.

    Never raises: a failure comes back as ``{"status": "failed", "reason": <one line>}``.
    """
    os.environ["MLFLOW_TRACKING_URI"] = tracking  # what MLflow's own clients in this worker read
    offline()  # a Ray task is an entry point of its own
    start = time.time()
    try:
        metrics = driver.run(replace(run, tracking_uri=tracking))
        return {"status": "finished", "metrics": metrics, "seconds": time.time() - start}
    except BaseException as err:  # noqa: BLE001 - a trial's failure is data for the summary, not a crash
        if isinstance(err, KeyboardInterrupt):
            raise
        return {"status": "failed", "reason": one_line(err), "seconds": time.time() - start}


def default_concurrency(args: argparse.Namespace) -> int:
    """How many trials the cluster holds at once: GPUs // workers, or CPUs // (workers x cpus each)."""
    import ray

    total = ray.cluster_resources()
    if args.device == "cuda":
        return max(1, int(total.get("GPU", 0) // max(1, args.num_workers)))
    return max(1, int(total.get("CPU", 0) // max(1e-9, args.num_workers * args.cpus_per_worker)))


# --- MLflow: the tracking server, the parent run, the child runs ------------------------------------


def find_or_create_parent(client, experiment_id: str, sweep: str, tags: dict[str, str]) -> tuple[str, bool]:
    """The sweep's parent run: the oldest active run tagged ``capenext.sweep=<sweep>``, else a new one."""
    found = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}'", order_by=["start_time ASC"],
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        created = False
    else:
        run_id = client.create_run(experiment_id, run_name=f"{sweep}-sweep",
                                   tags={SWEEP_TAG: sweep, KIND_TAG: "sweep"}).info.run_id
        created = True
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run_id, created


def runs_by_name(client, experiment_id: str, names: list[str]) -> dict[str, Any]:
    """The newest active run of each trial name (tag ``capenext.run_name``)."""
    query = f"tags.`capenext.run_name` = '{names[0]}'" if len(names) == 1 else ""
    out: dict[str, Any] = {}
    wanted = set(names)
    for run in client.search_runs([experiment_id], query, order_by=["start_time DESC"], max_results=50000):
        name = run.data.tags.get("capenext.run_name")
        if name in wanted and name not in out:
            out[name] = run
    return out


def is_done(run, epochs: int) -> bool:
    """A child run that needs no more work: FINISHED, trained for the epochs asked now."""
    if run is None or run.info.status != "FINISHED":
        return False
    trained = run.data.tags.get(EPOCHS_TAG) or run.data.params.get("optim.epochs")
    return trained == str(epochs)


# --- the sweep --------------------------------------------------------------------------------------


def summary_table(trials: list[Trial]) -> str:
    """One row per trial: status, test PCK@0.2 and mPCK, time, and why it failed."""
    width = max([len(t.run_name) for t in trials] + [5])
    lines = [f"{'trial':<{width}}  {'status':<9} {'pck@0.2':>8} {'mPCK':>8} {'time':>7}  note",
             "-" * (width + 48)]
    for t in trials:
        pck = t.metrics.get("test/pck_0.2")
        mean = t.metrics.get("test/pck_mean")
        secs = "-" if t.seconds is None else f"{t.seconds:.0f}s"
        lines.append(f"{t.run_name:<{width}}  {t.status:<9} {'-' if pck is None else f'{pck:.4f}':>8} "
                     f"{'-' if mean is None else f'{mean:.4f}':>8} {secs:>7}  {t.reason}")
    counts = {s: sum(t.status == s for t in trials) for s in ("finished", "skipped", "failed")}
    lines.append(f"{counts['finished']} finished, {counts['skipped']} skipped (finished before), "
                 f"{counts['failed']} failed, of {len(trials)} trials")
    return "\n".join(lines)


def _raise_interrupt(signum, frame):  # `ray job stop` sends SIGTERM: stop the server on the way out
    raise KeyboardInterrupt


def execute(args: argparse.Namespace, trials: list[Trial], client, experiment_id: str, parent_id: str,
            tracking: str) -> None:
    """Run the pending trials as Ray tasks, at most ``--max-concurrent`` at a time, filling in results."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(run_trial)
    todo = [t for t in trials if t.status == "pending"]
    limit = args.max_concurrent or default_concurrency(args)
    print(f"sweep: {len(todo)} trials to run, {limit} at a time", flush=True)
    running: dict[Any, tuple[Trial, float]] = {}
    done = 0
    try:
        while todo or running:
            while todo and len(running) < limit:
                t = todo.pop(0)
                how = _describe_checkpoint(args.storage_path, t.run_name)
                print(f"[start] {t.run_name} (split {t.split}, {t.ablation}, {t.backbone}"
                      f"{'' if t.seed is None else f', seed {t.seed}'}): {how}", flush=True)
                ref = task.options(name=f"trial:{t.run_name}").remote(trial_run(args, t, parent_id), tracking)
                running[ref] = (t, time.time())
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                t, t0 = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # the task's process died (OOM, node lost): not a trial result
                    result = {"status": "failed", "reason": one_line(err), "seconds": time.time() - t0}
                t.status, t.seconds = result["status"], result.get("seconds")
                t.metrics = result.get("metrics", {})
                t.reason = result.get("reason", "")
                done += 1
                _settle_child(client, experiment_id, t)
                if t.status == "finished":
                    print(f"[{done}/{done + len(todo) + len(running)}] {t.run_name}: finished, test pck@0.2 "
                          f"{t.metrics.get('test/pck_0.2', float('nan')):.4f} ({t.seconds:.0f} s)", flush=True)
                else:
                    print(f"[{done}/{done + len(todo) + len(running)}] {t.run_name}: FAILED: {t.reason}",
                          flush=True)
    except KeyboardInterrupt:
        for ref, (t, _) in running.items():
            ray.cancel(ref, force=True)  # its process, and with it the trial's Train controller and workers
            t.status, t.reason = "failed", "interrupted (the sweep was stopped); re-submit to resume"
        for t, _ in running.values():  # a re-submitted sweep resumes them in these runs
            _settle_child(client, experiment_id, t, "KILLED")
        raise


def _describe_checkpoint(storage: Path, run_name: str) -> str:
    """``resuming from checkpoint_...``, ``new``, or why the checkpoint cannot be read (the trial says more)."""
    try:
        latest = resumable_checkpoint(storage, run_name)
    except Exception as err:  # a torn state file: the trial's own pre-flight reports it
        return f"checkpoint unreadable ({one_line(err, 120)})"
    return f"resuming from {latest.name}" if latest is not None else "new"


def _settle_child(client, experiment_id: str, t: Trial, ended: str = "FAILED") -> None:
    """After a trial: tag a finished child with its epochs; mark a failed one ``ended`` (FAILED, or KILLED
    when the sweep was stopped), as its trial left it RUNNING."""
    try:
        run = runs_by_name(client, experiment_id, [t.run_name]).get(t.run_name)
        if run is None:
            return
        if t.status == "finished":
            client.set_tag(run.info.run_id, EPOCHS_TAG, str(t.epochs))
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, ended)
    except Exception as err:  # bookkeeping must not end the sweep
        print(f"warning: could not update the MLflow run of {t.run_name}: {one_line(err)}", flush=True)


def in_submitted_job() -> bool:
    """True in the driver of a ``ray job submit`` job (its working directory is Ray's temporary copy)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_job_paths(args: argparse.Namespace, db: Path | None) -> None:
    """Refuse, in a submitted job, data, checkpoints or an MLflow store inside the job's working directory:
    Ray deletes that copy, and other nodes never see it."""
    if not in_submitted_job():
        return
    cwd = Path.cwd().resolve()
    places = [("--storage-path", args.storage_path, "pass an absolute path on shared storage"),
              ("--shards", args.shards, "pass an absolute path on shared storage"),
              ("--embeddings", args.embeddings, "pass an absolute path on shared storage")]
    if db is not None:
        places.append(("the MLflow store", db, "set MLFLOW_TRACKING_URI in the runtime_env env_vars to a server "
                                               "or an absolute sqlite:////path"))
    for what, path, fix in places:
        if path == cwd or cwd in path.parents:
            raise UsageError(f"{what} {path} is inside the Ray job's working directory {cwd}, which Ray deletes "
                             f"after the job: {fix}")


def sweep(args: argparse.Namespace) -> list[Trial]:
    """Plan, start the tracking server if needed, find the parent run, run what is left; return the trials."""
    import ray
    from mlflow.tracking import MlflowClient

    trials = plan(args)
    args.shards, args.embeddings = args.shards.resolve(), args.embeddings.resolve()
    args.storage_path = args.storage_path.resolve()
    uri = tracking_uri(args.tracking_uri)
    db = sqlite_path(uri)
    check_job_paths(args, db)
    print(f"sweep {args.experiment!r}: {len(trials)} trials (splits {args.splits}, ablations {args.ablations}, "
          f"backbones {args.backbones}{'' if args.seeds is None else f', seeds {args.seeds}'}); checkpoints in "
          f"{args.storage_path}", flush=True)

    server = None
    if db is not None:
        source = ("--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                  else "MLFLOW_TRACKING_URI is unset, so the default store")
        server = MlflowServer(db)
        print(f"MLflow: {source} {uri} is a SQLite store; concurrent trials must not write one SQLite file, so "
              f"this sweep starts `mlflow server` on {server.uri} (store {db}, artifacts {server.artifacts}) "
              f"and stops it at the end", flush=True)
    else:
        print(f"MLflow: tracking server {uri}", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    parent_id = client = None
    own_ray = not ray.is_initialized()
    try:
        if server is not None:
            server.launch()
        if own_ray:  # while the server starts
            ray.init(address=args.address, log_to_driver=True, logging_level="WARNING")
            # ray.init puts Ray's own SIGTERM handler in place, which ends the process with no clean-up:
            # the trials would train on, and the parent run and the server would be left behind
            signal.signal(signal.SIGTERM, _raise_interrupt)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        print(f"Ray: {nodes} node{'s' * (nodes != 1)}, {ray.cluster_resources().get('CPU', 0):g} CPUs, "
              f"{ray.cluster_resources().get('GPU', 0):g} GPUs", flush=True)
        if server is not None and nodes > 1:
            raise UsageError(f"the tracking URI {uri} is a SQLite store, but the Ray cluster has "
                             f"{nodes} nodes: trials elsewhere cannot reach a server on 127.0.0.1; run an mlflow "
                             "server every node reaches and set MLFLOW_TRACKING_URI=http://HOST:PORT")
        check_cluster(args.num_workers, args.cpus_per_worker, args.device == "cuda")
        if server is not None:
            t0 = server.started
            uri = server.wait()
            print(f"MLflow: server up on {uri} after {time.time() - t0:.0f} s (log {server.log})", flush=True)
        client = MlflowClient(uri)
        experiment_id = ensure_experiment(client, args.experiment, uri)
        parent_id, created = find_or_create_parent(client, experiment_id, args.experiment, {
            "sweep.splits": args.splits, "sweep.ablations": args.ablations, "sweep.backbones": args.backbones,
            "sweep.seeds": args.seeds or str(args.seed if args.seed is not None else "preset"),
        })
        print(f"MLflow: experiment {args.experiment!r}, parent run {parent_id} "
              f"({'new' if created else 'found again: a re-submitted sweep'})", flush=True)

        existing = runs_by_name(client, experiment_id, [t.run_name for t in trials])
        for t in trials:
            run = existing.get(t.run_name)
            if is_done(run, t.epochs):
                t.status, t.reason = "skipped", f"finished before (run {run.info.run_id[:8]})"
                t.metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("test/", "floor/"))}
            elif run is not None and run.info.status != "FINISHED" and \
                    _describe_checkpoint(args.storage_path, t.run_name) == "new":
                # died before its first checkpoint: nothing to resume, close it and start afresh
                client.set_terminated(run.info.run_id, "KILLED")
        skipped = sum(t.status == "skipped" for t in trials)
        if skipped:
            print(f"sweep: skipping {skipped} trials that finished before", flush=True)
        if any(t.status == "pending" for t in trials):
            execute(args, trials, client, experiment_id, parent_id, uri)
        failed = sum(t.status == "failed" for t in trials)
        client.log_metric(parent_id, "sweep/finished", sum(t.status in ("finished", "skipped") for t in trials))
        client.log_metric(parent_id, "sweep/failed", failed)
        client.log_text(parent_id, summary_table(trials), "sweep_summary.txt")
        client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    except KeyboardInterrupt:
        if client is not None and parent_id is not None:
            try:  # best effort: `ray job stop` signals the server too
                client.set_terminated(parent_id, "KILLED")
            except Exception:
                pass
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if own_ray and ray.is_initialized():
            ray.shutdown()  # before the summary, so no late worker log lands below it
        if server is not None:
            print(f"MLflow: stopping the server on {server.uri}", flush=True)
            server.stop()
    return trials


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trials = sweep(args)
    print("\n" + summary_table(trials), flush=True)
    failed = [t.run_name for t in trials if t.status == "failed"]
    if failed:
        print(f"error: {len(failed)} of {len(trials)} trials failed: {', '.join(failed)}", file=sys.stderr,
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
