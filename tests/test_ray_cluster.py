"""``grid.backend: ray`` against a real ``ray start --head`` cluster: a separate process on 127.0.0.1.

Ray 2.60 turns token authentication on for a ``ray start --head`` cluster
whenever the head has a token, and a driver given an explicit address only
sends one when ``RAY_AUTH_MODE=token``. The cluster here is started with
token auth and its own token, home folder and ``--temp-dir``; the train
stage runs its grid there with the token, and without it gets one line
naming the address and the fix (not a traceback after minutes of retries).

``ray stop`` would end every Ray process on the machine (other test runs'
too), so the fixture stops only what it started: every process that
carries its marker variable (Ray's workers leave the head's process group
but keep its environment).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from project_builder import run_stage, stage_project  # noqa: E402

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"
MARKER = "CNNPIPE_TEST_RAY_CLUSTER"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def marked_pids(value: str) -> list[int]:
    """Processes whose environment carries ``MARKER=value`` (the head, its raylet, GCS and workers)."""
    needle = f"{MARKER}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class Cluster:
    def __init__(self, address: str, token: str, home: Path) -> None:
        self.address, self.token, self.home = address, token, home

    def driver_env(self, *, token: bool) -> dict[str, str]:
        """A driver on this machine: loopback node IP, an empty home (no ~/.ray token), the token when asked."""
        env = {"HOME": str(self.home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "",
               "RAY_AUTH_TOKEN": "", "RAY_gcs_server_port_wait_time_s": "3"}  # a refused driver gives up in ~3 s
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the cleanup reads /proc")
    base = Path(tempfile.mkdtemp(prefix="cnnray"))  # short: Ray's socket paths live under --temp-dir
    home = base / "home"
    home.mkdir()
    port, token, marker = free_port(), secrets.token_hex(32), secrets.token_hex(8)
    env = {**os.environ, MARKER: marker, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # the node address stays 127.0.0.1 (Ray would otherwise advertise the machine's network address)
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = (base / "head.log").open("w")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={base / 'ray'}", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (base / "head.log").read_text():
            assert head.poll() is None, (base / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start --head did not come up in 90 s"
            time.sleep(0.5)
        yield Cluster(f"127.0.0.1:{port}", token, home)
    finally:
        for _ in range(3):  # workers may still be starting: sweep until none is left
            pids = marked_pids(marker)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.5)
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def project(cluster, tmp_path_factory):
    return stage_project(tmp_path_factory.mktemp("raycluster"), epochs=1,
                         grid={"backend": "ray", "ray_address": cluster.address, "workers": 2},
                         mlflow={"enabled": False})


def test_the_grid_runs_on_a_ray_start_head_cluster_with_its_token(cluster, project):
    work, root = project
    done = run_stage(work, root, env=cluster.driver_env(token=True))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"grid: Ray tasks on cluster {cluster.address} (2 CPUs)" in done.stdout
    assert (work / "models" / "best" / "model.safetensors").is_file()


def test_without_the_token_the_stage_says_so_in_one_line(cluster, project):
    work, root = project
    before = {p: p.stat().st_mtime_ns for p in (work / "reports").rglob("*")} if (work / "reports").exists() else {}
    done = run_stage(work, root, env=cluster.driver_env(token=False))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"the Ray cluster at grid.ray_address {cluster.address} refused the connection" in error[0]
    assert "RAY_AUTH_MODE=token" in error[0] and "ray get-auth-token" in error[0]
    after = {p: p.stat().st_mtime_ns for p in (work / "reports").rglob("*")} if (work / "reports").exists() else {}
    assert after == before  # nothing written

