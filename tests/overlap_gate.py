"""Run a stage script in this process, holding its first MLflow child open until other experiments' are open too.

For ``test_faults_concurrency``: that test copies this file into its temp
project and makes the train command ``python overlap_gate.py stages/train.py``,
so the overlap of two queued experiments' writes to the one store happens by
construction, however busy the machine is, instead of by luck.
``test_faults_tracking`` uses it the same way to kill an MLflow server while
a trial is held after its first logged epoch (the kill lands mid-grid by
construction).

Without ``OVERLAP_GATE_DIR`` in the environment it only runs the script (the
baseline ``dvc repro``, a later queue). With it, the script's stdout goes
through ``HoldAtFirstEpoch``: the train stage prints its first per-epoch line
(``[seed=1] epoch 1/2: ...``) right after logging that epoch to the trial's
open MLflow child run, and the print does not return until
``OVERLAP_GATE_PARTIES`` experiments have each written their marker (their
``$DVC_EXP_NAME``) into ``OVERLAP_GATE_DIR``. Each experiment writes its own
marker before it waits, so none waits for one that waits for it, and when the
last marker appears every experiment's child is open in the store at once:
none can end before it has seen all the markers. Nothing of the stage is
replaced: only the moment its print returns is delayed, as a slow terminal
would. After ``GIVE_UP_S`` (a safety net, never expected) it goes on without
the others and says so, so a broken setup fails the test's assertions instead
of hanging the queue.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
import time
from pathlib import Path
from typing import Any, TextIO

EPOCH_LINE = re.compile(r"^\[[^\]]+\] epoch \d+/\d+: ")  # the search's epoch_line: "[seed=1] epoch 1/2: ..."
GIVE_UP_S = 600
PASSED = "overlap gate: all {} experiments' children are open; going on"


class HoldAtFirstEpoch:
    """``stream``, except that the first complete per-epoch line blocks until all parties' markers exist."""

    def __init__(self, stream: TextIO, folder: Path, parties: int, name: str) -> None:
        self.stream, self.folder, self.parties, self.name = stream, folder, parties, name
        self.partial = ""
        self.held = False

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if not self.held:
            lines = (self.partial + text).split("\n")
            self.partial = lines.pop()  # the unfinished last line
            if any(EPOCH_LINE.match(line) for line in lines):
                self.held = True
                self.hold()
        return written

    def hold(self) -> None:
        say = lambda line: print(line, file=self.stream, flush=True)  # noqa: E731
        self.stream.flush()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.name).write_text(str(os.getpid()))
        say(f"overlap gate: {self.name} holds its child open until {self.parties} experiments' children are open")
        deadline = time.monotonic() + GIVE_UP_S
        while len(list(self.folder.iterdir())) < self.parties:
            if time.monotonic() > deadline:
                say(f"overlap gate: gave up waiting after {GIVE_UP_S} s (found {sorted(os.listdir(self.folder))})")
                return
            time.sleep(0.05)
        say(PASSED.format(self.parties))

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self.stream, name)


def main() -> None:
    script = sys.argv[1]
    folder = os.environ.get("OVERLAP_GATE_DIR")
    if folder:
        name = os.environ.get("DVC_EXP_NAME") or f"pid-{os.getpid()}"
        sys.stdout = HoldAtFirstEpoch(sys.stdout, Path(folder), int(os.environ.get("OVERLAP_GATE_PARTIES", "2")), name)
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python stages/train.py` would have it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
