"""The compute turn: concurrent trains and evaluates on one machine compute one at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cnnpipe.compute import turns
from cnnpipe.util.env import TAKE_TURNS


# --------------------------------------------------------------------------- taking turns (the default)

HOLD = """
import sys, time
sys.path.insert(0, {src!r})
from pathlib import Path
from cnnpipe.compute import turns
with turns.compute_turn("train", root=Path({root!r}), report=None):
    print("holding", flush=True)
    time.sleep(120)
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    """Another process of the same project in the middle of its compute turn."""
    src = str(Path(turns.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in (TAKE_TURNS, "DVC_EXP_NAME")}
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(src=src, root=str(root))], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_turn_waits_for_the_holder_names_it_and_is_freed_by_kill_9(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(TAKE_TURNS, raising=False)
    holder = _holder(tmp_path)
    lines: list[str] = []
    got: list[float] = []

    def take() -> None:
        with turns.compute_turn("evaluate", root=tmp_path, report=lines.append):
            got.append(time.monotonic())
            with turns.compute_turn("nested", root=tmp_path, report=lines.append):  # re-entrant: no self-wait
                pass

    waiter = threading.Thread(target=take)
    try:
        waiter.start()
        time.sleep(1.0)
        assert not got, "took the turn while another process held it"
        assert len(lines) == 1 and lines[0].startswith(f"evaluate: waiting for the cores: the train of pid {holder.pid}")
        assert TAKE_TURNS in lines[0]
        killed = time.monotonic()
        holder.kill()  # SIGKILL: the kernel drops its flock
        waiter.join(30)
        assert got and got[0] >= killed
        assert lines[1].startswith("evaluate: got the cores after waiting")
        assert len(lines) == 2
    finally:
        holder.kill()
        holder.wait()
        waiter.join(30)


@pytest.mark.parametrize("env", [{TAKE_TURNS: "0"}, {TAKE_TURNS: "off"}])
def test_opting_out_never_waits_for_a_turn(tmp_path: Path, monkeypatch, env: dict[str, str]) -> None:
    monkeypatch.delenv(TAKE_TURNS, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    holder = _holder(tmp_path)
    try:
        lines: list[str] = []
        with turns.compute_turn("train", root=tmp_path, report=lines.append):
            assert holder.poll() is None  # the other one still holds it
        assert lines == []
    finally:
        holder.kill()
        holder.wait()


def test_the_train_stage_trains_only_in_its_turn(tmp_path: Path) -> None:
    """A real ``stages/train.py`` of a queued-experiment layout waits while another experiment computes."""
    from project_builder import stage_project

    work, root = stage_project(tmp_path, epochs=1, grid={"workers": 1, "cache": False}, mlflow={"enabled": False})
    holder = _holder(root)
    env = {k: v for k, v in os.environ.items()
           if k not in (TAKE_TURNS, "DVC_EXP_NAME", "MLFLOW_TRACKING_URI", "CNNPIPE_DEBUG")}
    env.update(DVC_ROOT=str(root), DVC_STAGE="train", DVC_EXP_NAME="exp-late")
    train = subprocess.Popen([sys.executable, "stages/train.py"], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        for line in train.stdout:
            seen.append(line)
            if "waiting for the cores" in line:
                break
        assert seen and "train: waiting for the cores: the train of pid" in seen[-1], "".join(seen)
        time.sleep(1.0)
        assert train.poll() is None and not any(" epoch 1/1" in line for line in seen)
        holder.kill()
        rest, _ = train.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
        train.kill()
    out = "".join(seen) + rest
    assert train.returncode == 0, out[-3000:]
    after = out.split("got the cores after waiting", 1)
    assert len(after) == 2 and after[1].count(" epoch 1/1") == 2, out[-3000:]  # both trials trained after the turn
