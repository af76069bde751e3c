"""README.md's shell blocks, run as written, in order, in a small copy of this project.

Every fenced ```bash block of README.md is a command a reader pastes into a
shell at the repository root. This test runs each one with ``bash -e`` in a
temp git + DVC copy of the project (``project_builder.pipeline_project``:
tiny MNIST-format data served from 127.0.0.1, one epoch), one block after the
other as one reader's shell would: the variables a block exports are there
for the next block (``export -p`` carried over), each block starts at the
project root. A block that cannot run here is marked, on the line before its
fence, with ``<!-- not run by the tests: REASON -->``; the reason must be
given.

The text of a block runs as written, except for the few rows of
``SUBSTITUTIONS`` (each with why; a row that no longer matches the README
fails the fast test). ``source .venv/bin/activate`` needs none: the temp
project's ``.venv`` is a link to the venv running this test. A ```yaml block
that starts with ``models:`` is the hand edit the README asks for: it is
merged into the project's params.yaml where it appears. Every process a block
starts (a server put in the background with ``&``, a DVC queue worker) is
stopped when the block ends: each carries a marker in its environment, and
whatever still carries it is terminated.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fixtures_raw import make_idx_raw, no_proxy, serve  # noqa: F401 - no_proxy is a fixture
from project_builder import ROOT, clean_env, pipeline_project, tiny_pipeline_params

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"^<!--\s*not run by the tests:(.*?)-->\s*$")
SHELL_LANGUAGES = {"sh", "shell", "console", "zsh", "bash-session", "shell-session"}
BLOCK_TIMEOUT_S = 300  # one block; the queue block waits for two experiments
MARKER = "CNNPIPE_README_BLOCK"  # in every process a block starts: what is left of them is stopped after it
STATE_SKIP = {"PWD", "OLDPWD", "SHLVL", "_", MARKER}  # not carried from one block to the next


# What cannot run in a temp project, and what runs instead. Each row: (text in a block, replacement, why).
# {port} is a free port on 127.0.0.1, {ui_port} another.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ("make run    # set up .venv and run the whole pipeline on Fashion-MNIST (dvc repro)",
     "bash scripts/setup.sh remote && dvc repro",
     "make's setup installs requirements.lock into .venv (minutes, network): here .venv is this test's venv; "
     "`setup.sh remote` is the rest of setup (git, DVC, the default remote), then make run's `dvc repro`"),
    ("make test   # set up .venv and run the test suite",
     ":",
     "it would run this suite inside itself"),
    ("cnnpipe ui                          # prints the experiment's URL; Ctrl-C (or kill) stops it",
     "cnnpipe ui --port {ui_port} > cnnpipe-ui.log 2>&1 & ui=$!\n"
     "until curl -s -o /dev/null http://127.0.0.1:{ui_port}/; do kill -0 $ui; sleep 1; done\n"
     "kill $ui; wait $ui || true; cat cnnpipe-ui.log",
     "a server that runs until stopped: started on a free port (5000 may be taken), checked to answer, stopped"),
    ("-p 5001", "-p {port}", "5001 may be taken on a test machine: a free port instead"),
    ("127.0.0.1:5001", "127.0.0.1:{port}", "the same free port"),
]

# What a block's output must show beyond its exit status, keyed by a line of the block (a regex, multiline).
EXPECTED_OUTPUT: dict[str, list[str]] = {
    r"^curl .*/invocations": ['{"predictions": [{'],  # the serving one-liner got an answer, not BAD_REQUEST
    r"^cnnpipe ui\b": ["http://127.0.0.1:", "workflowType=machine_learning"],
    r"^dvc queue status$": ["Success"],
}
UNEXPECTED_OUTPUT: dict[str, list[str]] = {r"^dvc queue status$": ["Failed"]}


@dataclass(frozen=True)
class Block:
    """One fenced block of README.md."""

    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip_reason: str | None  # None: the tests run it

    def describe(self) -> str:
        return f"README.md:{self.line} (```{self.language})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, with the skip reason from the comment on the line before its fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"README.md:{index + 1}: a fence that is never closed"
        skip = SKIP.match(lines[index - 1]) if index > 0 else None
        blocks.append(Block(index + 1, opening.group(1), "\n".join(lines[index + 1:end]) + "\n",
                            skip.group(1).strip() if skip else None))
        index = end + 1
    return blocks


def substituted(block: Block, ports: dict[str, int]) -> str:
    text = block.text
    for old, new, _why in SUBSTITUTIONS:
        text = text.replace(old, new.format(**ports))
    return text


# --------------------------------------------------------------------------- fast checks of the README's shape


def test_every_shell_block_is_bash_and_every_skip_says_why() -> None:
    text = README.read_text()
    blocks = readme_blocks(text)
    bash = [b for b in blocks if b.language == "bash"]
    assert len(bash) >= 15, "the README's command blocks were not found"
    assert text.splitlines()[2:6] == ["```bash", "make run    # set up .venv and run the whole pipeline on Fashion-MNIST "
                                      "(dvc repro)", "make test   # set up .venv and run the test suite", "```"]
    for block in blocks:
        # A command block in another dialect, or a bare fence holding a prompt, would escape this test.
        assert block.language not in SHELL_LANGUAGES, f"{block.describe()}: write shell blocks as ```bash"
        assert block.language or not block.text.lstrip().startswith("$ "), f"{block.describe()}: a shell session"
        if block.skip_reason is not None:
            assert block.language == "bash", f"{block.describe()}: only bash blocks are run or skipped"
            assert block.skip_reason, f"{block.describe()}: a block the tests skip must say why"
    run = [b for b in bash if b.skip_reason is None]
    assert len(run) > 2 * (len(bash) - len(run)), "most command blocks must run"
    # Commands must not hide in indented code blocks either.
    indented = [n + 1 for n, line in enumerate(text.splitlines())
                if re.match(r"^ {4}(cnnpipe|dvc|mlflow|python|git|make|curl) ", line)]
    assert indented == [], f"README.md lines {indented}: a command in an indented block; use a ```bash fence"


def test_every_substitution_matches_the_readme_and_says_why() -> None:
    """The table is part of the test: a row whose text is no longer in a runnable block is an error, not a no-op."""
    runnable = [b.text for b in readme_blocks(README.read_text()) if b.language == "bash" and b.skip_reason is None]
    for old, _new, why in SUBSTITUTIONS:
        assert any(old in text for text in runnable), f"substitution for {old!r} matches no README block"
        assert why
    for command in (*EXPECTED_OUTPUT, *UNEXPECTED_OUTPUT):
        assert any(re.search(command, text, re.M) for text in runnable), f"expected output for {command!r}: no block"


# --------------------------------------------------------------------------- running them


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def marked_processes(token: str) -> list[int]:
    """Processes whose environment carries this block's marker (they outlive bash when put in the background)."""
    needle = f"{MARKER}={token}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/environ").read_bytes() + b"\0":
                found.append(int(entry))
    return found


def stop_marked(token: str) -> None:
    """SIGTERM, then SIGKILL after 10 s, every process the block left behind."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = marked_processes(token)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [p for p in marked_processes(token) if Path(f"/proc/{p}").exists()]
        if not pids:
            return


def merge_models(project: Path, block: Block) -> None:
    """The README's hand edit ("add it under models: in params.yaml"), made as a reader would."""
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params.setdefault("models", {})
    params["models"] = {**(params["models"] or {}), **yaml.safe_load(block.text)["models"]}
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def run_block(project: Path, block: Block, state: Path, ports: dict[str, int], env: dict[str, str]) -> str:
    """Run one block with ``bash -e`` at the project root; returns its output; fails the test with its tail."""
    text = substituted(block, ports)
    script = project.parent / "block.sh"
    script.write_text(f"set -e\ncd {project}\n[ -f {state} ] && source {state}\n{text}\n"
                      f"export -p | grep -vE '^declare -x ({'|'.join(STATE_SKIP)})(=|$)' > {state}.next\n")
    log = project.parent / "block.log"
    token = uuid.uuid4().hex
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(script)], cwd=project, env={**env, MARKER: token}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_marked(token)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text(errors="replace")
    print(f"{block.describe()}: {time.monotonic() - started:.1f} s")
    problem = None
    if code != 0:
        problem = f"timed out after {BLOCK_TIMEOUT_S} s" if code is None else f"exited {code}"
    else:
        for command, wanted in EXPECTED_OUTPUT.items():
            missing = [w for w in wanted if re.search(command, block.text, re.M) and w not in output]
            problem = problem or (f"its output lacks {missing}" if missing else None)
        for command, unwanted in UNEXPECTED_OUTPUT.items():
            found = [w for w in unwanted if re.search(command, block.text, re.M) and w in output]
            problem = problem or (f"its output shows {found}" if found else None)
    assert problem is None, (f"{block.describe()} {problem}.\n--- the block as run:\n{text}"
                             f"--- its output (last 4000 characters):\n{output[-4000:]}")
    Path(f"{state}.next").replace(state)
    return output


PRETRAINED = ("mobilenet_v3_small",)  # the torchvision models the README's blocks start from


def placed_weights(home: Path) -> Path:
    """A ``$TORCH_HOME`` whose hub cache holds IMAGENET1K_V1 of each ``PRETRAINED`` model, under torchvision's own
    file name: nothing can be downloaded here, so the weights stage's real look-up finds a made state dict
    (random values) where a user's first download would have put the real one."""
    import torch
    import torchvision

    for arch in PRETRAINED:
        url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
        target = home / "hub" / "checkpoints" / os.path.basename(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), target)
    return home


@pytest.mark.slow
@pytest.mark.long(330)  # fifteen pipeline runs, one after another
def test_readme_command_blocks_run_as_written(tmp_path: Path, no_proxy: None) -> None:
    blocks = readme_blocks(README.read_text())
    fixture = make_idx_raw(tmp_path / "www", n_train=200, n_test=60)
    ports = {"port": free_port(), "ui_port": free_port()}
    while ports["ui_port"] == ports["port"]:
        ports["ui_port"] = free_port()
    with contextlib.contextmanager(serve)(fixture.folder) as server:
        tiny = tiny_pipeline_params(server.url, fixture.checksums)
        project = pipeline_project(
            tmp_path / "cnnpipe", server.url, fixture.checksums, commit=True, extra=("scripts",),
            params={"mlflow": {**tiny["mlflow"], "registered_model": "cnnpipe-classifier"},
                    "grid": {**tiny["grid"], "cache": True}})
        (project / ".venv").symlink_to(Path(sys.prefix))  # `source .venv/bin/activate` runs as written
        with (project / ".git" / "info" / "exclude").open("a") as exclude:
            exclude.write(".venv\n")
        env = clean_env(project, {"GIT_AUTHOR_NAME": "reader", "GIT_AUTHOR_EMAIL": "reader@localhost",
                                  "GIT_COMMITTER_NAME": "reader", "GIT_COMMITTER_EMAIL": "reader@localhost",
                                  "TORCH_HOME": str(placed_weights(tmp_path / "torch_home"))})
        state = tmp_path / "shell-state.sh"
        ran = []
        started = time.monotonic()
        for block in blocks:
            if block.language == "yaml" and block.text.startswith("models:"):
                merge_models(project, block)
            elif block.language == "bash" and block.skip_reason is None:
                run_block(project, block, state, ports, env)
                ran.append(block.line)
        print(f"{len(ran)} README blocks ran in {time.monotonic() - started:.0f} s")
    assert ran, "no README block ran"
