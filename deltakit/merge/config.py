"""Merge configurations: mergekit-shaped YAML plus the roles and module selection a multimodal merge needs.

```yaml
merge_method: linear            # any name in METHODS: linear, ties, slerp, della, model_stock, ... (docs/merge.md)
mllm: models/Qwen2.5-VL-7B-Instruct   # optional: the model whose layout, vision tower and files the output keeps
models:
  - model: models/Qwen2.5-VL-7B-Instruct
    parameters: {weight: 0.9}
  - model: models/DeepSeek-R1-Distill-Qwen-7B
    parameters: {weight: 0.1}
base_model: models/Qwen2.5-7B   # required by task_arithmetic, ties, dare_*, slerp, ... (METHODS[...].base)
parameters: {normalize: true}   # shared parameters, and defaults for per-model ones
dtype: float32                  # compute dtype (float32, float64; bfloat16/float16 as in mergekit, lossy)
out_dtype: bfloat16             # dtype of the written tensors (default: the MLLM's own)
modules: [attn, mlp, norm]      # text-tower modules to merge (the default); the rest is copied from the MLLM
layers: "0:28"                  # merge only these layers (the grammar of --layers: "0:8,20:", "5")
skip_first: 0                   # and not the first N layers
include: []                     # canonical-name globs a merged tensor must match (any), e.g. "layers.*.mlp.*"
exclude: []                     # canonical-name globs never merged, e.g. "layers.*.self_attn.*.bias"
seed: 0                         # the random drops of dare_* and della*
```

A parameter value is a number, a list of numbers (a gradient interpolated across the layers, as in
mergekit), or a list of ``{filter: substring, value: ...}`` entries (the first whose filter occurs in
the tensor's canonical or on-disk name wins; an entry without filter matches everything).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deltakit.engine.selection import DEFAULT_MODULES as SELECTION_DEFAULTS
from deltakit.engine.selection import Selection, SelectionError
from deltakit.errors import DeltakitError

if TYPE_CHECKING:
    import torch



class MergeConfigError(DeltakitError):
    """A merge configuration that cannot be run as written."""


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: everything the planner, the streaming driver and the validation need to know about it.

    - ``base``: ``"required"``, ``"optional"`` (used when ``base_model`` is given) or ``"ignored"``.
    - ``models``: how many non-base models it takes, ``(min, max)`` (``max`` None: any number).
    - ``model_params`` / ``shared_params``: per-model and shared parameters with their defaults (None: required).
    - ``kernel``: the name of its :class:`deltakit.merge.methods.Kernel` class, built with ``options``; the
      kernel says per tensor whether it needs whole-tensor statistic scans before its rows (``scanning``).
    - ``streaming``: what the engine does for it, in words (row blocks, or which whole-tensor statistic first).
    - ``rng``: it draws seeded random masks, so its row blocks are the fixed blocks of
      :func:`deltakit.merge.methods.dare_block_rows`, one generator per block seeded from ``seed``, model and tensor.
    - ``interpolates``: its weights are shares of one tensor (a warning when they do not sum to 1).
    """

    name: str
    base: str
    model_params: dict[str, Any]
    shared_params: dict[str, Any]
    kernel_name: str
    options: dict[str, Any] = field(default_factory=dict)
    models: tuple[int, int | None] = (1, None)
    streaming: str = "row blocks"
    rng: bool = False
    interpolates: bool = False

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def kernel(self) -> Callable[..., Any]:
        """The kernel factory ``(params, shape, models, seeds) -> Kernel`` (imports torch)."""
        from deltakit.merge import methods

        return functools.partial(getattr(methods, self.kernel_name), **self.options)


_GTA = {"lambda": 1.0, "int8_mask": False}
_TOPK = "a whole-tensor unit: exact k-th largest |delta| per model first (TopK: a sample, one counting scan)"
_L1 = "; with rescale, a scan for each delta's L1 norm before and after the drop"
METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("linear", "ignored", {"weight": None}, {"normalize": True}, "Linear", interpolates=True),
        MethodSpec("task_arithmetic", "required", {"weight": None}, {**_GTA, "normalize": False}, "TaskArithmetic"),
        MethodSpec("ties", "required", {"weight": None, "density": 1.0}, {**_GTA, "normalize": True, "rescale": False},
                   "TaskArithmetic", {"sparsify": "magnitude", "consensus": True}, streaming=_TOPK + _L1),
        MethodSpec("dare_linear", "required", {"weight": None, "density": 1.0}, {**_GTA, "normalize": False, "rescale": True},
                   "TaskArithmetic", {"sparsify": "random"}, rng=True,
                   streaming="seeded random blocks" + _L1 + " (a whole-tensor unit)"),
        MethodSpec("dare_ties", "required", {"weight": None, "density": 1.0}, {**_GTA, "normalize": False, "rescale": True},
                   "TaskArithmetic", {"sparsify": "random", "consensus": True}, rng=True,
                   streaming="seeded random blocks" + _L1 + " (a whole-tensor unit)"),
        MethodSpec("breadcrumbs", "required", {"weight": None, "density": 1.0, "gamma": 0.01},
                   {**_GTA, "normalize": False, "rescale": False}, "TaskArithmetic", {"sparsify": "outliers"},
                   streaming="a whole-tensor unit: two exact top-k thresholds of |delta| per model (TopK)" + _L1),
        MethodSpec("breadcrumbs_ties", "required", {"weight": None, "density": 1.0, "gamma": 0.01},
                   {**_GTA, "normalize": False, "rescale": False}, "TaskArithmetic", {"sparsify": "outliers", "consensus": True},
                   streaming="a whole-tensor unit: two exact top-k thresholds of |delta| per model (TopK)" + _L1),
        MethodSpec("della", "required", {"weight": None, "density": 1.0, "epsilon": 0.15},
                   {**_GTA, "normalize": True, "rescale": True}, "TaskArithmetic", {"sparsify": "della", "consensus": True},
                   rng=True, streaming="seeded random blocks of whole rows (per-row magnitude ranks)" + _L1),
        MethodSpec("della_linear", "required", {"weight": None, "density": 1.0, "epsilon": 0.15},
                   {**_GTA, "normalize": False, "rescale": True}, "TaskArithmetic", {"sparsify": "della"},
                   rng=True, streaming="seeded random blocks of whole rows (per-row magnitude ranks)" + _L1),
        MethodSpec("layer_swap", "ignored", {"weight": None}, {"keep_layers": 5, "normalize": True}, "Linear", interpolates=True),
        MethodSpec("slerp", "required", {}, {"t": None}, "Slerp", models=(1, 1),
                   streaming="a whole-tensor unit: |a|^2, |b|^2, <a, b> first, then row blocks"),
        MethodSpec("nuslerp", "optional", {"weight": None}, {"nuslerp_row_wise": False, "nuslerp_flatten": True}, "NuSlerp",
                   models=(2, 2), streaming="flatten: a whole-tensor unit (<v0, v1>, |v0|, |v1| first); row_wise: per-column "
                   "statistics first; otherwise independent row blocks"),
        MethodSpec("multislerp", "optional", {"weight": None}, {"normalize_weights": True, "eps": 1e-8}, "MultiSlerp",
                   streaming="a whole-tensor unit: the Gram matrix of the (delta) tensors first, then row blocks"),
        MethodSpec("karcher", "ignored", {}, {"max_iter": 10, "tol": 1e-5}, "Karcher",
                   streaming="a whole-tensor unit: the inputs' Gram matrix first (the iteration runs on it), then row blocks"),
        MethodSpec("model_stock", "required", {}, {"filter_wise": False}, "ModelStock", models=(2, None),
                   streaming="a whole-tensor unit: the deltas' Gram matrix (pairwise angles) first; filter_wise: row blocks"),
        MethodSpec("nearswap", "required", {}, {"t": None}, "NearSwap", models=(1, 1)),
        MethodSpec("sce", "required", {}, {"select_topk": 1.0, "int8_mask": False}, "Sce",
                   streaming="a whole-tensor unit: exact top-k of the deltas' variance (TopK), then each delta's "
                   "mean square, then row blocks"),
    )
}
DEFAULT_MODULES = SELECTION_DEFAULTS["merge"]


class _TorchDtypes(Mapping[str, "torch.dtype"]):
    """dtype names mapped to torch dtypes: the names are known without torch, which is imported on the first lookup."""

    def __init__(self, *names: str) -> None:
        self._names = names

    def __getitem__(self, name: str) -> torch.dtype:
        if name not in self._names:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


COMPUTE_DTYPES: Mapping[str, torch.dtype] = _TorchDtypes("float32", "float64", "bfloat16", "float16")
OUT_DTYPES: Mapping[str, torch.dtype] = _TorchDtypes("float32", "bfloat16", "float16")
_BOOL_PARAMS = ("normalize", "rescale", "int8_mask", "normalize_weights", "nuslerp_row_wise", "nuslerp_flatten", "filter_wise")
_INT_PARAMS = ("keep_layers", "max_iter")
_SELECTION_KEYS = ("modules", "layers", "skip_first", "include", "exclude")
_TOP_KEYS = ("merge_method", "mllm", "models", "base_model", "parameters", "dtype", "out_dtype", *_SELECTION_KEYS, "seed")


@dataclass
class ModelEntry:
    """One input model: its path, its own parameters and (optionally) its family when detection fails."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    family: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        if self.family:
            out["family"] = self.family
        return out


@dataclass
class MergeConfig:
    """A validated merge recipe (build with :meth:`from_yaml`, :meth:`from_dict` or :meth:`simple`)."""

    merge_method: str
    models: list[ModelEntry]
    base_model: ModelEntry | None = None
    mllm: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    modules: tuple[str, ...] = DEFAULT_MODULES
    layers: str | None = None
    skip_first: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for key, allowed in (("modules", (str, list, tuple)), ("layers", (str, list, tuple, type(None))),
                             ("include", (str, list, tuple, type(None))), ("exclude", (str, list, tuple, type(None)))):
            if not isinstance(getattr(self, key), allowed):
                raise MergeConfigError(f"{key}: expected a comma-separated string or a list, got {_short(getattr(self, key))}")
        try:
            self.selection = Selection.parse(self.modules, self.layers, self.skip_first, self.include, self.exclude)
        except SelectionError as exc:
            raise MergeConfigError(str(exc)) from None
        self.modules, self.layers = self.selection.modules, self.selection.layers_text
        self.include, self.exclude = self.selection.include, self.selection.exclude
        self.validate()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeConfig":
        """Read a YAML recipe; any problem is a :class:`MergeConfigError` naming the file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise MergeConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise MergeConfigError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
        except yaml.YAMLError as exc:
            raise MergeConfigError(f"{path}: invalid YAML ({_first_line(exc)})") from None
        except RecursionError:
            raise MergeConfigError(f"{path}: invalid YAML (nested too deeply)") from None
        except ValueError as exc:  # a scalar that resolves to a type but cannot be built: 2001-13-45, 5000 digits
            why = "an integer of more than 4300 digits" if "integer string conversion" in str(exc) else _first_line(exc)
            raise MergeConfigError(f"{path}: invalid YAML value ({why})") from None
        try:
            return cls.from_dict(data)
        except MergeConfigError as exc:
            raise MergeConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> "MergeConfig":
        """Build from a parsed mergekit-shaped mapping (see the module docstring)."""
        if not isinstance(data, dict):
            raise MergeConfigError("a merge config must be a mapping")
        unknown = sorted((k for k in data if k not in _TOP_KEYS), key=str)
        if "layer_range" in unknown:
            raise MergeConfigError("layer_range: [start, end] is now layers: \"START:END\" (the grammar of --layers, e.g. \"0:8,20:\")")
        if unknown:
            raise MergeConfigError(f"unknown key {unknown[0]!r} (known: {', '.join(_TOP_KEYS)})")
        if "merge_method" not in data:
            raise MergeConfigError("no merge_method given")
        models = data.get("models")
        if not isinstance(models, list) or not models:
            raise MergeConfigError("models: must be a non-empty list")
        base = data.get("base_model")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise MergeConfigError(f"parameters: must be a mapping of parameter names to values, got {_short(parameters)}")
        return cls(
            merge_method=str(data["merge_method"]),
            models=[_model_entry(m) for m in models],
            base_model=_model_entry(base) if base is not None else None,
            mllm=data.get("mllm"),
            parameters=dict(parameters),
            dtype=str(data.get("dtype", "float32")),
            out_dtype=data.get("out_dtype"),
            modules=data.get("modules", DEFAULT_MODULES),
            layers=data.get("layers"),
            skip_first=data.get("skip_first", 0),
            include=data.get("include", ()),
            exclude=data.get("exclude", ()),
            seed=data.get("seed", 0),
        )

    @classmethod
    def simple(cls, mllm: str, llm: str, method: str = "linear", alpha: float = 0.9, base: str | None = None,
               density: float | None = None, lambda_: float | None = None, keep_layers: int | None = None,
               modules: str | tuple[str, ...] = DEFAULT_MODULES, layers: str | None = None, skip_first: int = 0,
               include: str | tuple[str, ...] = (), exclude: str | tuple[str, ...] = (),
               out_dtype: str | None = None, seed: int = 0, t: float | None = None) -> "MergeConfig":
        """The two-model case: the MLLM weighted ``alpha``, the LLM ``1 - alpha`` (BR2V linear with 0.9 by default).

        For a method without weights that interpolates from a base (``slerp``, ``nearswap``) the MLLM is the
        base unless ``base`` is given; ``slerp``'s ``t`` (the LLM's share) defaults to ``1 - alpha``.
        """
        spec = METHODS.get(method)
        shared: dict[str, Any] = {}
        for name, value in (("density", density), ("lambda", lambda_), ("keep_layers", keep_layers), ("t", t)):
            if value is not None:
                shared[name] = value
        weighted = spec is None or "weight" in spec.model_params
        if spec is not None and spec.needs_base and spec.models == (1, 1) and base is None:
            base = mllm
        if method == "slerp" and t is None:
            shared["t"] = round(1.0 - alpha, 12)
        models = [ModelEntry(mllm, {"weight": alpha}), ModelEntry(llm, {"weight": round(1.0 - alpha, 12)})] if weighted \
            else [ModelEntry(mllm), ModelEntry(llm)]
        return cls(
            merge_method=method,
            models=models,
            base_model=ModelEntry(base) if base else None,
            mllm=mllm,
            parameters=shared,
            out_dtype=out_dtype,
            modules=modules,
            layers=layers,
            skip_first=skip_first,
            include=include,
            exclude=exclude,
            seed=seed,
        )

    # -- validation -----------------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.merge_method]

    @property
    def uses_base(self) -> bool:
        """Whether the method reads ``base_model`` (required, or optional and given)."""
        return self.spec.needs_base or (self.spec.base == "optional" and self.base_model is not None)

    @property
    def non_base(self) -> list[ModelEntry]:
        """The models that contribute deltas or weights (the base is skipped if also listed, as in mergekit)."""
        if self.base_model is None or not self.uses_base:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model.model]

    def validate(self) -> None:
        """Raise :class:`MergeConfigError` for anything that cannot run; log warnings for suspicious values."""
        if self.merge_method not in METHODS:
            raise MergeConfigError(f"unknown merge_method {self.merge_method!r}; known: {', '.join(METHODS)}")
        spec = self.spec
        if spec.needs_base and self.base_model is None:
            raise MergeConfigError(f"merge_method {spec.name} needs a base_model (the common ancestor the deltas are taken from)")
        if self.dtype not in COMPUTE_DTYPES:
            raise MergeConfigError(f"dtype {self.dtype!r} not supported for computing; use one of {', '.join(COMPUTE_DTYPES)}")
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise MergeConfigError(f"out_dtype {self.out_dtype!r} not supported; use one of {', '.join(OUT_DTYPES)}")
        if not isinstance(self.seed, int):
            raise MergeConfigError(f"seed must be an integer, got {self.seed!r}")
        if not self.non_base:
            raise MergeConfigError("no model to merge besides the base_model")
        low, high = spec.models
        n = len(self.non_base)
        if n < low or (high is not None and n > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            besides = " besides the base_model" if self.uses_base else ""
            raise MergeConfigError(f"merge_method {spec.name} takes {want} model(s){besides}, got {n}")
        paths = [m.model for m in self.models] + ([self.base_model.model] if self.uses_base else [])
        if self.mllm is not None and self.mllm not in paths:
            raise MergeConfigError(f"mllm {self.mllm!r} is not one of the models (or the base_model)")
        if spec.name == "layer_swap" and self.mllm is None and len(self.models) < 2:
            raise MergeConfigError("layer_swap needs the MLLM and at least one other model")
        allowed = set(spec.shared_params) | set(spec.model_params)
        for name, setting in self.parameters.items():
            if name not in allowed:
                raise MergeConfigError(f"unknown parameter {name!r} for {spec.name}; known: {', '.join(sorted(allowed))}")
            check_setting(name, setting)
        for m in self.models:
            for name, setting in m.parameters.items():
                if name not in spec.model_params:
                    known = ", ".join(spec.model_params)
                    raise MergeConfigError(f"unknown per-model parameter {name!r} for {spec.name} on {m.model!r}; known: {known}")
                check_setting(name, setting)
        for name, default in spec.shared_params.items():
            if default is None and name not in self.parameters:
                raise MergeConfigError(f"merge_method {spec.name} needs the parameter {name!r} (under parameters:)")
        for m in self.non_base:
            for name, default in spec.model_params.items():
                if default is None and name not in m.parameters and name not in self.parameters:
                    raise MergeConfigError(f"model {m.model!r} has no {name!r} (set it under its parameters: or the shared parameters:)")

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain mapping, in the YAML shape (what :meth:`from_dict` reads)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.mllm:
            out["mllm"] = self.mllm
        out["models"] = [m.to_dict() for m in self.models]
        if self.base_model is not None:
            out["base_model"] = self.base_model.to_dict() if self.base_model.family else self.base_model.model
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        out["dtype"] = self.dtype
        if self.out_dtype:
            out["out_dtype"] = self.out_dtype
        out["modules"] = list(self.modules)
        if self.layers is not None:
            out["layers"] = self.layers
        if self.skip_first:
            out["skip_first"] = self.skip_first
        for key in ("include", "exclude"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_MAX_FLOAT = sys.float_info.max


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _short(v: Any) -> str:
    """A config value for an error message: its repr, cut to one short line."""
    try:
        text = repr(v)
    except ValueError:  # an int past Python's 4300-digit conversion limit
        return "a number of more than 4300 digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _model_entry(item: Any) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(item)
    if isinstance(item, dict) and "model" in item:
        extra = sorted((k for k in item if k not in ("model", "parameters", "family")), key=str)
        if extra:
            raise MergeConfigError(f"unknown key {extra[0]!r} in model entry {item['model']!r} (known: model, parameters, family)")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeConfigError(f"parameters of {item['model']!r} must be a mapping")
        if item.get("family") is not None and not isinstance(item["family"], str):
            raise MergeConfigError(f"family of {item['model']!r} must be a family name, got {_short(item['family'])}")
        return ModelEntry(str(item["model"]), dict(params), item.get("family"))
    raise MergeConfigError(f"a model entry must be a path or a mapping with 'model:', got {item!r}")


def _scalars(name: str, setting: Any) -> list[Any]:
    """Every scalar in a parameter setting, checking its shape (scalar, gradient list, or filter list)."""
    if isinstance(setting, (bool, int, float)):
        return [setting]
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(v, (bool, int, float)) for v in setting):
            return list(setting)
        if all(isinstance(v, dict) for v in setting):
            out = []
            for entry in setting:
                extra = set(entry) - {"filter", "value"}
                if "value" not in entry or extra:
                    raise MergeConfigError(f"parameter {name!r}: a filter entry needs 'value' (and optionally 'filter'), got {entry!r}")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise MergeConfigError(f"parameter {name!r}: a filter must be a name substring, got {entry['filter']!r}")
                out += _scalars(name, entry["value"])
            return out
    raise MergeConfigError(f"parameter {name!r}: expected a number, a list of numbers, or a list of {{filter, value}}, got {setting!r}")


def check_setting(name: str, setting: Any) -> None:
    """Validate the types and ranges of one parameter setting."""
    for v in _scalars(name, setting):
        if name in _BOOL_PARAMS:
            if not isinstance(v, bool):
                raise MergeConfigError(f"parameter {name!r} must be true or false, got {v!r}")
        elif isinstance(v, bool):
            raise MergeConfigError(f"parameter {name!r} must be a number, got {v!r}")
        elif isinstance(v, int) and not -_MAX_FLOAT <= v <= _MAX_FLOAT:
            raise MergeConfigError(f"parameter {name!r}: {_short(v)} is too large for a float")
        elif isinstance(v, float) and not math.isfinite(v):
            raise MergeConfigError(f"parameter {name!r} must be a finite number, got {v!r}")
        elif name in ("density", "select_topk") and not 0 < v <= 1:
            raise MergeConfigError(f"{name} must be in (0, 1], got {v!r}")
        elif name in ("gamma", "epsilon") and not 0 <= v < 1:
            raise MergeConfigError(f"{name} must be in [0, 1), got {v!r}")
        elif name in ("tol", "eps") and not v > 0:
            raise MergeConfigError(f"{name} must be positive, got {v!r}")
        elif name in _INT_PARAMS and (not isinstance(v, int) or v < (1 if name == "max_iter" else 0)):
            raise MergeConfigError(f"{name} must be a {'positive' if name == 'max_iter' else 'non-negative'} integer, got {v!r}")


def evaluate_setting(setting: Any, names: tuple[str, ...], t: float) -> Any:
    """The value of a setting for a tensor known by ``names`` at relative depth ``t`` in [0, 1] (mergekit semantics)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(isinstance(v, dict) for v in setting):
        for entry in setting:
            f = entry.get("filter")
            if f is None or f == "*" or any(f in n for n in names):
                return evaluate_setting(entry["value"], names, t)
        return None
    if any(isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
