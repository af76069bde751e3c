"""Where the stores live: ``.cnnpipe-cache/`` at the project root (``$DVC_ROOT`` in a queued experiment).

Its own module so that a store that only needs the folder (stored figures,
run states, the inventory) does not import the run cache and the engine
behind it.
"""

from __future__ import annotations

from pathlib import Path

from cnnpipe.util.env import CACHE_DIR, NO_CACHE, flag, text
from cnnpipe.util.paths import project_root

CACHE_DIRNAME = ".cnnpipe-cache"


def default_cache_dir() -> Path:
    """The run cache's folder, ``.cnnpipe-cache/runs`` (``CNNPIPE_CACHE_DIR`` overrides it); the other stores sit beside it."""
    override = text(CACHE_DIR)
    return Path(override) if override else project_root() / CACHE_DIRNAME / "runs"


def env_no_cache() -> bool:
    """``CNNPIPE_NO_CACHE``: recompute every stored result (fresh ones are still stored)."""
    return flag(NO_CACHE)
