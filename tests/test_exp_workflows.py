"""DVC experiment workflows end to end, with the real ``dvc`` CLI and a real MLflow store.

One temp git + DVC repo (this project's pipeline, tiny params, raw IDX files
served on 127.0.0.1) is built and reproduced once for the module; the tests
then act on it **in file order**, the way a newcomer would: repro again,
push/clone/pull, ``dvc exp run -S``, an eval-only experiment, the params
lists, and the DVC <-> MLflow links of everything that ran. (Queued sweeps:
``test_faults_concurrency.py``.)

Run-cache note (checked in ``test_a_copy_without_dvc_lock_...``): the train, evaluate
and plots stages declare ``cache: false`` outputs that are neither metrics
nor plots, and DVC 3 then never saves them to its run cache. An experiment
that repeats earlier training params therefore re-trains and gets its own
MLflow runs; only a stage whose ``dvc.lock`` entry already matches is
skipped, and its reports keep the MLflow ids of the run that made them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures_raw import make_idx_raw, serve
from project_builder import DVC, ROOT, TINY, commit_all, pipeline_project, run, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.long(110)]  # one project, experiment after experiment

BASE_LR = 0.01
ALL_STAGES = tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # every stage of the pipeline


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '(\w+)' didn't change, skipping", output))


@dataclass
class ExpRepo:
    path: Path
    baseline_rev: str
    baseline_best: dict[str, str]
    baseline_prepared: dict[str, str]
    repro_output: str
    # experiment name -> what it changed; filled by the tests as they run
    experiments: dict[str, str] = field(default_factory=dict)

    def dvc(self, *args: str, timeout: float = 600) -> str:
        done = run_ok([DVC, *args], self.path, timeout=timeout)
        return done.stdout + done.stderr

    def exp_show(self) -> dict[str, dict[str, Any]]:
        """``dvc exp show --json`` as {experiment name (or 'baseline'/'workspace'): {'params', 'train', 'metrics'}}."""
        rows: dict[str, dict[str, Any]] = {}

        def flat(data: dict[str, Any]) -> dict[str, Any]:
            metrics = data.get("metrics") or {}
            return {"params": data["params"]["params.yaml"]["data"],
                    "train": metrics.get("reports/train.json", {}).get("data", {}),
                    "metrics": metrics.get("reports/metrics.json", {}).get("data", {})}

        for entry in json.loads(self.dvc("exp", "show", "--json")):
            if entry["rev"] == "workspace":
                rows["workspace"] = flat(entry["data"])
                continue
            if entry["rev"] == self.baseline_rev:
                rows["baseline"] = flat(entry["data"])
            for exp in entry.get("experiments") or []:
                rows[exp["name"]] = flat(exp["revs"][0]["data"])
        return rows

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=f"sqlite:///{self.path / 'mlflow.db'}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExpRepo]:
    """This project's pipeline, reproduced once and committed as the experiments' baseline."""
    base = tmp_path_factory.mktemp("exp-workflows")
    raw = make_idx_raw(base / "www", n_train=200, n_test=60)
    with contextlib.contextmanager(serve)(raw.folder) as server:
        project = pipeline_project(
            base / "repo", server.url, raw.checksums, commit=True, extra=("scripts",),
            params={"model": "tiny", "models": {"tiny": TINY}, "lr": BASE_LR, "batch_size": 50},
        )
        repro = run_ok([DVC, "repro"], project, timeout=600)
        rev = commit_all(project, "baseline: dvc repro")
        state = ExpRepo(project, rev, tree_digest(project / "models" / "best"),
                        tree_digest(project / "data" / "prepared"), repro.stdout)
        try:
            yield state
        finally:
            run([DVC, "queue", "stop"], project, timeout=120)  # idle queue workers, if any are left


def test_repro_runs_every_stage_once_then_is_a_noop(repo: ExpRepo) -> None:
    assert ran(repo.repro_output) == set(ALL_STAGES)
    again = repo.dvc("repro")
    assert "Data and pipelines are up to date." in again
    assert ran(again) == set() and skipped(again) == set(ALL_STAGES)


def test_push_then_a_fresh_clone_pulls_models_best_byte_identical(repo: ExpRepo) -> None:
    # Runs before any experiment: the workspace is still the committed baseline.
    remote = repo.path.parent / "cnnpipe-dvc-remote"
    setup = run_ok(["bash", "scripts/setup.sh", "remote"], repo.path)
    assert f"setup: default DVC remote 'localstore' -> {remote}" in setup.stdout
    pushed = repo.dvc("push")
    assert re.search(r"\d+ files? pushed", pushed), pushed
    assert any(remote.rglob("*")), "the remote folder is still empty"

    clone = repo.path.parent / "clone"
    run_ok(["git", "clone", "-q", str(repo.path), str(clone)], repo.path.parent)
    assert not (clone / "models" / "best").exists()  # DVC-tracked: not in git
    # The remote is configured per clone (.dvc/config.local); a clone beside the repo gets the same default.
    setup = run_ok(["bash", "scripts/setup.sh", "remote"], clone)
    assert f"-> {remote}" in setup.stdout
    run_ok([DVC, "pull"], clone, timeout=600)
    assert tree_digest(clone / "models" / "best") == repo.baseline_best
    assert tree_digest(clone / "data" / "prepared") == repo.baseline_prepared
    status = run_ok([DVC, "status"], clone)
    assert "Data and pipelines are up to date." in status.stdout  # nothing to retrain after a pull


def test_a_copy_without_dvc_lock_restores_the_data_stages_from_dvcs_run_cache(repo: ExpRepo) -> None:
    """A queued experiment's temp copy of a commit without dvc.lock must not re-run download and prepare.

    DVC turns its run cache off for a stage with a plain ``cache: false``
    output, so every output of both data stages is cached.
    """
    copy = repo.path.parent / "copy-without-lock"
    run_ok(["git", "clone", "-q", str(repo.path), str(copy)], repo.path.parent)
    run_ok([DVC, "config", "--local", "cache.dir", str(repo.path / ".dvc" / "cache")], copy)
    (copy / "dvc.lock").unlink()
    out = run_ok([DVC, "repro", "prepare"], copy, timeout=600)
    text = out.stdout + out.stderr
    assert ran(text) == set(), text
    assert set(re.findall(r"Stage '(\w+)' is cached - skipping run", text)) == {"download", "prepare"}, text
    assert tree_digest(copy / "data" / "prepared") == repo.baseline_prepared
    assert (copy / "reports" / "samples.png").stat().st_size > 0
    # train is never restored from the run cache (its cache: false outputs): the same params train again,
    # so a queued experiment that repeats earlier params still gets its own MLflow runs.
    out = run_ok([DVC, "repro", "train"], copy, timeout=600)
    text = out.stdout + out.stderr
    assert ran(text) == {"train"} and "'train' is cached - skipping run" not in text, text


def test_exp_run_set_lr_retrains_but_reuses_the_data_stages(repo: ExpRepo) -> None:
    out = repo.dvc("exp", "run", "-S", "lr=0.003")
    name = re.search(r"Reproducing experiment '([\w-]+)'", out).group(1)
    repo.experiments[name] = "lr=0.003"
    assert skipped(out) == {"download", "prepare", "weights"}
    assert ran(out) == {"train", "evaluate", "plots"}

    rows = repo.exp_show()
    exp, baseline = rows[name], rows["baseline"]
    assert exp["params"]["lr"] == 0.003 and baseline["params"]["lr"] == BASE_LR
    for row in (exp, baseline):
        assert 0.0 <= row["train"]["val_top1"] <= 1.0 and row["train"]["val_loss"] > 0
        assert 0.0 <= row["metrics"]["test_top1"] <= row["metrics"]["test_top5"] <= 1.0
    assert exp["train"]["run_id"] != baseline["train"]["run_id"]
    assert exp["train"]["mlflow_parent_run_id"] != baseline["train"]["mlflow_parent_run_id"]
    csv_header = repo.dvc("exp", "show", "--csv").splitlines()[0].split(",")
    assert {"lr", "test_top1", "reports/train.json:val_top1"} <= set(csv_header)


def test_eval_only_param_reruns_evaluate_and_plots_not_train(repo: ExpRepo) -> None:
    before = json.loads((repo.path / "reports" / "train.json").read_text())
    out = repo.dvc("exp", "run", "-S", "eval.top_k=[1,3]")
    name = re.search(r"Reproducing experiment '([\w-]+)'", out).group(1)
    repo.experiments[name] = "eval.top_k=[1,3]"
    assert skipped(out) == {"download", "prepare", "weights", "train"}
    assert ran(out) == {"evaluate", "plots"}

    metrics = json.loads((repo.path / "reports" / "metrics.json").read_text())
    assert "test_top3" in metrics and "test_top5" not in metrics
    # The model was trained by the previous experiment: its MLflow runs receive this evaluation.
    assert metrics["mlflow_parent_run_id"] == before["mlflow_parent_run_id"]
    child = repo.mlflow().get_run(before["mlflow_run_id"])
    assert child.data.metrics["test_top3"] == pytest.approx(metrics["test_top3"])


def test_params_lists_in_dvc_yaml_are_exact(repo: ExpRepo) -> None:
    """``dvc status`` after editing params: each change dirties exactly the stages that read it."""
    path = repo.path / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params["data"]["download"]["timeout"] = 20
    params["data"]["val_fraction"] = 0.2
    params["select_by"] = "val_top1"
    params["eval"]["mistakes"] = 3
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(repo.dvc("status", "--json"))
    finally:
        path.write_text(original)
    changed = {stage: set(entries[0]["changed deps"]["params.yaml"]) for stage, entries in status.items()}
    assert changed == {"download": {"data.download"}, "prepare": {"data.val_fraction"}, "weights": {"data.download"},
                       "train": {"select_by"}, "evaluate": {"eval"}, "plots": {"select_by"}}
    assert "Data and pipelines are up to date." in repo.dvc("status")


def test_dvc_and_mlflow_link_both_ways(repo: ExpRepo) -> None:
    assert len(repo.experiments) == 2, "runs after the experiment tests above (file order)"
    rows = repo.exp_show()
    client = repo.mlflow()
    trained_by: dict[str, str] = {}  # MLflow parent run id -> experiment that trained it
    for name in repo.experiments:
        train, metrics, params = rows[name]["train"], rows[name]["metrics"], rows[name]["params"]
        # DVC -> MLflow: both reports carry the ids of the runs that made the model.
        ids = ("mlflow_parent_run_id", "mlflow_run_id", "mlflow_experiment_id")
        assert all(train[key] for key in ids) and {k: metrics[k] for k in ids} == {k: train[k] for k in ids}
        parent = client.get_run(train["mlflow_parent_run_id"])
        child = client.get_run(train["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.experiment_id == parent.info.experiment_id == train["mlflow_experiment_id"]
        assert float(child.data.params["lr"]) == params["lr"]
        assert child.data.metrics["test_top1"] == pytest.approx(metrics["test_top1"])
        # MLflow -> DVC: the parent is named and tagged after the experiment that trained it.
        tags = parent.data.tags
        assert tags["dvc.exp_name"] == parent.info.run_name
        assert tags["dvc.exp_baseline_rev"] == repo.baseline_rev == tags["mlflow.source.git.commit"]
        assert tags["cnnpipe.role"] == "parent" and tags["dvc.stage"] == "train"
        trained_by.setdefault(parent.info.run_id, parent.info.run_name)
    # Every experiment that changed a training param has its own parent; the eval-only one points
    # at the parent of the experiment whose model it evaluated.
    own = {name for name in repo.experiments if rows[name]["train"]["mlflow_parent_run_id"] in trained_by
           and trained_by[rows[name]["train"]["mlflow_parent_run_id"]] == name}
    assert {name for name, what in repo.experiments.items() if not what.startswith("eval.")} == own

    parents = client.search_runs([rows["baseline"]["train"]["mlflow_experiment_id"]],
                                 filter_string="tags.`cnnpipe.role` = 'parent'")
    exp_parents = [p for p in parents if "dvc.exp_name" in p.data.tags]
    assert sorted(p.info.run_name for p in exp_parents) == sorted(own)
    # The plain `dvc repro` baseline is not an experiment: no dvc.exp_* tags, but the git commit.
    (plain,) = [p for p in parents if "dvc.exp_name" not in p.data.tags]
    assert plain.info.run_id == rows["baseline"]["train"]["mlflow_parent_run_id"]
    assert plain.info.run_name.startswith("train-") and plain.data.tags["mlflow.source.git.commit"]


RANGE = {"log_uniform": [0.0001, 0.1]}


def test_a_range_replaces_a_list_from_the_command_line(repo: ExpRepo) -> None:
    """The README's form: ``-S '~lr' -S '+lr={log_uniform: [...]}'`` turns a list key into a range.

    A plain ``-S 'lr={log_uniform: [...]}'`` fails on a key that is a list (the shipped
    ``lr: [0.01, 0.001]``): DVC cannot write a mapping over a list. Runs last: it leaves the
    workspace's ``lr`` a range and adds an experiment the link test above does not expect.
    """
    path = repo.path / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["lr"] = [0.01, 0.001]  # as in the shipped params.yaml
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    plain = run([DVC, "exp", "run", "-S", "lr={log_uniform: [0.0001, 0.1]}"], repo.path)
    assert plain.returncode != 0 and "Cannot merge DictConfig with ListConfig" in plain.stdout + plain.stderr

    out = repo.dvc("exp", "run", "-S", "~lr", "-S", "+lr={log_uniform: [0.0001, 0.1]}", "-S", "grid.samples=2")
    name = re.search(r"Reproducing experiment '([\w-]+)'", out).group(1)
    assert ran(out) == {"train", "evaluate", "plots"}
    row = repo.exp_show()[name]
    assert row["params"]["lr"] == RANGE and row["params"]["grid"]["samples"] == 2
    client = repo.mlflow()
    parent = client.get_run(row["train"]["mlflow_parent_run_id"])
    assert parent.info.run_name == name
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    drawn = sorted(float(child.data.params["lr"]) for child in children)
    assert len(drawn) == 2 and drawn[0] < drawn[1] and all(0.0001 <= lr <= 0.1 for lr in drawn)


def test_setup_remote_default_override_and_team_remote(tmp_path: Path) -> None:
    """``scripts/setup.sh remote``: ../cnnpipe-dvc-remote by default, CNNPIPE_DVC_REMOTE wins, a team default is kept."""
    project = tmp_path / "repo"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", project / "scripts" / "setup.sh")
    run_ok(["git", "init", "-q"], project)

    def setup(**env: str) -> str:
        return run_ok(["bash", "scripts/setup.sh", "remote"], project, env=env).stdout

    def default_url() -> str:  # (`dvc remote list` cuts long paths to the terminal width)
        name = run_ok([DVC, "remote", "default"], project).stdout.strip()
        return run_ok([DVC, "config", f"remote.{name}.url"], project).stdout.strip()

    first = setup()
    assert "setup: initialising DVC" in first
    assert default_url() == str(tmp_path / "cnnpipe-dvc-remote") and (tmp_path / "cnnpipe-dvc-remote").is_dir()
    assert setup() == ""  # idempotent and quiet
    assert f"-> {tmp_path / 'other'}" in setup(CNNPIPE_DVC_REMOTE=str(tmp_path / "other"))
    assert default_url() == str(tmp_path / "other")
    # A team remote committed to .dvc/config: the local default no longer shadows it.
    run_ok([DVC, "remote", "add", "-d", "team", "s3://team-bucket/cnnpipe"], project)
    assert run_ok([DVC, "remote", "default"], project).stdout.strip() == "localstore"  # the trap
    assert "default DVC remote is now 'team'" in setup()
    assert run_ok([DVC, "remote", "default"], project).stdout.strip() == "team"
    assert "team" not in (project / ".dvc" / "config.local").read_text()
