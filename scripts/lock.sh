#!/usr/bin/env bash
# Re-resolve requirements.lock from pyproject.toml (every dependency and the
# test/ray extras), with sha256 hashes, for every platform (--universal: a
# Mac or ARM clone installs the same versions as Linux x86_64 CI).
# Run it after editing dependencies in pyproject.toml, then commit both files;
# tests/test_lock.py fails while they disagree.
#
#   bash scripts/lock.sh            re-resolve (keeps locked versions that still fit)
#   bash scripts/lock.sh --upgrade  move every package to its newest allowed version
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
uv=$(command -v uv || true)
if [ -z "$uv" ]; then
  # uv is one static binary on PyPI; keep it out of the project's own venv.
  tools=.venv-tools
  [ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/python" -m pip install -q "uv==$UV_VERSION"; }
  uv=$tools/bin/uv
fi
"$uv" pip compile pyproject.toml --extra test --extra ray --universal --python-version 3.11 \
  --generate-hashes --custom-compile-command "bash scripts/lock.sh" -o requirements.lock "$@"
