"""The ``pretrained`` section: where a torchvision model's starting weights come from.

Apart from the other sections because it checks a source against the
torchvision names (``models.torchvision_spec``): the stages that read only
``data`` (download, prepare) never load the model tables.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field, model_validator

from cnnpipe.models.torchvision_spec import source_kind
from cnnpipe.params.messages import _bad
from cnnpipe.params.sections import _sha256
from cnnpipe.params.values import _Strict


class PretrainedParams(_Strict):
    """Where a torchvision model's starting weights come from (fetched by ``cnnpipe.pretrained.fetch``)."""

    _KEY_PREFIX: ClassVar[str] = "pretrained."

    weights: Annotated[str, Field(min_length=1)] = "IMAGENET1K_V1"  # a torchvision weights name, none, a path/URL, a checkpoint
    sha256: Annotated[str, AfterValidator(_sha256)] | None = None  # required for a file or URL; checked for all

    @model_validator(mode="after")
    def _pinned(self) -> "PretrainedParams":
        kind = source_kind(self.weights)
        if "://" in self.weights and kind not in ("url", "registry"):
            raise _bad(f".weights uses unsupported scheme {self.weights.split('://', 1)[0]!r}; use http(s)://, "
                       "models:/NAME@ALIAS, a file or checkpoint folder, a torchvision weights name or none")
        if kind in ("url", "file") and self.sha256 is None:
            raise _bad(f".weights {json.dumps(self.weights)} is a file or URL: pin it with pretrained.sha256 "
                       "(sha256sum FILE) so the run cannot silently start from other weights")
        return self
