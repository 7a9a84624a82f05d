"""A search's space: which config fields it varies and over what (``SPACES``, a ``--space`` file), checked against
the config before any trial trains (``search_space``), and trial 0's values (``default_values``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from mmfuse.config import ModelConfig, RunConfig, TrainConfig, resolve
from mmfuse.errors import MmfuseError
from mmfuse.models.towers import build_tower, requested_spec

log = logging.getLogger(__name__)

# A high bound that stands for the depth of the tuned towers (their repeated layers), known only from the towers.
LAYERS = "layers"
# Keys that mean something only with a tower of that modality in the model.
KEY_MODALITY = {
    "text_pooling": "text",
    "text_layer_mean": "text",
    "text_layers": "text",
    "max_length": "text",
    "vision_pooling": "image",
    "image_size": "image",
}
# Settings a search must not vary: the space is per --tune mode, the seed is what makes a trial reproducible, a trial
# is one run (no bag), and the rest change how a run computes or is kept, not what it learns.
NOT_SEARCHED = {
    "tune",
    "seed",
    "mixed_precision",
    "compile",
    "trust_remote_code",
    "modalities",
    "checkpoint_every",
    "keep_checkpoints",
    "bag",
    "bag_groups",
    "refit_full",
    "metric",  # the objective: trials scored by different metrics would not compare
}
SEARCHABLE = {
    f.name: section
    for section, cls in (("model", ModelConfig), ("train", TrainConfig))
    for f in fields(cls)
    if f.name not in NOT_SEARCHED
}
_MINILM_ONLY = {"text": ["minilm"]}  # the ranges below were chosen for MiniLM's 6 layers and its learned pooling
_HEAD_SPACE = {
    "lr": {"low": 3e-4, "high": 1e-2, "log": True},
    "epochs": {"low": 5, "high": 40},
    "dropout": {"low": 0.0, "high": 0.6},
    "input_dropout": {"low": 0.0, "high": 0.5},
    "hidden": [64, 128, 256, 512],
    "fusion": ["concat", "gated", "attention"],
    "weight_decay": {"low": 1e-4, "high": 1e-1, "log": True},
    "text_pooling": {"choices": ["attention", "mean"], "when": _MINILM_ONLY},
    "text_layer_mean": {"low": 1, "high": 3, "when": _MINILM_ONLY},
}
_TOWER_SPACE = {
    "lr": {"low": 1e-5, "high": 2e-4, "log": True},
    "head_lr": {"low": 3e-4, "high": 5e-3, "log": True},
    "epochs": {"low": 2, "high": 8},
    "dropout": {"low": 0.0, "high": 0.6},
    "weight_decay": {"low": 1e-4, "high": 1e-1, "log": True},
    "fusion": ["concat", "gated", "attention"],
    "tune_layers": {"low": 1, "high": LAYERS, "none": True},  # None: the whole tower
    "text_pooling": {"choices": ["attention", "mean"], "when": _MINILM_ONLY},
    "text_layer_mean": {"low": 1, "high": 3, "when": _MINILM_ONLY},
}
# The default search space per --tune mode. With --tune image or all the head's rate defaults to --lr (1e-4), so
# their head_lr range reaches down to it: trial 0 is then the default config.
SPACES = {
    "head": _HEAD_SPACE,
    "text": _TOWER_SPACE,
    "image": {**_TOWER_SPACE, "head_lr": {"low": 1e-4, "high": 5e-3, "log": True}},
    "all": {**_TOWER_SPACE, "head_lr": {"low": 1e-4, "high": 5e-3, "log": True}},
}
ENTRY_KEYS = {"low", "high", "log", "choices", "when", "none"}


@dataclass(frozen=True)
class Param:
    """One searched config field: a number range, or a list of choices."""

    key: str
    section: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def holds(self, value) -> bool:
        if self.choices is not None:
            return any(value == c and type(value) is type(c) for c in self.choices)
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def values(self) -> list:
        """What the space's checks try: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def load_space(path: str | Path) -> dict:
    """A ``--space`` YAML file: ``key: {low:, high:, log: true}`` or ``key: [choices]`` per config field."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MmfuseError(f"--space file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise MmfuseError(f"--space {path} is not a readable YAML file: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise MmfuseError(
            f"--space {path} must map config keys to a range or choices, e.g. lr: {{low: 0.0001, high: 0.01, log: "
            "true}} and fusion: [concat, gated]"
        )
    return raw


def _number(value, what: str):
    # YAML 1.1 reads 1e-3 as text; a space is written with such numbers, so take them as meant.
    if isinstance(value, str) and value != LAYERS:
        try:
            return float(value)
        except ValueError:
            pass
    if value != LAYERS and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise MmfuseError(f"{what} must be a number, got {value!r}")
    return value


def _field_kind(key: str) -> str:
    cls = ModelConfig if SEARCHABLE[key] == "model" else TrainConfig
    return next(str(f.type) for f in fields(cls) if f.name == key).split(" |")[0]


def parse_entry(key, value, source: str) -> tuple[Param, dict, bool]:
    """One entry of a space as a ``Param`` (its ``high`` may still be ``LAYERS``), its ``when`` conditions and
    whether None joins its choices."""
    if key not in SEARCHABLE:
        raise MmfuseError(
            f"{source}: {key!r} is not a setting a search can vary; the keys are: {', '.join(sorted(SEARCHABLE))}"
        )
    section, kind, what = SEARCHABLE[key], _field_kind(key), f"{source}: {key}"
    if isinstance(value, list):
        value = {"choices": value}
    if not isinstance(value, dict):
        raise MmfuseError(
            f"{what} must be a range, {{low: ..., high: ..., log: true}}, or a list of choices [a, b], got {value!r}"
        )
    unknown = set(value) - ENTRY_KEYS
    if unknown:
        raise MmfuseError(
            f"{what}: unknown entries {sorted(map(str, unknown))}; an entry may hold {sorted(ENTRY_KEYS)}"
        )
    when = value.get("when") or {}
    settings = {f.name for cls in (ModelConfig, TrainConfig) for f in fields(cls)}
    if not isinstance(when, dict) or not all(k in settings and isinstance(v, list) for k, v in when.items()):
        raise MmfuseError(f"{what}: when must map a setting to a list of values, e.g. when: {{text: [minilm]}}")
    none = value.get("none", False) is True
    if "choices" in value:
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise MmfuseError(f"{what}: choices must be a non-empty list, got {choices!r}")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise MmfuseError(f"{what}: each choice must be a number, a name, true/false or null, got {choices!r}")
        return Param(key, section, choices=tuple(dict.fromkeys(choices))), when, False
    if kind not in ("int", "float"):
        raise MmfuseError(f"{what} is a {kind} setting: give it a list of choices, e.g. {key}: [a, b]")
    if "low" not in value or "high" not in value:
        raise MmfuseError(f"{what}: a range needs low and high, e.g. {{low: 0.0001, high: 0.01, log: true}}")
    low, high = _number(value["low"], f"{what}: low"), _number(value["high"], f"{what}: high")
    log_ = value.get("log", False)
    if not isinstance(log_, bool):
        raise MmfuseError(f"{what}: log must be true or false, got {log_!r}")
    if kind == "int" and not all(v == LAYERS or float(v).is_integer() for v in (low, high)):
        raise MmfuseError(f"{what} is a whole number: low and high must be whole numbers, got {low} and {high}")
    if high != LAYERS and not low < high:
        raise MmfuseError(f"{what}: low ({low}) must be below high ({high})")
    if log_ and low <= 0:
        raise MmfuseError(f"{what}: a log range must start above 0, got low {low}")
    if kind == "int":
        low, high = int(low), high if high == LAYERS else int(high)
    return Param(key, section, low, high, log_, kind == "int"), when, none


def search_space(raw: dict, cfg: RunConfig, fixed: Collection[str] = (), source: str = "the default space") -> list:
    """The ``Param``s of ``raw`` that apply to ``cfg``, checked against the config's own rules.

    A key the user fixed with a flag (``fixed``), or that means nothing for this model (a text setting without a text
    tower, ``when`` not met, tower layers with ``--tune head``), is left out of the default space; in a ``--space``
    file the first is a contradiction and stops the search, the second is left out with a note.
    """
    resolved = resolve(cfg)
    params = []
    for key, value in raw.items():
        param, when, none = parse_entry(key, value, source)
        if key in fixed:
            if source != "the default space":
                raise MmfuseError(
                    f"--{key.replace('_', '-')} fixes {key}, which {source} also searches: leave one of them out."
                )
            log.info("not searching %s: set by --%s", key, key.replace("_", "-"))
            continue
        reason = _not_applicable(key, when, resolved)
        if reason is None and (param.high == LAYERS or key == "tune_layers"):
            depth = tuned_depth(resolved)
            if not depth:
                reason = "a tuned tower has no repeated layers to count"
            elif param.high == LAYERS:
                param = Param(key, param.section, param.low, depth, param.log, param.integer)
            elif any(isinstance(v, int) and v > depth for v in param.values()):
                raise MmfuseError(f"{source}: tune_layers goes past the {depth} layers of the tuned tower(s)")
        if reason:
            log.info("not searching %s: %s", key, reason)
            continue
        if none:  # None joins a whole-number range as one more choice: an optional setting's default
            param = Param(key, param.section, choices=(None, *range(int(param.low), int(param.high) + 1)))
        for v in param.values():
            _check_value(cfg, param, v, source)
        params.append(param)
    if not params:
        raise MmfuseError(f"Nothing left to search in {source}: every key is fixed by a flag or does not apply.")
    return params


def _not_applicable(key: str, when: dict, cfg: RunConfig) -> str | None:
    modality = KEY_MODALITY.get(key)
    if modality and modality not in cfg.model.modalities:
        return f"the model has no {modality} tower"
    for setting, allowed in when.items():
        value = getattr(cfg.model, setting, getattr(cfg.train, setting, None))
        if value not in allowed:
            return f"only with {setting} {', '.join(map(str, allowed))}"
    if key in ("tune_layers", "head_lr") and not cfg.tuned:
        return f"--tune {cfg.train.tune} tunes no tower"
    if key == "modality_dropout" and len(cfg.model.modalities) < 2:
        return "it needs two modalities"
    return None


def tuned_depth(cfg: RunConfig) -> int:
    """The fewest repeated layers among the tuned towers (0 when one has none): what --tune-layers may go up to."""

    depths = []
    for m in cfg.tuned:
        spec = requested_spec(m, cfg.model)
        # A packaged text tower's spec counts its layers; others are built (once, at the start) to count them.
        depths.append(
            spec.get("layers") or len(build_tower(spec, trust_remote_code=cfg.model.trust_remote_code).layer_groups())
        )
    return min(depths, default=0)


def _check_value(cfg: RunConfig, param: Param, value, source: str) -> None:
    """A value of the space through the same checks as its flag, so a bad range stops before any trial."""

    try:
        trial_cfg = resolve(cfg.updated({param.section: {param.key: value}}))
        for m in trial_cfg.model.modalities:
            if m == "tabular":  # no tower
                continue
            requested_spec(m, trial_cfg.model)  # the tower's own limits (--text-layer-mean past its layers)
    except MmfuseError as e:
        raise MmfuseError(f"{source}: {param.key} = {value!r} is not a valid setting: {e}") from None
    except TypeError:
        raise MmfuseError(f"{source}: {param.key} = {value!r} has the wrong type for that setting") from None


def default_values(cfg: RunConfig, params: list[Param]) -> dict:
    """The resolved config's value of each searched key that its space holds: trial 0's parameters."""
    resolved = resolve(cfg)
    values, outside = {}, []
    for p in params:
        value = getattr(getattr(resolved, p.section), p.key)
        if p.holds(value):
            values[p.key] = value
        else:
            outside.append(f"{p.key}={value}")
    if outside:
        log.warning("the defaults %s are outside the space: trial 0 samples those instead", ", ".join(outside))
    return values


# ---------------------------------------------------------------------------------------------------------------------
# The study
