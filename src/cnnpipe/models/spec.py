"""Layer specs: the YAML grammar of an architecture, checked without torch.

A model is a list of layers. Each layer is a bare name (``relu``) or a
one-line mapping whose *first* key is the layer type and whose value is its
main argument, with options after it::

    - {conv: 32, kernel: 5, padding: 2}
    - relu
    - {maxpool: 2}
    - flatten
    - {linear: 120}
    - linear            # width defaults to the number of classes

``normalize_layers`` turns that into explicit dicts and infers every shape
and parameter count in pure Python, so a bad spec is reported (with its
index) by ``cnnpipe validate`` in milliseconds, before torch is imported.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

from cnnpipe.util.errors import ParamsError

# type -> (main argument name or None, {option: default}); None default = required
LAYER_TYPES: dict[str, tuple[str | None, dict[str, Any]]] = {
    "conv": ("out", {"out": None, "kernel": 3, "stride": 1, "padding": 0, "bias": True}),
    "residual": ("out", {"out": None, "stride": 1}),
    "maxpool": ("kernel", {"kernel": 2, "stride": None, "padding": 0}),
    "avgpool": ("kernel", {"kernel": 2, "stride": None, "padding": 0}),
    "global_avgpool": (None, {}),
    "batchnorm": (None, {}),
    "relu": (None, {}),
    "gelu": (None, {}),
    "flatten": (None, {}),
    "dropout": ("p", {"p": 0.5}),
    "linear": ("out", {"out": None, "bias": True}),
}
ALIASES = {"view": "flatten", "conv2d": "conv", "bn": "batchnorm", "fc": "linear", "dense": "linear", "pool": "maxpool"}


@dataclass(frozen=True)
class LayerInfo:
    """One normalized layer with its output shape and parameter count."""

    index: int
    spec: dict[str, Any]
    out_shape: tuple[int, ...]
    params: int

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.spec.items() if k != "type")
        return f"{self.spec['type']}({args})" if args else self.spec["type"]


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _parse_one(where: str, raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        kind, options = raw, {}
        main_value: Any = _MISSING
    elif isinstance(raw, dict) and raw:
        items = list(raw.items())
        kind, main_value = items[0]
        options = dict(items[1:])
        if not isinstance(kind, str):
            raise ParamsError(f"{where}: layer type must be a name, got {kind!r}")
        if isinstance(main_value, dict):  # {conv: {out: 32, kernel: 3}}
            options, main_value = {**main_value, **options}, _MISSING
    else:
        raise ParamsError(f"{where}: a layer is a name like 'relu' or a mapping like {{conv: 32, kernel: 3}}, got {json.dumps(raw)}")
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in LAYER_TYPES:
        hint = difflib.get_close_matches(kind, list(LAYER_TYPES) + list(ALIASES), n=1)
        did = f", did you mean {hint[0]}?" if hint else ""
        raise ParamsError(f"{where}: unknown layer type {kind!r}{did} (known: {', '.join(LAYER_TYPES)})")
    main, defaults = LAYER_TYPES[kind]
    spec: dict[str, Any] = {"type": kind}
    if main_value is not _MISSING and main_value is not None:
        if main is None:
            raise ParamsError(f"{where}: {kind} takes no argument, got {json.dumps(main_value)}")
        options = {main: main_value, **options}
    for key in options:
        if key not in defaults:
            raise ParamsError(f"{where}: {kind} has no option {key!r} (options: {', '.join(defaults) or 'none'})")
    for key, default in defaults.items():
        spec[key] = options.get(key, default)
    return spec


class _Missing:
    pass


_MISSING = _Missing()


def _int(where: str, kind: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamsError(f"{where}: {kind} {key} must be an integer >= {minimum}, got {json.dumps(value)}")
    return value


def normalize_layers(
    where: str, layers: list[Any], in_shape: tuple[int, int, int], num_classes: int
) -> list[LayerInfo]:
    """Check ``layers`` against an input of ``in_shape`` (C, H, W); infer shapes and parameter counts.

    ``where`` prefixes every error (``models.tiny``); the layer index follows it.
    """
    if not isinstance(layers, list) or not layers:
        raise ParamsError(f"{where}: a model needs a non-empty list of layers")
    shape: tuple[int, ...] = tuple(in_shape)
    infos: list[LayerInfo] = []
    last = len(layers) - 1
    for index, raw in enumerate(layers):
        at = f"{where}[{index}]"
        spec = _parse_one(at, raw)
        kind = spec["type"]
        params = 0
        spatial = len(shape) == 3
        if kind in ("conv", "residual", "maxpool", "avgpool", "global_avgpool") and not spatial:
            raise ParamsError(f"{at}: {kind} needs a CxHxW feature map but gets a flat vector of {shape[0]}; move it before 'flatten'")
        if kind == "conv":
            out = _int(at, kind, "out", spec["out"], 1)
            k = _int(at, kind, "kernel", spec["kernel"], 1)
            s = _int(at, kind, "stride", spec["stride"], 1)
            pad = spec["padding"]
            if pad == "same":
                if s != 1:
                    raise ParamsError(f"{at}: conv padding 'same' needs stride 1, got stride {s}")
                pad = (k - 1) // 2 if k % 2 else None
                if pad is None:
                    raise ParamsError(f"{at}: conv padding 'same' needs an odd kernel, got {k}")
                spec["padding"] = pad
            pad = _int(at, kind, "padding", pad, 0)
            c, h, w = shape
            if h + 2 * pad < k or w + 2 * pad < k:
                raise ParamsError(f"{at}: conv kernel {k} on a {_fmt_shape(shape)} feature map (padding {pad}); use a smaller kernel, more padding or fewer pools")
            shape = (out, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
            params = out * c * k * k + (out if spec["bias"] else 0)
        elif kind == "residual":
            out = _int(at, kind, "out", spec["out"], 1)
            s = _int(at, kind, "stride", spec["stride"], 1)
            c, h, w = shape
            shape = (out, (h - 1) // s + 1, (w - 1) // s + 1)
            params = out * c * 9 + 2 * out + out * out * 9 + 2 * out
            if s != 1 or c != out:
                params += out * c + 2 * out
        elif kind in ("maxpool", "avgpool"):
            k = _int(at, kind, "kernel", spec["kernel"], 1)
            s = _int(at, kind, "stride", spec["stride"] if spec["stride"] is not None else k, 1)
            pad = _int(at, kind, "padding", spec["padding"], 0)
            spec["stride"] = s
            if pad * 2 > k:
                raise ParamsError(f"{at}: {kind} padding {pad} is more than half its kernel {k}")
            c, h, w = shape
            if h + 2 * pad < k or w + 2 * pad < k:
                raise ParamsError(f"{at}: {kind} {k} on a {_fmt_shape(shape)} feature map; remove a pool or shrink the kernel")
            shape = (c, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
        elif kind == "global_avgpool":
            shape = (shape[0], 1, 1)
        elif kind == "batchnorm":
            params = 2 * shape[0]
        elif kind == "flatten":
            size = 1
            for dim in shape:
                size *= dim
            shape = (size,)
        elif kind == "dropout":
            p = spec["p"]
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ParamsError(f"{at}: dropout p must be in [0, 1), got {json.dumps(p)}")
        elif kind == "linear":
            if spatial:
                raise ParamsError(f"{at}: linear on a {_fmt_shape(shape)} feature map; add 'flatten' before it")
            if spec["out"] is None:
                if index != last:
                    raise ParamsError(f"{at}: only the last linear layer may omit its width; give it one, e.g. {{linear: 128}}")
                spec["out"] = num_classes
            out = _int(at, kind, "out", spec["out"], 1)
            params = out * shape[0] + (out if spec["bias"] else 0)
            shape = (out,)
        infos.append(LayerInfo(index=index, spec=spec, out_shape=shape, params=params))

    final = infos[-1]
    if final.spec["type"] != "linear":
        raise ParamsError(f"{where}[{last}]: the last layer must be linear (it gives the class scores), got {final.spec['type']}")
    if final.out_shape != (num_classes,):
        raise ParamsError(
            f"{where}[{last}]: the last layer gives {final.out_shape[0]} outputs but the dataset has {num_classes} classes; "
            "write plain 'linear' to match them"
        )
    return infos


def check_layers(where: str, layers: list[Any], in_shape: tuple[int, int, int], num_classes: int) -> None:
    """Raise ``ParamsError`` (one line, naming the layer index) if the spec cannot be built."""
    normalize_layers(where, layers, in_shape, num_classes)


def summary_rows(infos: list[LayerInfo], in_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = [{"index": "", "layer": "input", "output_shape": _fmt_shape(tuple(in_shape)), "params": 0}]
    for info in infos:
        rows.append({"index": info.index, "layer": info.label, "output_shape": _fmt_shape(info.out_shape), "params": info.params})
    return rows


def summary_text(name: str, infos: list[LayerInfo], in_shape: tuple[int, ...]) -> str:
    """A fixed-width table: layer, output shape, parameter count, and the total."""
    rows = summary_rows(infos, in_shape)
    width = max(len(str(r["layer"])) for r in rows) + 2
    lines = [f"model {name}", f"{'#':>3}  {'layer':<{width}}{'output':<14}{'params':>10}"]
    for row in rows:
        lines.append(f"{row['index']!s:>3}  {row['layer']:<{width}}{row['output_shape']:<14}{row['params']:>10,}")
    total = sum(info.params for info in infos)
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines)


def model_summary(name: str, layers: Any, in_shape: Any, num_classes: int) -> str:
    """The layer table of ``layers`` on ``in_shape`` inputs (what ``summary.txt`` and MLflow show).

    cnnpipe layer lists only: ``build.model_summary`` also takes torchvision specs.
    """
    shape = tuple(int(x) for x in in_shape)
    infos = normalize_layers(f"model {name}", list(layers), shape, num_classes)
    return summary_text(name, infos, shape)
