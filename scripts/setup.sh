#!/usr/bin/env bash
# Idempotent setup: virtualenv, the project and the exact dependency versions
# in requirements.lock (hash-checked), git + DVC, the default local DVC remote.
# A second run takes about a second (nothing is reinstalled until
# pyproject.toml or requirements.lock changes).
#
#   bash scripts/setup.sh          everything (what `make run` / `make test` call)
#   bash scripts/setup.sh remote   only git + DVC + the default remote, with the
#                                  dvc already on PATH (e.g. in a fresh clone)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}

if [ "$MODE" != remote ]; then
  PY=${PYTHON:-python3}
  VENV=.venv
  STAMP=$VENV/.cnnpipe-installed
  want="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"

  if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
  fi
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the locked dependencies (requirements.lock) and cnnpipe into $VENV (first time: ~4 min)"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # pip -q still prints index warnings; keep the log readable.
    quiet() { "$@" 2> >(grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" -e "return '\\n'.join" >&2); }
    # Every package at the locked version, each file checked against its sha256.
    quiet "$VENV/bin/python" -m pip install -q --require-hashes -r requirements.lock
    # Then the project itself, without resolving anything again (setuptools is in the lock).
    quiet "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    echo "$want" > "$STAMP"
  fi

  export PATH="$PWD/$VENV/bin:$PATH"
fi
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

# Default remote: a folder beside the work tree (../cnnpipe-dvc-remote, so a
# clone next to this one shares it), or CNNPIPE_DVC_REMOTE=/path. It lives in
# .dvc/config.local (not committed): every clone runs this once. A default
# remote you added yourself (dvc remote add -d myremote s3://...) is kept.
# (`dvc remote default` prints "No default remote set" and exits 1 when there is none.)
current="$(dvc remote default 2>/dev/null)" || current=""
wanted="${CNNPIPE_DVC_REMOTE:-$(cd .. && pwd)/cnnpipe-dvc-remote}"
if [ -z "$current" ] || { [ "$current" = localstore ] && [ -n "${CNNPIPE_DVC_REMOTE:-}" ] &&
     [ "$(dvc config --local remote.localstore.url 2>/dev/null || true)" != "$wanted" ]; }; then
  mkdir -p "$wanted"
  dvc remote add --local -f -d localstore "$wanted" >/dev/null
  echo "setup: default DVC remote 'localstore' -> $wanted (dvc push / dvc pull use it)"
elif [ "$current" = localstore ] && [ -z "${CNNPIPE_DVC_REMOTE:-}" ]; then
  # A team default committed in .dvc/config (dvc remote add -d myremote s3://...)
  # is shadowed by our local one: step aside, once, and say so.
  team="$(dvc config --project core.remote 2>/dev/null)" || team=""
  if [ -n "$team" ] && [ "$team" != localstore ]; then
    dvc remote default --unset --local >/dev/null
    echo "setup: default DVC remote is now '$team' from .dvc/config (localstore stays available: dvc push -r localstore)"
  fi
fi
