"""``RunConfig``: one search point, the scalar training values plus the resolved architecture."""

from __future__ import annotations

from typing import Any, ClassVar

from cnnpipe.params.messages import _fmt
from cnnpipe.params.values import TrainingValues, _Strict
from cnnpipe.util.hashing import digest


class RunConfig(_Strict):
    """One search point: scalar training values plus the resolved architecture."""

    _KEY_PREFIX: ClassVar[str | None] = None  # not a part of params.yaml: its values' reads are noted

    values: TrainingValues
    layers: tuple[Any, ...]  # the resolved layer spec of ``values.model`` (plain YAML data)
    axes: tuple[str, ...] = ()  # training keys that vary across the search
    dataset: str = "fashion-mnist"
    # Where pinned pretrained weights are read from (the weights stage's output); not part of any key:
    # the layer spec pins the weights by SHA-256, and the engine checks the file against it.
    weights_dir: str | None = None

    @property
    def run_id(self) -> str:
        """Short stable id: hash of everything that changes what is trained."""
        return digest({"values": self.values.model_dump(mode="json"), "layers": list(self.layers),
                       "dataset": self.dataset}, length=10)

    @property
    def name(self) -> str:
        """Readable name from the search axes, e.g. ``lr=0.01,batch_size=100``."""
        keys = self.axes or ("model",)
        return ",".join(f"{key}={_fmt(getattr(self.values, key))}" for key in keys)

    def flat(self) -> dict[str, Any]:
        """Training values as a flat dict (for tables and MLflow params)."""
        return self.values.model_dump(mode="json")
