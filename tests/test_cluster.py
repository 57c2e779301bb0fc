"""cluster/: every YAML parses and holds what a GPU sweep needs, and who reaches what; cluster/local.sh's
text (token auth, loopback binds) and its refusals.

cluster/local.sh for real (it starts a Ray head and an MLflow server on 127.0.0.1, prints the environment to
export, and stops both, and only them) is checked in tests/test_sweep.py, not here: the sweep there runs on
the head it starts, so a test run starts one Ray head fewer, and pytest-xdist hands out whole modules, so the
check and the sweep share that module."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

from capenext.models import available_ablations
from jobs import sweep
from tests.conftest import LOCAL_SH, REPO, local_script

CLUSTER = REPO / "cluster"


def _load(name: str) -> dict:
    """The file's first YAML document (the KubeRay files carry their NetworkPolicy as a second one)."""
    return next(yaml.safe_load_all((CLUSTER / name).read_text()))


def test_every_yaml_parses_and_no_ray_ml_image():
    files = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))
    assert {f.name for f in files} >= {"ray-cluster.yaml", "rayjob.yaml"}
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f
        images = [v for d in docs for k, v in _items(d) if k == "image"]
        assert not any("ray-ml" in i for i in images), f"{f.name}: ray-ml images are no longer published"
        if f.name != "serve.yaml":  # a Serve application config runs on a cluster that exists; it names no image
            assert images, f"{f.name} names no image"


def _items(node):
    """Every (key, value) pair of a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _items(v)
    elif isinstance(node, list):
        for v in node:
            yield from _items(v)


def test_ray_up_config_has_gpu_workers_shared_storage_and_mlflow():
    cfg = _load("ray-cluster.yaml")
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "docker",
            "head_start_ray_commands", "worker_start_ray_commands"} <= set(cfg)
    image = cfg["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}(-py3\d+)?-gpu", image), image
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0  # no trial on the head
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] >= 1 for t in workers)
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # AWS GPU families
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in workers)
    # shared storage mounted on every host and inside every container
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert any("/mnt/shared" in c and "mount" in c for c in cfg["initialization_commands"])
    # one MLflow server on the head, its store on shared storage, its URI exported to the jobs
    head = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and "sqlite:////mnt/shared/" in head
    assert re.search(r"export MLFLOW_TRACKING_URI=http://.+:5000 && ray start --head", head)
    assert all("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"] if c.startswith("ray start"))


def test_rayjob_runs_the_sweep_on_a_gpu_worker_group_and_shuts_down():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    # the entrypoint is a valid sweep command line, on shared storage
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.sweep"]
    args = sweep.parse_args(argv[3:])
    assert sweep.parse_splits(args.splits) == [1, 2, 3, 4, 5]
    assert set(args.ablations.split(",")) == set(available_ablations())
    assert args.device == "cuda"
    for path in (args.shards, args.embeddings, args.storage_path, Path(args.clip_checkpoint)):
        assert str(path).startswith("/mnt/shared/"), path
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    working_dir = runtime_env.get("working_dir")
    assert working_dir is None or re.match(r"https://\S+\.zip$", working_dir)  # image or zip, never a laptop
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups and all(g["replicas"] >= 1 for g in gpu_groups)
    assert args.max_concurrent <= sum(g["maxReplicas"] for g in gpu_groups)
    images = {c["image"] for p in pods for c in p["containers"]}
    assert len(images) == 1  # head and workers run the same code
    for pod in pods:  # every pod mounts the shared volume at /mnt/shared
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert mounts.get("/mnt/shared") in claims


# --- who reaches what (issue 25): token auth, loopback binds, NetworkPolicy, pinned installs ---------------

KUBERAY = ("rayjob.yaml", "rayservice.yaml")
RAY_CONFIGS = ("ray-cluster.yaml", *KUBERAY)


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def _pods(doc: dict) -> list[dict]:
    cluster = _ray_cluster_spec(doc)
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def _commands(name: str) -> list[str]:
    """Every shell command a ray-up config runs (on the hosts, in the containers, to start Ray)."""
    cfg = _load(name)
    return [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                          "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
            for c in cfg.get(key) or []]


# (the KubeRay dashboards face the operator through the head Service: there the NetworkPolicy test below)
@pytest.mark.parametrize("name", ["ray-cluster.yaml", "serve.yaml", "local.sh", "README.md"])
def test_no_dashboard_or_mlflow_on_every_interface(name):
    text = (CLUSTER / name).read_text()
    commands = _commands(name) if name == "ray-cluster.yaml" else [text]
    for c in commands:
        assert not re.search(r"--(dashboard-)?host[= ]+[\"']?(0\.0\.0\.0|::)(?=[\s\"']|$)", c), (name, c)
    if name == "ray-cluster.yaml":
        head = " ".join(_load(name)["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head
        assert re.search(r"mlflow server .*--host \$\(hostname -I", head)  # the head's private address
    if name == "serve.yaml":
        assert _load(name)["http_options"]["host"] == "127.0.0.1"
    if name == "local.sh":
        assert "--dashboard-host 127.0.0.1" in text and "--host 127.0.0.1" in text


def test_ray_up_config_turns_on_token_auth_from_a_file_only_the_user_reads():
    cfg = _load("ray-cluster.yaml")
    env = dict(re.findall(r"--env (\w+)=(\S+)", " ".join(cfg["docker"]["run_options"])))
    assert env["RAY_AUTH_MODE"] == "token"
    token = env["RAY_AUTH_TOKEN_PATH"]
    assert "RAY_AUTH_TOKEN" not in env  # never the token itself in the config
    (folder, local), = cfg["file_mounts"].items()
    assert token.startswith(folder.rstrip("/") + "/") and local.startswith("~/")
    assert any(f"chmod 600 {token}" in c for c in cfg["setup_commands"])


def test_local_script_turns_on_token_auth_from_a_file_only_the_user_reads():
    text = LOCAL_SH.read_text()
    assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=\"$TOKEN\"" in text
    assert "umask 077" in text and 'chmod 600 "$TOKEN"' in text


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_configs_take_the_token_from_a_secret_and_ship_a_network_policy(name):
    docs = _docs(name)
    (ray_doc,) = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    cluster = _ray_cluster_spec(ray_doc)
    assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
    assert not any(d.get("kind") == "Secret" for d in docs)  # the token is never in this file
    assert int(cluster["rayVersion"].split(".")[1]) >= 52  # Ray token authentication
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    # the Ray pods carry one label, which a NetworkPolicy selects
    labels = [t["metadata"]["labels"]["app.kubernetes.io/instance"] for t in _pods(ray_doc)]
    assert len(set(labels)) == 1
    (policy,) = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": labels[0]}
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
        assert rule["from"], rule  # no rule lets everyone in
        peers = rule["from"]
        if "ports" not in rule:  # all ports: only the cluster's own pods
            assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": labels[0]}}}], rule
            continue
        assert {p["port"] for p in rule["ports"]} <= {8265, 8000}, rule  # the dashboard and Serve ports only
        for peer in peers:
            assert "ipBlock" not in peer, peer
            # this namespace (a bare podSelector), or the KubeRay operator in its own namespace
            assert "namespaceSelector" not in peer or (
                peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name")
                and peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}), peer
    exposed = {p["port"] for r in spec["ingress"] for p in r.get("ports", [])}
    assert 8265 in exposed and (8000 in exposed) == (ray_doc["kind"] == "RayService")


def _image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.match(r"\d+\.\d+", tag))


@pytest.mark.parametrize("name", RAY_CONFIGS)
def test_images_are_pinned_to_a_version(name):
    images = [v for d in _docs(name) for k, v in _items(d) if k == "image"]
    assert images and all(_image_pinned(i) for i in images), images
    text = (CLUSTER / name).read_text()
    assert not re.search(r"\bFROM\s+\S+:latest|image:\s*\S+:latest", text)
    readme = (CLUSTER / "README.md").read_text()
    assert all(_image_pinned(i) for i in re.findall(r"^FROM (\S+)", readme, flags=re.M))


def test_no_unpinned_pip_install():
    commands = _commands("ray-cluster.yaml")
    installs = [c for c in commands if "pip install" in c]
    assert installs
    for c in installs:
        targets = [t for t in shlex.split(c.split("pip install", 1)[1]) if not t.startswith("-")]
        assert targets, c
        for t in targets:  # name==version, or a direct reference to one commit's archive / git commit
            assert re.search(r"==\d|@\s*\S+/archive/[0-9a-f]{40}\.(zip|tar\.gz)$|@[0-9a-f]{40}$", t), t
    for name in ("rayjob.yaml", "serve.yaml"):  # the zip a runtime_env may fetch: one commit's, never a tag's
        for url in re.findall(r"working_dir:\s*(\S+)", (CLUSTER / name).read_text()):
            assert re.search(r"/archive/[0-9a-f]{40}\.zip$", url), (name, url)


def test_local_script_rejects_unknown_commands_and_options(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    for args, fragment in ((["restart"], "unknown command 'restart'"),
                           (["start", "--dir", str(tmp_path), "--gpus", "1"], "unknown option '--gpus'"),
                           (["stop", "--dir", str(tmp_path / "none")], "nothing started")):
        proc = local_script(*args, env=env, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and fragment in proc.stderr
