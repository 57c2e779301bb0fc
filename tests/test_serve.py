"""jobs.serve, jobs.register and models:/ checkpoints: CapeNext on a real Ray Serve, on this machine's CPUs.

One server for the module, started as a user starts it (``python -m jobs.serve`` in a subprocess, joined to
the session's Ray instance with ``--address``), serving the tiny model trained once per session
(:func:`tests.test_evaluate.trained_run`) from a registered model, ``models:/capenext-tiny@champion``.
The tests talk to it over HTTP on 127.0.0.1 only, drive its page in headless Chromium, kill its replica,
and finally stop it with Ctrl-C (SIGINT). The images are held-out test-category images of the synthetic set.

A second server, started after the first has stopped, with its own Ray and SIGINT ignored (as a background job
of a script), serves the same checkpoint with ``--runtime onnx`` over its ``jobs.export`` folder: one Serve
start-up for the ONNX answers and for stopping on SIGINT. An ONNX folder of another checkpoint is refused in
process, before Ray or Serve starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from capenext.checkpoint import read_checkpoint
from capenext.cli import run_main
from capenext.data.mp100 import load_split
from capenext.predict import Predictor, Query
from jobs import predict as predict_job
from jobs import serve as serve_job
from jobs.register import register
from jobs.serving.deployment import port_free
from jobs.serving.options import APP_NAME, DEPLOYMENT_NAME, check_options
from jobs.runtime.checkpoints import resolve_checkpoint
from jobs.runtime.tracking import free_port
from tests.conftest import REPO
from tests.test_evaluate import trained_run

MODEL = "capenext-tiny"
CHAMPION = f"models:/{MODEL}@champion"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
STARTUP_TIMEOUT = 240  # s for the server to print its URL (Serve controller, proxy, replica, Gradio)
ONGOING, QUEUED = 16, 24  # the test server's requests at work (max(2 x batch 8, 16)) and waiting per replica
ALLOWED_ORIGIN = "http://tools.example.org"  # the test server's --allow-origin


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> dict:
    return trained_run(tmp_path_factory, prepared)


@pytest.fixture(scope="module")
def registry(trained, tmp_path_factory) -> dict:
    """A fresh MLflow store of this module: one run holding the trained checkpoint, registered as version 1
    of capenext-tiny (alias champion) from the run id, and as version 2 from the file."""
    from mlflow.tracking import MlflowClient

    from jobs.runtime.tracking import ensure_experiment

    base = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = ensure_experiment(client, "capenext-serve-tests", uri)
    run = client.create_run(exp, run_name="tiny-full")
    client.log_artifact(run.info.run_id, trained["checkpoint"], "checkpoints")
    client.set_terminated(run.info.run_id, "FINISHED")
    first = register(run.info.run_id, MODEL, "champion", uri)
    second = register(trained["checkpoint"], MODEL, None, uri)
    return {"uri": uri, "run_id": run.info.run_id, "versions": (first, second), "base": base}


@pytest.fixture(scope="module")
def heldout(synthetic_root) -> list[dict]:
    """One image per held-out test category of split 1, with its names, class, skeleton and box."""
    test = load_split(synthetic_root, 1, "test")
    out = []
    for cid, idx in sorted(test.by_category().items()):
        s, c = test.samples[idx[0]], test.categories[cid]
        out.append({"path": test.image_path(s), "names": list(c.keypoints), "class": c.class_text,
                    "skeleton": [list(e) for e in c.skeleton], "bbox": list(s.bbox), "size": (s.width, s.height)})
    assert len({len(h["names"]) for h in out}) > 1, "the examples should mix keypoint counts"
    return out


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return Predictor(trained["checkpoint"])


def _export(checkpoint, out: Path) -> Path:
    pytest.importorskip("onnxruntime")
    from capenext.export import export

    export(checkpoint, out)
    return out


@pytest.fixture(scope="module")
def onnx_dir(trained, tmp_path_factory) -> Path:
    """``python -m jobs.export``'s folder of the trained checkpoint."""
    return _export(trained["checkpoint"], tmp_path_factory.mktemp("onnx") / "tiny-onnx")


class Server:
    """``python -m jobs.serve`` in a subprocess; ``url`` once it printed that it is serving."""

    def __init__(self, args: list[str], cwd: Path, sigint_ignored: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = cwd / "serve.err"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        # a background job of a shell script starts with SIGINT ignored
        start = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", *args, "--port", str(self.port)],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     stdin=subprocess.DEVNULL, text=True, preexec_fn=start)
        self.banner = self._wait_for_banner()

    def _wait_for_banner(self) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.time() + STARTUP_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"jobs.serve exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if sel.select(timeout=1):
                line = self.proc.stdout.readline()
                if "serving" in line:
                    return line.strip()
        self.stop()
        pytest.fail(f"jobs.serve printed no URL within {STARTUP_TIMEOUT} s: {self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 90) -> int:
        """Ctrl-C, as a user stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(ray_local, registry, synthetic_root, tmp_path_factory):
    address = ray_local.get_runtime_context().gcs_address
    srv = Server(["--checkpoint", CHAMPION, "--tracking-uri", registry["uri"], "--address", address,
                  "--data-root", str(synthetic_root), "--split", "1", "--max-batch-size", "8",
                  "--batch-wait-ms", "50", "--max-pixels", "20000000", "--max-queued-requests", str(QUEUED),
                  "--allow-origin", ALLOWED_ORIGIN],
                 tmp_path_factory.mktemp("serve"))
    yield srv
    srv.stop()


def _post(url: str, image_path=None, data: bytes | None = None, params: dict | None = None,
          headers: dict | None = None, **fields):
    """A multipart POST /v1/predict (``class_`` for the ``class`` field); text fields as form parts."""
    parts = [(k.rstrip("_"), (None, v)) for k, v in fields.items() if v is not None]
    if image_path is not None or data is not None:
        parts.append(("image", ("upload.png", data if data is not None else Path(image_path).read_bytes(),
                                "image/png")))
    return requests.post(f"{url}v1/predict", files=parts, params=params, headers=headers, timeout=120)


def _fields(h: dict, bbox: bool = True) -> dict:
    return {"keypoints": ",".join(h["names"]), "class_": h["class"],
            "skeleton": ",".join(f"{a}-{b}" for a, b in h["skeleton"]),
            "bbox": ",".join(f"{v:g}" for v in h["bbox"]) if bbox else None}


def _xys(points: list[dict]) -> list[float]:
    return [v for p in points for v in (p["x"], p["y"], p["score"])]


# --- the library: batched forward, pretrained folders ----------------------------------------------


def test_predict_many_gives_each_query_what_predict_gives_it(predictor, heldout):
    """Queries with different keypoint counts share one forward; each gets its own points."""
    queries = [Query(str(h["path"]), h["names"], h["class"], h["skeleton"], h["bbox"] if i % 2 else None)
               for i, h in enumerate(heldout)]
    alone = [predictor.predict(q.image, q.names, q.class_name, q.skeleton, q.bbox) for q in queries]
    together = predictor.predict_many(queries)
    assert [len(t) for t in together] == [len(q.names) for q in queries]
    for a, t in zip(alone, together):
        assert [p["name"] for p in a] == [p["name"] for p in t]
        assert _xys(t) == pytest.approx(_xys(a), abs=1e-3)
    assert predictor.predict_many(queries[:1]) == alone[:1]
    with pytest.raises(ValueError, match="query 1: skeleton index out of range"):
        predictor.predict_many([queries[0], Query(queries[1].image, ["a", "b"], "cat", [(0, 5)])])


def test_pretrained_folder_round_trips_without_pickle(predictor, heldout, tmp_path):
    h = heldout[0]
    folder = predictor.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["config"]["model"]["backbone"] == "tiny"
    again = Predictor.from_pretrained(folder)
    args = (str(h["path"]), h["names"], h["class"], h["skeleton"], h["bbox"])
    assert again.predict(*args) == predictor.predict(*args)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Predictor.from_pretrained(tmp_path / "nowhere")
    (folder / "config.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match="not a capenext model"):
        Predictor.from_pretrained(folder)


# --- models from MLflow ----------------------------------------------------------------------------


def test_register_makes_a_logged_model_a_version_and_an_alias(registry, trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(registry["uri"])
    assert registry["versions"] == (1, 2)
    assert client.get_registered_model(MODEL).aliases == {"champion": 1}
    v1 = client.get_model_version(MODEL, "1")
    assert v1.run_id == registry["run_id"] and v1.source.startswith("models:/m-")
    logged = client.get_logged_model(v1.source[len("models:/"):])
    assert logged.source_run_id == registry["run_id"] and logged.status == "READY"
    assert logged.tags["capenext.sha256"] == _sha(trained["checkpoint"])
    assert logged.params["model.backbone"] == "tiny"
    files = sorted(Path(logged.artifact_location.removeprefix("file://")).iterdir())
    assert [f.name for f in files] == ["capenext.json", "checkpoint.pt"]  # the file itself, no pickled model


@pytest.mark.parametrize("spec", [CHAMPION, f"models:/{MODEL}/2"])
def test_models_uri_resolves_to_the_registered_file(registry, trained, tmp_path, spec):
    source = resolve_checkpoint(spec, registry["uri"], tmp_path)
    assert _sha(source.path) == _sha(trained["checkpoint"])
    assert source.run_id == (registry["run_id"] if spec == CHAMPION else None)
    assert read_checkpoint(source.path)["run_config"].model.backbone == "tiny"  # weights_only=True


@pytest.mark.parametrize("spec,fragment", [
    ("models:/nope@champion", "no registered model 'nope'"),
    (f"models:/{MODEL}@gold", f"model '{MODEL}' has no alias 'gold' (aliases: @champion → version 1)"),
    (f"models:/{MODEL}/9", f"model '{MODEL}' has no version 9 (versions: 1, 2)"),
])
def test_missing_model_alias_or_version_is_one_line(registry, tmp_path, capsys, monkeypatch, spec, fragment):
    with pytest.raises(FileNotFoundError, match="^checkpoint models:/") as err:
        resolve_checkpoint(spec, registry["uri"], tmp_path)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((40, 50, 3), 99, np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as exc:
        run_main(predict_job.main, ["--checkpoint", spec, "--image", str(tmp_path / "x.png"), "--keypoints", "a",
                                    "--class", "cat"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and fragment in lines[0], lines


def test_predict_job_takes_a_models_uri(registry, predictor, heldout, tmp_path, capsys, monkeypatch):
    h = heldout[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_main(predict_job.main, ["--checkpoint", CHAMPION, "--image", str(h["path"]),
                                    "--keypoints", ",".join(h["names"]), "--class", h["class"]])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    record = json.loads(out.out)
    assert _xys(record["keypoints"]) == pytest.approx(
        _xys(predictor.predict(str(h["path"]), h["names"], h["class"])), abs=0.01)


# --- the application, its builder and the cluster configs ------------------------------------------


def test_app_builder_validates_its_args(trained, tmp_path):
    from ray.serve import Application

    application = serve_job.app({"checkpoint": trained["checkpoint"], "max_batch_size": "4", "autoscale": "1,3"})
    assert isinstance(application, Application)
    for bad, fragment in [({"max_batch_size": "0"}, "max_batch_size"), ({"autoscale": "3,1"}, "MIN <= MAX"),
                          ({"device": "tpu"}, "cpu or cuda"), ({"device": "cuda:1"}, "cpu or cuda"),
                          ({"gpus_per_replica": "1"}, "with device cpu"),
                          ({"replicas": "2", "colour": "red"}, "colour")]:
        with pytest.raises(Exception) as err:
            serve_job.app({"checkpoint": trained["checkpoint"], **bad})
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(Path(trained["checkpoint"]).read_bytes()[:1000])
    for checkpoint, fragment in [(tmp_path / "nope.pt", "checkpoint not found"), (torn, "not a whole PyTorch")]:
        with pytest.raises((FileNotFoundError, ValueError), match=fragment):  # where it is built, not in a replica
            serve_job.app({"checkpoint": str(checkpoint)})


def _tiny_checkpoint(path: Path, seed: int) -> Path:
    """A tiny CapeNext at random weights (random tiny CLIP), as tests/conftest.py's random_tiny_checkpoint."""
    import torch

    from capenext.checkpoint import save_checkpoint
    from capenext.config import load_preset
    from capenext.models import build_model

    cfg = load_preset("tiny")
    cfg.model.clip_checkpoint = "random"
    torch.manual_seed(seed)
    save_checkpoint(path, build_model(cfg.model), cfg)
    return path


def test_an_onnx_folder_of_another_checkpoint_is_refused_in_one_line_before_ray_starts(random_tiny_checkpoint,
                                                                                       tmp_path, capsys):
    """--runtime onnx with the export of another checkpoint (its model.json's sha256 is not the checkpoint's):
    one error line naming --onnx and exit 2, before Ray or Serve starts; the app builder refuses it alike, and
    takes the folder with its own checkpoint."""
    import ray
    from ray.serve import Application

    foreign = _export(random_tiny_checkpoint, tmp_path / "foreign-onnx")
    other = _tiny_checkpoint(tmp_path / "other.pt", seed=1)
    ray_before = ray.is_initialized()
    for onnx, fragment in [(foreign, "exported from another checkpoint"), (tmp_path / "nothing", "no model.json")]:
        with pytest.raises(SystemExit) as exc:
            run_main(serve_job.main, ["--checkpoint", str(other), "--runtime", "onnx", "--onnx", str(onnx),
                                      "--port", str(free_port())])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: --onnx {onnx}") and fragment in lines[0], lines
    assert ray.is_initialized() == ray_before  # refused before Ray was started (or joined)
    with pytest.raises(Exception, match="exported from another checkpoint") as err:
        serve_job.app({"checkpoint": str(other), "runtime": "onnx", "onnx": str(foreign)})
    assert "\n" not in str(err.value)
    for bad, fragment in [({"runtime": "onnx"}, "runtime onnx needs onnx=DIR"),
                          ({"onnx": str(foreign)}, "add runtime=onnx"),
                          ({"runtime": "onnx", "onnx": str(foreign), "device": "cuda"}, "runs on CPU"),
                          ({"runtime": "tensorrt"}, "torch or onnx")]:
        with pytest.raises(Exception, match=fragment):
            serve_job.app({"checkpoint": str(random_tiny_checkpoint), **bad})
    own = serve_job.app({"checkpoint": str(random_tiny_checkpoint), "runtime": "onnx", "onnx": str(foreign)})
    assert isinstance(own, Application)


def test_serve_config_and_rayservice_run_this_app():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text()))
    documents = [d for d in yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text()) if d]
    (manifest,) = [d for d in documents if d.get("kind") == "RayService"]  # beside it: its network policy
    assert manifest["apiVersion"] == "ray.io/v1"
    inner = ServeDeploySchema(**yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    for cfg in (config, inner):
        (application,) = cfg.applications
        assert application.import_path == "jobs.serve:app" and application.route_prefix == "/"
        options = check_options(application.args)
        assert options.checkpoint.startswith("models:/")
    assert config.http_options.host == "127.0.0.1"
    import ray

    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


# --- the server over HTTP ---------------------------------------------------------------------------


def test_server_prints_its_url_and_health_is_ok(server, registry):
    assert server.url in server.banner and "models:/capenext-tiny@champion" in server.banner
    r = requests.get(f"{server.url}healthz", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and set(body) == {"status", "replica"}  # nothing that names the model or run
    assert set(body["replica"]) >= {"queries", "batches", "largest_batch"}
    assert registry["run_id"] not in r.text and "capenext-tiny" not in r.text
    model = requests.get(f"{server.url}v1/model", timeout=30).json()
    assert model["checkpoint"] == CHAMPION and model["ablation"] == "full"
    assert model["backbone"] == "tiny" and model["max_keypoints"] == 100


@pytest.mark.parametrize("with_box", [True, False])
def test_api_answers_what_jobs_predict_prints(server, trained, heldout, tmp_path, capsys, monkeypatch, with_box):
    """Same image, names, class, skeleton and box: the same JSON numbers and the same picture."""
    monkeypatch.chdir(tmp_path)
    for h in heldout[:2]:
        f = _fields(h, with_box)
        argv = ["--checkpoint", trained["checkpoint"], "--image", str(h["path"]), "--keypoints", f["keypoints"],
                "--class", h["class"], "--skeleton", f["skeleton"], "--out", str(tmp_path / "cli.png")]
        with pytest.raises(SystemExit) as exc:
            run_main(predict_job.main, argv + (["--bbox", f["bbox"]] if with_box else []))
        assert exc.value.code == 0
        cli = json.loads(capsys.readouterr().out)
        r = _post(server.url, h["path"], **f)
        assert r.status_code == 200, r.text
        api = r.json()
        assert [p["name"] for p in api["keypoints"]] == h["names"]
        for p in api["keypoints"]:  # a point off the image comes back clamped to it, and says so
            assert isinstance(p["inside_image"], bool)
            assert p["inside_image"] or (0 <= p["x"] <= cli["width"] - 1 and 0 <= p["y"] <= cli["height"] - 1)
        assert _xys(api["keypoints"]) == pytest.approx(_xys(cli["keypoints"]), abs=0.011)
        assert api["image"] == {"width": cli["width"], "height": cli["height"]} and api["bbox"] == cli["bbox"]
        pic = _post(server.url, h["path"], params={"picture": "1"}, **f)
        assert pic.status_code == 200 and pic.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(pic.content)) as a, Image.open(tmp_path / "cli.png") as b:
            assert a.size == b.size
            same = (np.asarray(a.convert("RGB")) == np.asarray(b.convert("RGB"))).all(-1).mean()
            assert same > 0.99, same


def _bomb(tmp_path) -> bytes:
    """A 5000 x 5000 PNG of zeros: 25 MP, a few tens of KB (the server's limit here is 20 MP)."""
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "not_an_image": (dict(data=b"these bytes are no picture at all"), 400, "not an image"),
    "truncated_image": (dict(data="TRUNCATED"), 400, "cannot decode"),
    "no_image_field": (dict(), 400, "no 'image' file"),
    "no_names": (dict(keypoints=" , "), 400, "no keypoint names"),
    "names_missing": (dict(keypoints=None), 400, "no keypoint names"),
    "too_many_names": (dict(keypoints=json.dumps([f"k{i}" for i in range(101)])), 400,
                       "101 keypoint names given, the model has 100 keypoint slots"),
    "bad_json_names": (dict(keypoints="[\"nose\", "), 400, "not valid JSON"),
    "bad_json_skeleton": (dict(skeleton="[[0, 1], "), 400, "'skeleton' starts like a JSON list but is not valid"),
    "skeleton_not_pairs": (dict(skeleton="[1, 2]"), 400, "skeleton edge 1 is not a pair of integer keypoint indices"),
    "skeleton_out_of_range": (dict(skeleton="0-1,1-7"), 400, "skeleton index out of range in edge 1-7"),
    "skeleton_syntax": (dict(skeleton="0:1"), 400, "is not of the form A-B"),
    "malformed_box": (dict(bbox="1,2,3"), 400, "is not four numbers"),
    "box_outside": (dict(bbox="0,0,5000,10"), 400, "lies outside the"),
    "no_class": (dict(class_=None), 400, "reads a class name"),
    "over_upload_limit": (dict(data="BIG"), 413, "over the limit of 20 MB"),
    "decompression_bomb": (dict(data="BOMB"), 400, "over the limit of 20000000"),
    # issue 25: every text field is bounded in characters before anything reads it (no tokenizing) ...
    "long_name": (dict(keypoints="nose," + "q" * 8000), 400, "'keypoints' name 1 is 8000 characters, over the limit"),
    "long_names_field": (dict(keypoints="a," * 200_000), 400, "'keypoints' is 400000 characters, over the limit"),
    "long_class": (dict(class_="c" * 1000), 400, "'class' is 1000 characters, over the limit of 400"),
    "long_skeleton": (dict(skeleton="0-1," * 10_000), 400, "'skeleton' is 40000 characters, over the limit"),
    "long_bbox": (dict(bbox="1" * 300), 400, "'bbox' is 300 characters, over the limit of 200"),
    # ... names and class hold no control characters ...
    "nul_in_name": (dict(keypoints=json.dumps(["nose", "\u0000class"])), 400,
                    "'keypoints' name 1 contains the control character U+0000"),
    "c1_in_class": (dict(class_="c\u0085at"), 400, "'class' contains the control character U+0085"),
    # ... a name within the characters but over CLIP's 77 tokens is refused before it joins a batch ...
    "too_many_tokens": (dict(keypoints="nose,left eye," + "a " * 80), 400,
                        "'keypoints' name 2 'a a a"),
    # ... and JSON that Python cannot read is a 400 too, not a 500
    "deep_json_names": (dict(keypoints="[" * 20_000), 400, "'keypoints' starts like a JSON list but is not one we "
                                                          "read (nested too deeply)"),
    "huge_int_skeleton": (dict(skeleton="[[" + "9" * 5000 + ", 1]]"), 400, "holds a number with too many digits"),
    "huge_index_skeleton": (dict(skeleton="0-" + "9" * 5000), 400, "an index of more than 6 digits"),
    # issue 25: PIL opens only the formats jobs.predict reads (EPS would run Ghostscript)
    "eps_image": (dict(data="EPS"), 400, "not an image in a format we read (JPEG, PNG, BMP, WEBP, TIFF, GIF)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_a_4xx_with_one_json_line_and_the_server_stays_up(server, heldout, tmp_path, case):
    h = heldout[0]
    change, status, fragment = BAD[case]
    fields = {"keypoints": "nose,left eye,right eye", "class_": "cat", **change}
    data = fields.pop("data", None)
    if data == "BIG":
        data = b"\x89PNG" + os.urandom(1024) * (21 * 1024)  # 21 MB
    elif data == "BOMB":
        data = _bomb(tmp_path)
    elif data == "TRUNCATED":
        data = Path(h["path"]).read_bytes()[:300]
    elif data == "EPS":
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="EPS")  # PIL writes PostScript without Ghostscript
        data = buf.getvalue()
    elif data is None and case != "no_image_field":
        data = Path(h["path"]).read_bytes()
    r = _post(server.url, data=data, **fields)
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and fragment in body["error"] and "\n" not in body["error"], body
    assert requests.get(f"{server.url}healthz", timeout=30).status_code == 200


def test_a_form_that_is_not_multipart_is_refused(server):
    r = requests.post(f"{server.url}v1/predict", json={"keypoints": ["nose"]}, timeout=30)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


@pytest.mark.parametrize("method,path,status,fragment", [
    ("get", "v1/predict", 405, "/v1/predict takes POST, not GET"),
    ("post", "v1/model", 405, "/v1/model takes GET, not POST"),
    ("get", "v1/nothing", 404, "no API path /v1/nothing: the API has GET /healthz, GET /v1/model, POST /v1/predict"),
])
def test_a_wrong_method_or_api_path_is_a_json_error(server, method, path, status, fragment):
    r = getattr(requests, method)(f"{server.url}{path}", timeout=30)
    assert r.status_code == status and r.json() == {"error": fragment}, r.text[:300]


def test_32_concurrent_requests_are_batched_and_all_answered(server, predictor, heldout):
    """Mixed images, keypoint counts and boxes at once: every answer is that request's own."""
    jobs = [(heldout[i % len(heldout)], bool(i % 3)) for i in range(32)]
    before = requests.get(f"{server.url}healthz", timeout=30).json()["replica"]

    def one(job):
        h, box = job
        return _post(server.url, h["path"], **_fields(h, box))

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, jobs))
    after = requests.get(f"{server.url}healthz", timeout=30).json()["replica"]
    for (h, box), r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        expected = predictor.predict(str(h["path"]), h["names"], h["class"], h["skeleton"],
                                     h["bbox"] if box else None)
        assert [p["name"] for p in r.json()["keypoints"]] == h["names"]
        assert _xys(r.json()["keypoints"]) == pytest.approx(_xys(expected), abs=0.011)
    assert after["queries"] - before["queries"] == 32
    assert after["batches"] - before["batches"] < 32 and after["largest_batch"] > 1, (before, after)


def test_a_bad_query_among_concurrent_good_ones_fails_alone(server, predictor, heldout):
    """Issue 25: a query over CLIP's 77 tokens used to fail inside the batched forward, and with it every
    request of its batch (a plain-text 500). It is refused before it joins a batch now; the others, sent at
    the same time, get their own points."""
    good = [heldout[i % len(heldout)] for i in range(8)]
    bad = {"keypoints": "nose," + "a " * 80, "class_": "cat"}

    def one(i):
        if i % 3 == 2:
            return _post(server.url, heldout[0]["path"], **bad)
        return _post(server.url, good[i % len(good)]["path"], **_fields(good[i % len(good)]))

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    for i, r in enumerate(answers):
        assert r.headers["content-type"].startswith("application/json"), r.text[:200]
        if i % 3 == 2:
            assert r.status_code == 400 and "is 82 CLIP tokens" in r.json()["error"], r.text
            continue
        h = good[i % len(good)]
        assert r.status_code == 200, r.text
        expected = predictor.predict(str(h["path"]), h["names"], h["class"], h["skeleton"], h["bbox"])
        assert _xys(r.json()["keypoints"]) == pytest.approx(_xys(expected), abs=0.011)


def test_the_text_cache_cannot_be_poisoned(server, predictor, heldout):
    """Issue 25: keypoints ["\\u0000class", "cat"] were cached under the key of the class "cat", after which every
    request with class cat failed. The cache is keyed by (kind, text, CLIP) now, and such a name is refused:
    after the attacks, a request with the attacked class gets the points the model gives it, and a request
    made before the attacks gets the same points again."""
    h = heldout[1]
    before = _post(server.url, h["path"], **{**_fields(h), "class_": "tabby cat"})
    assert before.status_code == 200, before.text
    victim = "ginger cat"  # not asked for yet: the attacks come first
    attacks = [json.dumps(["\u0000class", victim]), json.dumps(["class", victim]),
               json.dumps([f"a photo of {victim}"]), json.dumps([victim, victim])]
    for names in attacks:
        r = _post(server.url, h["path"], keypoints=names, class_="dog")
        assert r.status_code in (200, 400) and r.headers["content-type"].startswith("application/json"), r.text
    after = _post(server.url, h["path"], **{**_fields(h), "class_": victim})
    assert after.status_code == 200, after.text
    expected = predictor.predict(str(h["path"]), h["names"], victim, h["skeleton"], h["bbox"])
    assert _xys(after.json()["keypoints"]) == pytest.approx(_xys(expected), abs=0.011)
    again = _post(server.url, h["path"], **{**_fields(h), "class_": "tabby cat"})
    assert again.status_code == 200 and _xys(again.json()["keypoints"]) == _xys(before.json()["keypoints"])


def _hold(url: str, n: int) -> list[socket.socket]:
    """``n`` POST /v1/predict requests whose bodies never finish arriving: each holds its place in the
    replica (at work, reading its body, or waiting to start) until its socket closes."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    held = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
                  f"boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\n".encode())
        held.append(s)
    return held


def _replica_counts(url: str) -> dict:
    return requests.get(f"{url}healthz", timeout=30).json()["replica"]


def test_overload_is_a_fast_503_in_json_with_retry_after(server, heldout):
    """Issue 25: past the requests a replica works on (--max-ongoing-requests) and those it keeps waiting
    (--max-queued-requests), a request is refused at once, 503 JSON with Retry-After, not left to time out."""
    h = heldout[0]
    held = _hold(server.url, ONGOING + QUEUED)
    try:
        deadline, counts, other = time.time() + 60, None, []
        while time.time() < deadline:
            # while the held requests are still being taken in, Serve's proxy may answer the probe itself
            # (seen once on a loaded machine): what it said goes into the failure message
            probe = requests.get(f"{server.url}healthz", timeout=30)
            if probe.status_code != 200:
                other.append((probe.status_code, probe.text[:200]))
            else:
                counts = probe.json()["replica"]
                if counts["working"] == ONGOING and counts["waiting"] == QUEUED:
                    break
            time.sleep(0.5)
        assert counts and (counts["working"], counts["waiting"]) == (ONGOING, QUEUED), (counts, other)
        started = time.time()
        r = _post(server.url, h["path"], **_fields(h))
        assert time.time() - started < 10
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), r.text
        assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"], (r.headers, r.text)
        assert _replica_counts(server.url)["refused_busy"] >= 1
    finally:
        for s in held:
            s.close()
    deadline = time.time() + 60
    while time.time() < deadline and _replica_counts(server.url)["working"]:
        time.sleep(0.5)
    r = _post(server.url, h["path"], **_fields(h))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("headers,status,fragment", [
    ({"Host": "attacker.example"}, 403, "Host 'attacker.example' is not a name of this server"),
    ({"Host": "attacker.example:8000"}, 403, "is not a name of this server"),
    ({"Origin": "http://attacker.example"}, 403, "cross-origin request from 'http://attacker.example' refused"),
    ({"Origin": "null"}, 403, "cross-origin request from 'null' refused"),
    ({"Origin": ALLOWED_ORIGIN}, 200, None),
    ({"Origin": "SAME"}, 200, None),
    ({"Host": "localhost:PORT", "Origin": "http://localhost:PORT"}, 200, None),
])
def test_cross_site_requests_are_refused(server, heldout, headers, status, fragment):
    """Issue 25: a page of another site may POST to 127.0.0.1 (multipart needs no preflight) or read it after
    DNS rebinding (its own name in Host): both are 403 in JSON; the server's own origin and --allow-origin
    pass (the latter with CORS headers, so that its page may read the answer)."""
    h = heldout[0]
    port = str(server.port)
    headers = {k: v.replace("PORT", port).replace("SAME", server.url.rstrip("/")) for k, v in headers.items()}
    r = _post(server.url, h["path"], headers=headers, **_fields(h))
    assert r.status_code == status and r.headers["content-type"].startswith("application/json"), r.text[:300]
    if fragment:
        assert set(r.json()) == {"error"} and fragment in r.json()["error"], r.text
    elif headers.get("Origin") == ALLOWED_ORIGIN:
        assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    else:
        assert "access-control-allow-origin" not in r.headers
    if "Host" in headers and status == 403:  # a rebinding page cannot read anything either
        assert requests.get(f"{server.url}healthz", headers=headers, timeout=30).status_code == 403


@pytest.mark.parametrize("path", ["docs", "redoc"])
def test_api_docs_that_load_from_a_cdn_are_off_by_default(server, path):
    r = requests.get(f"{server.url}{path}", timeout=30)
    assert r.status_code == 404 and "cdn.jsdelivr.net" not in r.text


def test_page_in_a_real_browser_shows_the_prediction(server, heldout, tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=1400,1200",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # nothing but this machine
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    try:
        wait = WebDriverWait(browser, 90)

        def element(css: str):  # the page renders progressively: wait for each element
            return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))

        browser.get(server.url)
        h = heldout[2]
        element("#image input[type=file]").send_keys(str(h["path"]))
        element("#names textarea, #names input").send_keys(", ".join(h["names"]))
        element("#class textarea, #class input").send_keys(h["class"])
        assert CHAMPION in element("#model-info").text
        element("#image img")  # the upload is in
        wait.until(EC.element_to_be_clickable((By.ID, "run"))).click()
        picture = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#picture img")))
        wait.until(lambda b: h["names"][0] in b.find_element(By.ID, "result").text)
        assert picture.size["width"] > 100 and picture.get_attribute("naturalWidth") not in (None, "0")
        assert "Examples" in browser.page_source and "Start from a training category" in browser.page_source
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()


def _replicas(ray_local) -> list:
    from ray.util.state import list_actors

    address = ray_local.get_runtime_context().gcs_address  # other Ray instances may run on this machine
    return [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True,
                                   raise_on_missing_output=False)
            if a.class_name.startswith(f"ServeReplica:{APP_NAME}:{DEPLOYMENT_NAME}")]


def test_a_killed_replica_is_replaced_and_the_next_requests_succeed(server, ray_local, predictor, heldout):
    (replica,) = _replicas(ray_local)
    os.kill(replica.pid, signal.SIGKILL)
    deadline, replaced = time.time() + 180, None
    while time.time() < deadline:
        alive = [a for a in _replicas(ray_local) if a.pid != replica.pid]
        if alive:
            try:
                if requests.get(f"{server.url}healthz", timeout=10).status_code == 200:
                    replaced = alive[0]
                    break
            except requests.RequestException:
                pass
        time.sleep(1)
    assert replaced is not None, "Serve did not bring a new replica up within 180 s"
    for h in heldout[:3]:
        r = _post(server.url, h["path"], **_fields(h))
        assert r.status_code == 200, r.text
        expected = predictor.predict(str(h["path"]), h["names"], h["class"], h["skeleton"], h["bbox"])
        assert _xys(r.json()["keypoints"]) == pytest.approx(_xys(expected), abs=0.011)


def test_ctrl_c_stops_the_server_and_its_application(server, ray_local):
    from ray import serve

    assert server.stop() == 0, server.log.read_text()[-3000:]
    assert "stopped" in server.log.read_text().strip().splitlines()[-3:]
    assert serve.status().applications == {}
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}healthz", timeout=10)


def test_port_check_passes_a_port_whose_last_connections_linger_in_time_wait():
    """A server stopped a moment ago leaves TIME_WAIT connections on its port; Serve's proxy (uvicorn, with
    SO_REUSEADDR) binds it anyway, so the pre-flight must not call it in use. A listening socket still is."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's listener
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_free("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server's side closes first: its end of the connection enters TIME_WAIT
        client.recv(1)
        client.close()
    assert port_free("127.0.0.1", port)


@pytest.fixture(scope="module")
def onnx_server(trained, onnx_dir, tmp_path_factory):
    """``python -m jobs.serve --runtime onnx --onnx DIR`` of the trained checkpoint, with its own Ray, started as a
    background job of a script (SIGINT ignored). Started after the module's first server has stopped (the tests
    that use it come last); the last test stops it."""
    srv = Server(["--checkpoint", str(trained["checkpoint"]), "--cpus-per-replica", "1", "--runtime", "onnx",
                  "--onnx", str(onnx_dir), "--batch-wait-ms", "50"],
                 tmp_path_factory.mktemp("serve-onnx"), sigint_ignored=True)
    yield srv
    srv.stop()


def _max_px(a: list[dict], b: list[dict]) -> float:
    return max(max(abs(p["x"] - q["x"]), abs(p["y"] - q["y"])) for p, q in zip(a, b))


def test_onnx_server_answers_the_pytorch_points_within_half_a_pixel(onnx_server, predictor, heldout):
    """--runtime onnx: the replica's predictor runs the export with onnxruntime. Alone and in batched forwards
    (concurrent requests, mixed keypoint counts and boxes), every answer is within 0.5 px of PyTorch's points."""
    model = requests.get(f"{onnx_server.url}v1/model", timeout=30).json()
    assert model["runtime"] == "onnx" and model["device"] == "cpu"
    jobs = [(heldout[i % len(heldout)], bool(i % 2)) for i in range(12)]

    def one(job):
        h, box = job
        return _post(onnx_server.url, h["path"], **_fields(h, box))

    alone = [one(job) for job in jobs[:2]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    for (h, box), r in zip(jobs[:2] + jobs, alone + together):
        assert r.status_code == 200, r.text
        expected = predictor.predict(str(h["path"]), h["names"], h["class"], h["skeleton"],
                                     h["bbox"] if box else None)
        got = r.json()["keypoints"]
        assert [p["name"] for p in got] == h["names"]
        assert _max_px(got, expected) <= 0.5
    assert _replica_counts(onnx_server.url)["largest_batch"] > 1  # batched forwards ran on onnxruntime too


def test_a_server_started_with_sigint_ignored_still_stops_on_it(onnx_server):
    """As a background job of a script (SIGINT ignored from the start), with its own Ray (the ONNX server):
    SIGINT stops the server, its Serve and its Ray, and it exits 0."""
    started = time.time()
    assert onnx_server.stop(timeout=120) == 0, onnx_server.log.read_text()[-3000:]
    assert time.time() - started < 90 and "stopped" in onnx_server.log.read_text().strip().splitlines()[-3:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{onnx_server.url}healthz", timeout=10)

