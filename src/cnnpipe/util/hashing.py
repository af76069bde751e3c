"""Content hashes: the one way cnnpipe names a file's bytes or a JSON-able payload.

Every stored result (run cache, run states, stored reports and figures,
cached features), the run ids and the prepared data's fingerprint are named
by ``digest``: SHA-256 over one canonical JSON encoding (sorted keys, no
spaces), so two payloads that are equal as data always get the same name.
``length`` only shortens what a person reads (a run id); keys of stored
results use the default.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

CHUNK = 1 << 20
KEY_LENGTH = 24  # hex characters of a stored result's key: 96 bits, no collision in any real cache


def canonical_json(payload: Any) -> bytes:
    """``payload`` as JSON bytes that depend only on its value (key order, spacing and tuples vs lists do not count)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def digest(payload: Any, length: int = KEY_LENGTH) -> str:
    """The first ``length`` hex characters of the SHA-256 of ``canonical_json(payload)``."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()[:length]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The full SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()
