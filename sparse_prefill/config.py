"""Per-head sparse attention config: schema, validation, JSON load/save.

A config names the model it was made for (type and shape), the prompt length below which prefill stays dense, and
one pattern per (layer, head)::

    {
      "format": "sparse_prefill/1",
      "model": {"name": "SmolLM2-135M-Instruct", "hub_ids": ["HuggingFaceTB/SmolLM2-135M-Instruct"],
                "model_type": "llama", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64},
      "min_seq_len": "auto",
      "defaults": {"vertical_slash": {"vertical": 1000, "slash": 6096}},
      "layers": [[{"pattern": "vertical_slash", "slash": 2048}, {"pattern": "dense"}, ...], ...],
      "provenance": {"tool": "sparse_prefill.calibrate", ...}
    }

``model.hub_ids`` (optional) lists the Hugging Face ids the config was made for: ``patch_model`` picks a shipped
config by them (:func:`sparse_prefill.patch.pick_shipped_config`).

A head entry gives a pattern and any of its parameters; missing ones come from ``defaults``, then from
``PATTERN_DEFAULTS`` (each pattern's module in :mod:`sparse_prefill.plan` defines its parameters). Budgets (token or
block counts) are positive integers, or fractions in (0, 1) of the key length of the call (of its key blocks for
``max_blocks``), so one config can serve several prompt lengths. ``adaptive``
heads also take thresholds, numbers in the unit interval (``UNIT``): ``gamma`` and ``dense_above`` in (0, 1],
``tau`` in [0, 1].

Every key is checked: an unknown key at any level (top level, ``model``, ``defaults``, a head) is an error, except
inside ``provenance``, which is free-form. Integers are at most ``MAX_INT`` (2**31 - 1), so every count fits the
kernels' int32 indices.

``min_seq_len``: prefills with fewer keys run dense. ``"auto"`` (the default) is the crossover measured for the call's
device class and head_dim (:mod:`sparse_prefill.devices`; a conservative fallback where nothing was measured); an
integer fixes it (0: always sparse). ``patch_model(min_seq_len=...)`` overrides the config's value.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .devices import AUTO
from .plan.registry import PATTERNS

FORMAT = "sparse_prefill/1"
DEFAULT_MIN_SEQ_LEN = AUTO  # the measured crossover of the call's device and head_dim: sparse_prefill.devices

# Each pattern's schema lives in its module (sparse_prefill.plan.<pattern>); these tables gather them.
PATTERN_DEFAULTS: dict[str, dict[str, int | float | str]] = {n: dict(p.defaults) for n, p in PATTERNS.items()}
BUDGETS = set().union(*(p.budgets for p in PATTERNS.values()))  # positive integers, or fractions of the length
CHOICES = {name: options for p in PATTERNS.values() for name, options in p.choices.items()}
# Numbers in a closed or half-open unit interval: name -> (lowest allowed value is included, text for errors).
UNIT = {name: rule for p in PATTERNS.values() for name, rule in p.unit.items()}
SHAPE = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")  # what a config must match
MAX_INT = 2**31 - 1  # the largest integer a config may hold: counts become int32 indices in the kernels
TOP_KEYS = ("format", "model", "min_seq_len", "defaults", "layers", "provenance")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the rule."""


@dataclass(frozen=True)
class ModelInfo:
    """A model's type and attention shape; ``hub_ids``: the Hugging Face ids a config was made for (none for a live
    model's info; aliases, so equality ignores them)."""

    name: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hub_ids: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The config's ``model`` object (``hub_ids`` only when there are some)."""
        raw = vars(self)
        return {k: list(v) if k == "hub_ids" else v for k, v in raw.items() if k != "hub_ids" or v}


@dataclass(frozen=True)
class HeadSpec:
    """One head's pattern with all parameters filled in."""

    pattern: str
    params: dict[str, int | float | str] = field(default_factory=dict)

    def budget(self, name: str, kv_len: int) -> int:
        """A budget resolved for a key length: fractions scale with it, and nothing exceeds it."""
        value = self.params[name]
        count = math.ceil(value * kv_len) if isinstance(value, float) else value
        return max(1, min(int(count), kv_len))

    def to_dict(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The head's JSON entry; with ``defaults`` (its pattern's entry in a config's ``defaults``), only the
        parameters that differ from them."""
        differ = {k: v for k, v in self.params.items() if not defaults or k not in defaults or defaults[k] != v}
        return {"pattern": self.pattern, **differ}


@dataclass
class SparseConfig:
    """A validated config. ``layers[l][h]`` is the spec of query head h in layer l."""

    model: ModelInfo
    layers: list[list[HeadSpec]]
    min_seq_len: int | str = DEFAULT_MIN_SEQ_LEN  # an integer >= 0, or "auto"
    defaults: dict[str, dict[str, int | float]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(
        cls, model: ModelInfo, pattern: str = "vertical_slash", min_seq_len: int | str = DEFAULT_MIN_SEQ_LEN, **params
    ) -> SparseConfig:
        """The same pattern on every head, e.g. ``SparseConfig.uniform(info, "a_shape", local=1024)``."""
        head = {"pattern": pattern, **params}
        return cls.from_dict(
            {
                "format": FORMAT,
                "model": model.to_dict(),
                "min_seq_len": min_seq_len,
                "layers": [[head] * model.num_heads for _ in range(model.num_layers)],
                "provenance": {"tool": "SparseConfig.uniform"},
            }
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SparseConfig:
        """Validate a parsed JSON config. Raises ConfigError naming the first bad field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config: must be a JSON object, got {type(raw).__name__}")
        _check_keys(raw, TOP_KEYS, "")
        if raw.get("format") != FORMAT:
            raise ConfigError(f"format: must be {FORMAT!r}, got {raw.get('format')!r}")
        model = _model_info(raw.get("model"))
        min_seq_len = check_min_seq_len(raw.get("min_seq_len", DEFAULT_MIN_SEQ_LEN), "min_seq_len")
        defaults = raw.get("defaults", {})
        if not isinstance(defaults, dict):
            raise ConfigError("defaults: must be an object mapping pattern names to parameters")
        for pattern, params in defaults.items():
            _check_params(pattern, params, f"defaults.{pattern}")
        layers = raw.get("layers")
        if not isinstance(layers, list) or len(layers) != model.num_layers:
            got = len(layers) if isinstance(layers, list) else type(layers).__name__
            raise ConfigError(f"layers: must be a list of model.num_layers={model.num_layers} layers, got {got}")
        specs = []
        for li, heads in enumerate(layers):
            if not isinstance(heads, list) or len(heads) != model.num_heads:
                got = len(heads) if isinstance(heads, list) else type(heads).__name__
                raise ConfigError(f"layers[{li}]: must list model.num_heads={model.num_heads} heads, got {got}")
            specs.append([_head_spec(entry, defaults, f"layers[{li}][{hi}]") for hi, entry in enumerate(heads)])
        provenance = raw.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ConfigError("provenance: must be an object")
        return cls(model, specs, min_seq_len, defaults, provenance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model.to_dict(),
            "min_seq_len": self.min_seq_len,
            "defaults": self.defaults,
            "layers": [[spec.to_dict(self.defaults.get(spec.pattern)) for spec in heads] for heads in self.layers],
            "provenance": self.provenance,
        }

    def check_model(self, model: ModelInfo) -> None:
        """Raise ConfigError unless this config's shape matches the model's."""
        for name in SHAPE:
            want, got = getattr(self.model, name), getattr(model, name)
            if want != got:
                raise ConfigError(f"model.{name}: config was made for {want!r}, the model has {got!r}")


def load_config(path: str | Path) -> SparseConfig:
    """Read and validate a JSON config. Raises ConfigError naming the path if the file cannot be read or is not
    UTF-8 JSON, else naming the first bad field."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    try:
        raw = json.loads(text)
    except RecursionError as e:
        raise ConfigError(f"{path}: not a config (JSON nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, or an integer literal too long to convert
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return SparseConfig.from_dict(raw)


def save_config(config: SparseConfig, path: str | Path) -> None:
    """Write a config as JSON, one layer per line so diffs stay readable.

    The text goes to a temporary file in the same folder, then replaces ``path`` in one step (``os.replace``): a
    failed or interrupted write leaves the previous file, never half a config.
    """
    raw = config.to_dict()
    layers = raw.pop("layers")
    # Arrays of numbers (per-head recall and density in provenance) on one line each.
    body = re.sub(r"\[[-0-9.eE,\s]*\]", lambda m: " ".join(m.group(0).split()), json.dumps(raw, indent=2))[:-2]
    rows = ",\n".join("    " + json.dumps(heads) for heads in layers)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Mode 0o666 less the umask, as a plain write would give (mkstemp's files are private to the user).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f'{body},\n  "layers": [\n{rows}\n  ]\n}}\n')
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: no temporary file is left behind
        os.unlink(tmp)
        raise


def check_min_seq_len(value: Any, where: str) -> int | str:
    """``value`` if it is ``"auto"`` or an integer >= 0, else ConfigError naming ``where``."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f'{where}: must be "auto" or an integer >= 0, got {value!r}')
    _check_at_most(value, where)
    return value


def _model_info(raw: Any) -> ModelInfo:
    if not isinstance(raw, dict):
        raise ConfigError("model: must be an object with name, model_type, num_layers, num_heads, ...")
    _check_keys(raw, tuple(ModelInfo.__dataclass_fields__), "model.")
    for name in ("name", "model_type"):
        if not isinstance(raw.get(name), str):
            raise ConfigError(f"model.{name}: must be a string")
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        _check_int(raw.get(name), f"model.{name}", minimum=1)
    if raw["num_heads"] % raw["num_kv_heads"]:
        raise ConfigError("model.num_heads: must be a multiple of model.num_kv_heads")
    hub_ids = raw.get("hub_ids", [])
    if not isinstance(hub_ids, (list, tuple)) or not all(isinstance(i, str) and i for i in hub_ids):
        raise ConfigError(f"model.hub_ids: must be a list of Hugging Face model ids (strings), got {hub_ids!r}")
    fields = [k for k in ModelInfo.__dataclass_fields__ if k != "hub_ids"]
    return ModelInfo(**{k: raw[k] for k in fields}, hub_ids=tuple(hub_ids))


def _head_spec(entry: Any, defaults: dict, where: str) -> HeadSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object with a 'pattern'")
    pattern = entry.get("pattern")
    if pattern not in PATTERN_DEFAULTS:
        raise ConfigError(f"{where}.pattern: unknown pattern {pattern!r}; expected one of {sorted(PATTERN_DEFAULTS)}")
    params = {k: v for k, v in entry.items() if k != "pattern"}
    _check_params(pattern, params, where)
    full = {**PATTERN_DEFAULTS[pattern], **defaults.get(pattern, {}), **params}
    full = {k: float(v) if k in UNIT else v for k, v in full.items()}  # JSON's 1 is the float 1.0 here
    if broken := PATTERNS[pattern].check(full):
        raise ConfigError(f"{where}.{broken}")
    return HeadSpec(pattern, full)


def _check_params(pattern: str, params: Any, where: str) -> None:
    if pattern not in PATTERN_DEFAULTS:
        raise ConfigError(f"{where}: unknown pattern {pattern!r}; expected one of {sorted(PATTERN_DEFAULTS)}")
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: must be an object of parameters")
    for name, value in params.items():
        if name not in PATTERN_DEFAULTS[pattern]:
            known = ", ".join(PATTERN_DEFAULTS[pattern]) or "none"
            raise ConfigError(f"{where}.{name}: unknown parameter for {pattern} (known: {known})")
        if name in CHOICES:
            if value not in CHOICES[name]:
                raise ConfigError(f"{where}.{name}: must be one of {CHOICES[name]}, got {value!r}")
        elif name in UNIT:
            check_unit(value, f"{where}.{name}", name)
        elif name in BUDGETS:
            if isinstance(value, float) and 0.0 < value < 1.0:
                continue
            _check_int(value, f"{where}.{name}", minimum=1, fraction_ok=True)
        else:
            _check_int(value, f"{where}.{name}", minimum=1 if name == "last_q" else 0)


def check_unit(value: Any, where: str, name: str) -> float:
    """A number in ``UNIT[name]``'s interval as a float, else ConfigError naming ``where``."""
    zero_ok, text = UNIT[name]
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not (0.0 <= value <= 1.0) or (value == 0 and not zero_ok):
        raise ConfigError(f"{where}: must be a number in {text}, got {value!r}")
    return float(value)


def _check_int(value: Any, where: str, minimum: int, fraction_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if fraction_ok:
            kind += " or a fraction in (0, 1)"
        raise ConfigError(f"{where}: must be {kind}, got {value!r}")
    _check_at_most(value, where)


def _check_at_most(value: int, where: str) -> None:
    if value > MAX_INT:  # the value itself is not shown: it may have more digits than str() converts
        raise ConfigError(f"{where}: must be at most {MAX_INT} (2**31 - 1), got a {value.bit_length()}-bit integer")


def _check_keys(raw: dict, known: tuple[str, ...], prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(known)})")
