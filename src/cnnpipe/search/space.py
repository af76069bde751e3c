"""The search space: params -> the trial configs (placeholder until the sampled-axes schema lands)."""

from __future__ import annotations

from cnnpipe.params import Params, RunConfig, expand_grid


def expand(params: Params) -> list[RunConfig]:
    return expand_grid(params)
