"""Prepared splits read memory-mapped: same bytes, same weights, one shared copy, refused when damaged.

Issue 26: a split may be larger than RAM, so every reader maps the split
file instead of loading it, parallel workers share the page cache instead of
holding a private copy each, ``prepare`` streams, and a long epoch prints
progress where there is no terminal. The in-memory path (``mmap=False``,
today's values) is the reference the mapped one must equal bit for bit.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnpipe.data import resident_pages
from cnnpipe.data.prepared import load_split, load_stats, split_digest
from cnnpipe.data.split_file import SplitFileError, write_split
from cnnpipe.engine.data import TrainData
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.loop import train_run
from cnnpipe.engine.data import on_device
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import TrainingValues
from cnnpipe.util.errors import DataError
from synthetic import make_prepared

ROOT = Path(__file__).resolve().parents[1]
NET = ({"conv": 8, "kernel": 3, "padding": 1, "bias": False}, "batchnorm", "relu", {"maxpool": 2}, "flatten",
       {"dropout": 0.2}, "linear")


def _cfg(**values: object) -> RunConfig:
    base: dict[str, object] = {"model": "tiny", "epochs": 2, "batch_size": 32, "lr": 0.01, "seed": 3,
                               "augment": "crop_flip", "schedule": "onecycle"}
    return RunConfig(values=TrainingValues(**(base | values)), layers=NET, dataset="cifar10")


def _mapping_of(tensor: torch.Tensor) -> str:
    """The /proc/self/maps path backing ``tensor``'s first byte ('' for anonymous memory)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else ""
    return ""


# --------------------------------------------------------------------------- the file format


@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (1, 1, 1, 1), (0, 2, 3, 3)])
def test_the_streamed_writer_writes_the_safetensors_librarys_exact_bytes(tmp_path: Path, shape, monkeypatch) -> None:
    from safetensors.numpy import save_file

    import cnnpipe.data.split_file as split_file

    monkeypatch.setattr(split_file, "CHUNK_BYTES", 50)  # several chunks even for tiny arrays
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = rng.integers(0, 10, size=shape[0]).astype(np.int64)
    digest = write_split(tmp_path / "ours", images, labels, {"format": "cnnpipe-prepared/1"})
    save_file({"images": images, "labels": labels}, str(tmp_path / "theirs"), metadata={"format": "cnnpipe-prepared/1"})
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    assert digest == split_digest(tmp_path / "ours")


def test_a_split_is_mapped_from_its_file_not_copied(prepared_dir: Path) -> None:
    data = TrainData.load(prepared_dir)
    for split in (data.train, data.val, data.test):
        assert split is not None
        assert _mapping_of(split.images).endswith(".safetensors")  # file-backed pages: the page cache's
    assert on_device(data.train.images, "cpu").data_ptr() == data.train.images.data_ptr()  # training copies nothing
    loaded = TrainData.load(prepared_dir, mmap=False)
    assert _mapping_of(loaded.train.images) == "" or not _mapping_of(loaded.train.images).endswith(".safetensors")
    assert torch.equal(data.train.images, loaded.train.images) and torch.equal(data.train.labels, loaded.train.labels)


# --------------------------------------------------------------------------- same weights


@pytest.mark.slow  # ~1-2 s: the first training of a process pays torch's one-off set-up
def test_a_mapped_split_trains_bitwise_the_same_weights_as_the_in_memory_one(tmp_path: Path, monkeypatch) -> None:
    # A budget of one page: the mapped run drops its pages after every batch (data.resident_pages), values unchanged.
    monkeypatch.setattr(resident_pages, "BUDGET_BYTES", resident_pages.PAGE)
    make_prepared(tmp_path / "p", n_train=96, n_val=24, n_test=8, shape=(3, 8, 8), dataset="cifar10")
    mapped, loaded = TrainData.load(tmp_path / "p"), TrainData.load(tmp_path / "p", mmap=False)
    assert _mapping_of(mapped.train.images).endswith("train.safetensors")
    a = train_run(_cfg(), mapped, progress=False, num_threads=1)
    b = train_run(_cfg(), loaded, progress=False, num_threads=1)
    assert a.model is not None and b.model is not None
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r.val_loss for r in a.history] == [r.val_loss for r in b.history]
    kwargs = {"mean": mapped.mean, "std": mapped.std, "batch_size": 7}
    assert torch.equal(evaluate_logits(a.model, mapped.val.images, **kwargs),
                       evaluate_logits(a.model, loaded.val.images, **kwargs))


def _resident_bytes(file_name: str) -> int:
    """Bytes of this process's mappings of ``file_name`` that are resident (``Rss`` in /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            inside = line.endswith(file_name)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.slow  # trains 2 x 500 steps
@pytest.mark.parametrize("loop", ["train", "evaluate"])
def test_a_loop_over_a_large_mapped_split_keeps_only_a_budget_of_it_mapped(tmp_path: Path, monkeypatch, loop) -> None:
    """A 49 MB split read with a 4 MB budget stays mapped only that much (plus a batch); with no cap, all of it."""
    rows, shape, batch = 4000, (3, 64, 64), 8
    make_prepared(tmp_path / "p", n_train=rows, n_val=16, n_test=8, shape=shape, dataset="cifar10")
    split_bytes = rows * int(np.prod(shape))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(shape)), 10))

    def read_all(budget: int) -> int:
        monkeypatch.setattr(resident_pages, "BUDGET_BYTES", budget)
        data = TrainData.load(tmp_path / "p")
        if loop == "evaluate":
            evaluate_logits(model, data.train.images, mean=data.mean, std=data.std, batch_size=batch)
        else:
            train_run(_cfg(model="tiny", epochs=1, batch_size=batch, augment="none", schedule="none"), data,
                      progress=False, num_threads=1)
        resident = _resident_bytes("train.safetensors")
        del data
        gc.collect()  # the split is unmapped before the next measurement
        return resident

    assert read_all(2 * split_bytes) >= 0.9 * split_bytes  # the test can fail: uncapped, the whole split is mapped
    # The kernel maps up to a 2 MB page-cache folio for each row a batch reads.
    assert read_all(4 * 2**20) <= 4 * 2**20 + batch * 2 * 2**20


# --------------------------------------------------------------------------- refusals


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _pad(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 8)


def _foreign_safetensors(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((3, 3), dtype=np.float32)}, str(path))


def _header_garbage(path: Path) -> None:
    path.write_bytes(b"\xff" * 8 + b"not a safetensors file")


def _wrong_dtype(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"images": np.zeros((2, 1, 28, 28), dtype=np.float32), "labels": np.zeros(2, dtype=np.int64)}, str(path))


DAMAGE = [
    ("truncated", _truncate, r"truncated: [\d,]+ bytes, its header describes [\d,]+"),
    ("padded", _pad, r"longer than its header says"),
    ("foreign-safetensors", _foreign_safetensors, r"unexpected tensors \['weight'\]: not a cnnpipe split"),
    ("not-safetensors", _header_garbage, r"header length \d+ does not fit"),
    ("float-images", _wrong_dtype, r"no U8 tensor 'images': not a cnnpipe split"),
]


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
@pytest.mark.parametrize("damage,expected", [(d, e) for _, d, e in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_a_damaged_or_foreign_split_file_is_refused_in_one_line(prepared_dir: Path, damage, expected, verify) -> None:
    """Refused by its header and size, before any hash: even ``verify=False`` (no hashing) refuses it."""
    damage(prepared_dir / "train.safetensors")
    for read in (lambda: load_split(prepared_dir, "train", verify=verify), lambda: TrainData.load(prepared_dir)):
        with pytest.raises(SplitFileError, match=expected) as err:
            read()
        message = str(err.value)
        assert message.startswith(str(prepared_dir / "train.safetensors")) and "\n" not in message
        assert message.endswith("re-run the prepare stage (dvc repro -f prepare)")


def test_a_file_rewritten_after_it_was_hashed_is_hashed_again_and_refused(prepared_dir: Path) -> None:
    """The per-process digest cache is keyed by inode, size and mtime: an in-place edit is caught."""
    path = prepared_dir / "train.safetensors"
    old = time.time() - 3600
    os.utime(path, (old, old))  # an old file: its digest is remembered
    load_split(prepared_dir, "train")
    with open(path, "r+b") as handle:  # same size, same inode: flip the last pixel
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    os.utime(path, (old + 1, old + 1))
    with pytest.raises(DataError, match="does not match stats.json"):
        load_split(prepared_dir, "train")
    assert load_split(prepared_dir, "train", verify=False).images.reshape(-1)[-1] == last[0] ^ 0xFF


# --------------------------------------------------------------------------- progress


def test_a_long_epoch_prints_progress_lines_when_not_a_terminal(tiny_prepared: Path, capfd, monkeypatch) -> None:
    data = TrainData.load(tiny_prepared, splits=("train", "val"))
    monkeypatch.setenv("CNNPIPE_PROGRESS_EVERY", "0.000001")  # every batch counts as "long"
    cfg = RunConfig(values=TrainingValues(model="tiny", epochs=1, batch_size=50, lr=0.01), layers=NET[2:],
                    dataset="fashion-mnist")
    train_run(cfg, data, progress=True, num_threads=1)  # stderr is captured: not a terminal, no bar
    lines = [line for line in capfd.readouterr().err.splitlines() if "batch" in line]
    pattern = re.compile(rf"\[{re.escape(cfg.name)}\] epoch 1/1: batch (\d+)/6 \(\d+%\), \d+ images/s, ETA \d+m\d\ds")
    assert lines and all(pattern.fullmatch(line) for line in lines)
    assert [int(pattern.fullmatch(line).group(1)) for line in lines] == list(range(1, 7))

    monkeypatch.delenv("CNNPIPE_PROGRESS_EVERY")  # the default (30 s): a short epoch prints none
    train_run(cfg, data, progress=True, num_threads=1)
    assert "batch" not in capfd.readouterr().err


# --------------------------------------------------------------------------- shared, not private


WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from cnnpipe.search.trial_data import PreparedSource
    from cnnpipe.data.prepared import load_stats
    from cnnpipe.engine.data import TrainData

    def private_kb():  # a private copy is anonymous memory; the split's file pages are the page cache's
        fields = dict(line.split(":") for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
        return int(fields["Anonymous"].split()[0])

    folder = Path(sys.argv[1])
    torch.zeros(1).sum()
    before = private_kb()
    if sys.argv[2] == "worker":
        data = PreparedSource(folder, load_stats(folder).fingerprint).load()  # what a grid worker does
    else:
        data = TrainData.load(folder, splits=("train", "val"), mmap=False)  # a private copy: the control
    assert int(data.train.images.sum()) > 0  # touch every page of the split
    print(private_kb() - before, flush=True)
    sys.stdin.readline()
""")


def _mapping_memory(pid: int, path: Path) -> dict[str, int]:
    """kB of each smaps field summed over ``pid``'s mappings of ``path``."""
    totals: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and len(head) == 3 and head[2] == "kB":
            totals[head[0].rstrip(":")] = totals.get(head[0].rstrip(":"), 0) + int(head[1])
    return totals


@pytest.mark.slow
def test_two_workers_share_one_copy_of_the_split_instead_of_one_each(tmp_path: Path) -> None:
    """Each worker's private memory (smaps_rollup ``Anonymous``) grows by almost nothing when it maps and
    reads the whole split, and the split's pages are ``Shared_Clean`` in both (``Private_Clean`` would only
    say that one process maps a page cache page, so it is read once both have read the split). A control
    process that reads the split into memory (``mmap=False``) grows by the split's size: the measurement
    tells the two apart."""
    make_prepared(tmp_path / "p", n_train=4000, n_val=20, n_test=20, shape=(3, 64, 64), dataset="cifar10")
    split = (tmp_path / "p" / "train.safetensors").resolve()
    size_kb = 4000 * 3 * 64 * 64 // 1024  # 48 MB of images
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "p"), kind], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for kind in ("worker", "worker", "copy")]
    try:
        grown = [int(p.stdout.readline()) for p in procs if p.stdout is not None]
        memory = [_mapping_memory(p.pid, split) for p in procs[:2]]
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    assert grown[2] >= 0.9 * size_kb, grown  # the control holds a private copy
    for private_growth, m in zip(grown[:2], memory):
        assert private_growth < 0.1 * size_kb, grown  # a worker does not
        assert m.get("Shared_Clean", 0) >= 0.95 * size_kb  # the whole split is resident, as pages both map
        assert m.get("Private_Clean", 0) + m.get("Private_Dirty", 0) < 0.05 * size_kb


# --------------------------------------------------------------------------- prepare streams


PREPARE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import cnnpipe.data.split_file as split_file
    from cnnpipe.data.folder_prepare import prepare_folder

    split_file.CHUNK_BYTES = 1 << 20  # 1 MB chunks: both folders are many chunks long
    prepare_folder(sys.argv[1], sys.argv[2], image_size=[64, 64], channels=3, val_fraction=0.1, test_fraction=0.1,
                   split_seed=0, workers=2)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(int(status["VmHWM"].split()[0]))
""")


def _noise_folder(root: Path, count: int) -> Path:
    """``count`` distinct 8x8 PNGs in 4 classes (prepare upsizes them to 64x64x3: 12 kB a decoded image)."""
    from PIL import Image

    rng = np.random.default_rng(count)
    for i in range(count):
        folder = root / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


@pytest.mark.slow
def test_prepare_memory_stays_flat_when_the_folder_grows_four_times(tmp_path: Path) -> None:
    """Peak RSS of prepare on 800 vs 3,200 images (9.8 vs 39 MB decoded): the larger may not need more.

    Holding the decoded images (let alone a copy per split) would add ~30-60 MB.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    peaks = {}
    for count in (800, 3200):
        source = _noise_folder(tmp_path / f"imgs{count}", count)
        done = subprocess.run([sys.executable, "-c", PREPARE, str(source), str(tmp_path / f"out{count}")], env=env,
                              capture_output=True, text=True, check=True)
        peaks[count] = int(done.stdout.split()[-1]) / 1024  # MB
        assert load_stats(tmp_path / f"out{count}").sizes["train"] > 0.75 * count
    decoded_growth = 2400 * 3 * 64 * 64 / 1e6
    assert peaks[3200] - peaks[800] < 0.25 * decoded_growth, peaks


def test_prepare_says_once_when_the_train_split_is_larger_than_the_memory_available(tmp_path: Path) -> None:
    from dataclasses import replace

    from cnnpipe.data.folder_prepare import available_memory, describe, prepare_folder

    source = _noise_folder(tmp_path / "imgs", 40)
    result = prepare_folder(source, tmp_path / "out", image_size=[8, 8], channels=3, val_fraction=0.2,
                            test_fraction=0.2, split_seed=0)
    assert result.train_bytes == result.stats.sizes["train"] * 3 * 8 * 8 and result.memory == pytest.approx(
        available_memory(), rel=0.5)
    assert not [line for line in describe(result, str(source), True) if "read it from disk" in line]
    lines = [line for line in describe(replace(result, memory=result.train_bytes - 1), str(source), True)
             if "read it from disk" in line]
    assert len(lines) == 1 and lines[0].startswith("prepare: note: the train split (0.0 GB) is larger than the memory")
