"""The sections of ``params.yaml`` that are not training keys: ``data``, ``eval``, ``mlflow``, ``grid``, ``pretrained``."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from cnnpipe.data.registry import DATASETS, REGISTRY_SOURCE, DatasetSpec, folder_spec, get_dataset, is_archive_name
from cnnpipe.params.messages import _bad, _shown, suggest
from cnnpipe.params.values import NonNegInt, PositiveFloat, PositiveInt, _Strict, _no_bool


def _workers(value: Any) -> Any:
    if value == "auto" or (type(value) is int and value > 0):
        return value
    raise _bad(f"must be 'auto' or an integer > 0, got {_shown(value)}")


_MIRROR_SCHEMES = ("http://", "https://", "file://")


def _mirror(value: str) -> str:
    if "://" in value and not value.startswith(_MIRROR_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise _bad(f"uses unsupported scheme {scheme!r} in {json.dumps(value)}; use http://, https://, file:// or a folder path")
    return value


def _sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise _bad(f"must be a 64-character lowercase hex SHA-256, got {json.dumps(value)}")
    return value


class DownloadParams(_Strict):

    _KEY_PREFIX: ClassVar[str] = "data.download."
    timeout: PositiveFloat = 30.0
    retries: NonNegInt = 3


class DataParams(_Strict):

    _KEY_PREFIX: ClassVar[str] = "data."
    dataset: str = "fashion-mnist"
    val_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False), BeforeValidator(_no_bool)] = 0.1
    split_seed: NonNegInt = 0
    mirrors: list[Annotated[str, AfterValidator(_mirror)]] = Field(default_factory=list)
    checksums: dict[str, Annotated[str, AfterValidator(_sha256)]] = Field(default_factory=dict)
    download: DownloadParams = Field(default_factory=DownloadParams)
    # Your own images (dataset: folder); the benchmark datasets ignore these. See cnnpipe.data.folder.
    source: str = REGISTRY_SOURCE  # a class-per-folder tree, a .zip/.tar.gz of one, or an http(s) URL of that
    image_size: list[PositiveInt] = Field(default_factory=lambda: [64, 64])  # [height, width]
    channels: Literal[1, 3] = 3
    test_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False), BeforeValidator(_no_bool)] = 0.2
    sha256: Annotated[str, AfterValidator(_sha256)] | None = None  # pins an archive source
    strict: StrictBool = False  # refuse (instead of skip) unreadable or non-image files
    max_pixels: PositiveInt = 50_000_000  # refuse any image larger than this (decompression bombs)
    dedupe: StrictBool = True  # drop val/test images whose exact bytes are also in an earlier split

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in DATASETS:
            raise _bad(f"must be one of {list(DATASETS)}, got {json.dumps(name)}{suggest(name, DATASETS)}")
        return name

    @model_validator(mode="after")
    def _folder_source(self) -> "DataParams":
        """``dataset: folder`` needs a source of its own and a sane image size."""
        if not get_dataset(self.dataset).is_folder:
            return self
        source = self.source
        if source == REGISTRY_SOURCE:
            raise _bad(".dataset is folder but data.source still names the benchmark registry; set data.source "
                       "to your class-per-folder images (a folder, a .zip/.tar.gz, or an http(s) URL of one)")
        if "://" in source and not source.startswith(("http://", "https://")):
            raise _bad(f".source uses unsupported scheme {source.split('://', 1)[0]!r}; use a folder path, "
                       "an archive path or an http(s) URL")
        if len(self.image_size) != 2 or max(self.image_size) > 8192:
            raise _bad(f".image_size must be [height, width], each 1..8192, got {json.dumps(self.image_size)}")
        remote = source.startswith(("http://", "https://"))
        if self.sha256 and not (remote or is_archive_name(source)):
            raise _bad(".sha256 pins an archive, but data.source is a folder (DVC tracks a folder's content); "
                       "remove data.sha256 or point data.source at a .zip/.tar.gz")
        if remote and not is_archive_name(source):
            raise _bad(f".source {json.dumps(source)} must name a .zip, .tar, .tar.gz or .tgz archive")
        return self

    def spec(self) -> DatasetSpec:
        """The registry entry for ``dataset``; for ``folder``, at ``channels`` x ``image_size``."""
        spec = get_dataset(self.dataset)
        return folder_spec(self.image_size, self.channels) if spec.is_folder else spec


class EvalParams(_Strict):

    _KEY_PREFIX: ClassVar[str] = "eval."
    top_k: list[PositiveInt] = Field(default_factory=lambda: [1, 5], min_length=1)
    batch_size: PositiveInt = 1000
    mistakes: NonNegInt = 25
    tta: Literal["auto", "none", "flip"] = "auto"  # test-time augmentation (see cnnpipe.evaluation.score)


class MlflowParams(_Strict):

    _KEY_PREFIX: ClassVar[str] = "mlflow."
    enabled: StrictBool = True
    tracking_uri: str | None = None
    experiment: Annotated[str, Field(min_length=1)] = "cnnpipe"
    registered_model: str | None = "cnnpipe-classifier"
    log_layer_stats: StrictBool = True


class GridParams(_Strict):
    """How the search runs: where (workers, backend), how much (max_runs, samples) and which strategy."""

    _KEY_PREFIX: ClassVar[str] = "grid."

    workers: Annotated[Union[Literal["auto"], int], PlainValidator(_workers)] = "auto"
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    max_runs: PositiveInt = 64
    cache: StrictBool = True
    # exhaustive | halving (successive halving) | tpe (Optuna's TPE learns from finished trials: search.ask_tell)
    strategy: Literal["exhaustive", "halving", "tpe"] = "exhaustive"
    eta: Annotated[StrictInt, Field(ge=2)] = 3  # halving: keep the best 1/eta of the trials at each rung
    min_epochs: PositiveInt = 1  # halving: epochs of the first rung; rungs at min_epochs*eta**k, capped by epochs
    samples: PositiveInt = 8  # points drawn when a training key is a range; tpe: the trial budget (<= max_runs)
    search_seed: NonNegInt = 0  # seeds the draws (and tpe's sampler): same params -> same points
    # tpe: trials asked at once, then told together. A fixed size, not the worker count, so the same params
    # give the same trials on any machine; the first batch is random (TPE has nothing to model yet).
    batch: PositiveInt = 4
    prune: Literal["none", "halving"] = "none"  # tpe: successive halving (eta, min_epochs) inside each batch
    spread_threads: StrictBool = False  # give idle workers' cores to a rung's fewer trials (not bitwise then)

    def rungs(self, epochs: int) -> tuple[int, ...]:
        """Halving's rungs for a run of ``epochs``: min_epochs * eta**k while below ``epochs``, then ``epochs``."""
        out: list[int] = []
        rung = self.min_epochs
        while rung < epochs:
            out.append(rung)
            rung *= self.eta
        return (*out, epochs)
