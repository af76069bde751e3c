#!/usr/bin/env bash
# Idempotent setup: virtualenv, the project and its pinned deps, git + DVC,
# the default local DVC remote. A second run takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.cnnpipe-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing cnnpipe and its pinned dependencies into $VENV (first time: ~4 min)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # pip -q still prints index warnings; keep the log readable.
  "$VENV/bin/python" -m pip install -q -e '.[test]' 2> >(grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" -e "return '\\n'.join" >&2)
  echo "$want" > "$STAMP"
fi

export PATH="$PWD/$VENV/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # A copy without .git (e.g. a downloaded archive): dvc experiments need a
  # repository with one commit.
  echo "setup: initialising a git repository with one commit (dvc experiments need one)"
  git init -q
  git add -A >/dev/null 2>&1
  git -c user.name=cnnpipe -c user.email=cnnpipe@localhost commit -qm "Initial commit" >/dev/null 2>&1 || true
fi
if [ ! -d .dvc ]; then
  echo "setup: initialising DVC"
  dvc init -q
fi

# Default remote: a folder outside the work tree, overridable with
# CNNPIPE_DVC_REMOTE=/path or by adding your own default remote (see README).
if ! dvc remote default >/dev/null 2>&1 || [ -z "$(dvc remote default 2>/dev/null)" ]; then
  remote="${CNNPIPE_DVC_REMOTE:-$(cd .. && pwd)/cnnpipe-dvc-remote}"
  mkdir -p "$remote"
  dvc remote add --local -f -d localstore "$remote" >/dev/null
  echo "setup: default DVC remote 'localstore' -> $remote (dvc push / dvc pull use it)"
fi
