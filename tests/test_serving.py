"""The shipped model where ML engineers use it: the registry's pyfunc model, loaded and served for real.

One tiny pipeline (``dvc repro evaluate`` in a temp git + DVC repo, raw IDX
files served on 127.0.0.1, the real MLflow sqlite store at its root) registers
``cnnpipe-classifier``. Then, as a user would: ``mlflow.pyfunc.load_model``
of ``models:/cnnpipe-classifier@champion`` in a fresh Python process, the
real ``mlflow models serve`` answering POST ``/invocations``, and a ``dvc
exp run train`` that reuses every run adding no version. Tests run in file
order (the last one adds an experiment).

Only the stages the assertions read run: train registers the version and
evaluate tags it with ``test_top1``; the plots stage (figures, downstream of
both) touches neither the registry nor anything read here, and a stage
process costs seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from fixtures_raw import make_idx_raw, serve
from project_builder import BIN, DVC, TINY, clean_env, commit_all, pipeline_project, run, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.long(42)]
NAME = "cnnpipe-classifier"
CHAMPION_URI = f"models:/{NAME}@champion"
N_IMAGES = 6
SERVER_START_S = 180  # `mlflow models serve` imports mlflow, torch and the model: tens of seconds on 2 cores


@dataclass
class Project:
    path: Path
    images: list[Path]  # exported test PNGs
    predicted: list[dict]  # `cnnpipe predict --json` on them

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.path / 'mlflow.db'}"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def env(self) -> dict[str, str]:
        return clean_env(self.path, {"MLFLOW_TRACKING_URI": self.uri})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    base = tmp_path_factory.mktemp("serving")
    raw = make_idx_raw(base / "www", n_train=200, n_test=60)
    with contextlib.contextmanager(serve)(raw.folder) as server:
        path = pipeline_project(
            base / "repo", server.url, raw.checksums, commit=True,
            params={"model": "tiny", "models": {"tiny": TINY}, "lr": [0.05, 0.01], "batch_size": 50, "epochs": 1,
                    "mlflow": {"enabled": True, "tracking_uri": None, "experiment": "cnnpipe",
                               "registered_model": NAME, "log_layer_stats": False},
                    "grid": {"workers": 1, "backend": "local", "ray_address": None, "max_runs": 64, "cache": True}},
        )
        run_ok([DVC, "repro", "evaluate"], path, timeout=600)  # train registers, evaluate tags; plots: read by none
        commit_all(path, "baseline: dvc repro")
    run_ok([str(BIN / "cnnpipe"), "export-images", "shots", "-n", str(N_IMAGES)], path)
    images = sorted((path / "shots").glob("*.png"))
    done = run_ok([str(BIN / "cnnpipe"), "predict", *map(str, images), "--json", "--top-k", "3"], path)
    yield Project(path, images, [json.loads(line) for line in done.stdout.splitlines()])


def pixels(images: list[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p), dtype=np.uint8)[None] for p in images])


def test_registered_version_links_experiment_commit_lock_params_and_metrics(project: Project) -> None:
    client = project.client()
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = client.get_model_version_by_alias(NAME, "champion")
    train = json.loads((project.path / "reports" / "train.json").read_text())
    metrics = json.loads((project.path / "reports" / "metrics.json").read_text())
    sidecar = json.loads((project.path / "models" / "best" / "model.json").read_text())
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())
    best_hash = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/best")
    head = run_ok(["git", "rev-parse", "HEAD~1"], project.path).stdout.strip()  # the commit dvc repro ran on
    tags = version.tags
    assert str(version.version) == "1" and version.run_id == train["mlflow_run_id"]
    assert tags["cnnpipe.weights_sha256"] == sidecar["weights_sha256"]
    assert tags["git.commit"] == head and tags["dvc.lock.models_best"] == best_hash
    assert json.loads(tags["params"]) == sidecar["params"]
    assert float(tags["val_top1"]) == pytest.approx(train["val_top1"], abs=1e-5)
    assert float(tags["test_top1"]) == pytest.approx(metrics["test_top1"], abs=1e-5)
    assert "dvc.exp_name" not in tags  # plain dvc repro: no experiment name

    shown = run_ok([str(BIN / "cnnpipe"), "show-model", CHAMPION_URI], project.path, env={"MLFLOW_TRACKING_URI": project.uri})
    assert shown.stdout.startswith(f"{CHAMPION_URI} = {NAME} version 1 (aliases: champion; run {version.run_id}")
    assert "model tiny on mnist 1x28x28" in shown.stdout
    missing = run([str(BIN / "cnnpipe"), "show-model", f"models:/{NAME}@nope"], project.path,
                  env={"MLFLOW_TRACKING_URI": project.uri})
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: models:/{NAME}@nope: not in the model registry at ")


def test_champion_loads_in_a_fresh_process_and_predicts_like_cnnpipe_predict(project: Project) -> None:
    script = (
        "import json, sys, numpy as np, mlflow.pyfunc\n"
        "from PIL import Image\n"
        f"model = mlflow.pyfunc.load_model({CHAMPION_URI!r})\n"
        "x = np.stack([np.asarray(Image.open(p), dtype=np.uint8)[None] for p in sys.argv[1:]])\n"
        "out = model.predict(x, params={'top_k': 3})\n"
        "import cnnpipe\n"
        "print(json.dumps({'cnnpipe': cnnpipe.__file__,\n"
        "                  'schema': str(model.metadata.get_input_schema()),\n"
        "                  'rows': out.to_dict(orient='records')}))\n"
    )
    env = project.env()
    env.pop("PYTHONPATH")  # nothing but the registry: the model ships its own code
    done = subprocess.run([sys.executable, "-c", script, *map(str, project.images)], cwd=project.path.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert "uint8" in answer["schema"] and "(-1, 1, 28, 28)" in answer["schema"]
    # the model's own copy of the code ran (code_paths), not the checkout's
    assert Path(answer["cnnpipe"]).parts[-4:] == ("model", "code", "cnnpipe", "__init__.py")
    assert len(answer["rows"]) == N_IMAGES
    for row, expected in zip(answer["rows"], project.predicted):
        top = [p["class"] for p in expected["predictions"]]
        assert row["label"] == top[0] and row["top_k"] == top
        for p in expected["predictions"]:
            assert row[p["class"]] == pytest.approx(p["probability"], abs=1e-6)
        assert sum(v for k, v in row.items() if k not in ("label", "top_k")) == pytest.approx(1.0, abs=1e-5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def mlflow_serve(project: Project, port: int) -> Iterator[str]:
    """The real `mlflow models serve` of the champion on 127.0.0.1; killed (whole process group) on exit."""
    log = (project.path / "serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION_URI, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=project.path, env=project.env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, (project.path / "serve.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping: " + (
                project.path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def test_mlflow_models_serve_answers_invocations_with_the_labels_of_cnnpipe_predict(project: Project) -> None:
    images = pixels(project.images)
    with mlflow_serve(project, free_port()) as url:
        answer = post_json(f"{url}/invocations", {"inputs": images.tolist()})
        top2 = post_json(f"{url}/invocations", {"inputs": images[:2].tolist(), "params": {"top_k": 2}})
        with pytest.raises(urllib.error.HTTPError) as bad:  # wrong shape: a 400 naming the schema, not a crash
            post_json(f"{url}/invocations", {"inputs": images[:, :, :10].tolist()})
    rows = answer["predictions"]
    assert [row["label"] for row in rows] == [r["predictions"][0]["class"] for r in project.predicted]
    assert [row["top_k"] for row in top2["predictions"]] == [
        [p["class"] for p in r["predictions"][:2]] for r in project.predicted[:2]]
    assert bad.value.code == 400 and "shape" in bad.value.read().decode().lower()


def test_exp_run_that_reuses_every_run_adds_no_version(project: Project) -> None:
    client = project.client()
    # `train` (and the stages before it, up to date): reusing runs and registering are train's; the stages
    # downstream (evaluate, plots) hold nothing asserted here.
    same = run_ok([DVC, "exp", "run", "-n", "same-weights", "-S", "grid.workers=2", "train"], project.path, timeout=600)
    assert "2 reused from the cache" in same.stdout
    assert f"mlflow: weights unchanged since {NAME}/1; no new version" in same.stdout
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert client.get_registered_model(NAME).aliases == {"champion": 1}
    # (new weights adding a version and moving champion: tests/test_tracking.py)
