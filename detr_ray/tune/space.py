"""Search spaces: a small YAML schema, validated before Ray starts, turned into Ray Tune domains.

    experiment:                 # fixed settings, the layout of a training experiment YAML
      model: {backbone: resnet18, hidden_dim: 64}
      data: {batch_size: 8}
      train: {epochs: 8}
    search:                     # tuned parameters, "section.key: {distribution: args}"
      train.lr: {loguniform: [1.0e-5, 1.0e-3]}
      train.lr_backbone_ratio: {loguniform: [0.05, 1.0]}   # lr_backbone = lr * ratio
      train.weight_decay: {loguniform: [1.0e-5, 1.0e-2]}
      model.backbone: {choice: [resnet50, resnet101]}
      model.dropout: {uniform: [0.0, 0.2]}
      train.lr_drop: {int: [20, 40]}                        # inclusive bounds
      model.num_queries: {fixed: 100}
      train.pretrained:         # follows the trial's backbone: the weights file of that backbone
        by:
          model.backbone: {resnet50: s3://bucket/detr-r50.pth, resnet101: s3://bucket/detr-r101.pth}
    scheduler:                  # ASHA and the sweep
      metric: val/AP
      mode: max
      grace_period: 2
      reduction_factor: 3
      num_samples: 8
      seed: 0
      startup_trials: 10        # TPE samples at random until this many trials have finished
      objectives: {model/parameters: min}   # optional: more objectives -> a Pareto front

Several objectives: `metric` stays the primary one (ASHA stops trials on it alone, checkpoints
are ranked by it); `objectives` names the others, each a metric the trainer reports with max or
min. The sweep then returns the Pareto front of its finished trials instead of one best trial.

Distributions: loguniform (0 < lower < upper), uniform (lower < upper), int (integers, lower <
upper, both included), choice (a non-empty list), fixed (one value), and `by`: not sampled, a
value picked per trial by the value of a `choice` key (every choice must have its value, and
nothing else may be listed), e.g. the pretrained weights that match the trial's backbone. The
searcher sees a `by` table as a constant and each trial's config carries it whole; apply_sample
puts the trial's value into its experiment. Every tuned key must name a field of the
experiment's model/data/train sections (or train.lr_backbone_ratio), and every value
a distribution can produce at its bounds must pass the experiment's own validation: an unknown
backbone or a dropout of 1.5 is caught here, naming the file and the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from detr_ray.config import (
    ConfigError,
    DataConfig,
    DETRConfig,
    ExperimentConfig,
    TrainConfig,
    _check_type,
    experiment_from_dict,
    load_yaml,
)

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "fixed", "by")
RATIO_KEY = "train.lr_backbone_ratio"
SECTIONS = {"model": DETRConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class SchedulerSpec:
    metric: str = "val/AP"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 3
    num_samples: int = 8
    seed: int = 0
    # TPE proposes at random until this many trials have finished (Optuna's default, 10, means
    # a sweep of 8 trials never uses TPE at all).
    startup_trials: int = 10
    objectives: dict = field(default_factory=dict)  # more objectives {metric: "max"|"min"} besides `metric`


@dataclass
class Param:
    key: str  # "section.name"
    kind: str  # one of DISTRIBUTIONS
    args: Any  # [lower, upper] | list of choices | the fixed value | {choice key: {choice: value}}


@dataclass
class SearchSpace:
    """A parsed search space. `experiment` is the fixed experiment as written (what Tune's trial
    configs and the sweep's records carry); `fixed` is it parsed, for everything that reads it."""

    source: str
    experiment: dict  # the fixed experiment (model/data/train sections)
    params: list[Param] = field(default_factory=list)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    fixed: ExperimentConfig = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self):
        if self.fixed is None:
            self.fixed = experiment_from_dict(self.experiment, f"{self.source}: experiment")

    def tune_domains(self) -> dict[str, Any]:
        """{"section.key": a Ray Tune domain (or the fixed value)}: the Tuner's param_space."""
        from ray import tune

        out = {}
        for p in self.params:
            if p.kind == "loguniform":
                out[p.key] = tune.loguniform(*p.args)
            elif p.kind == "uniform":
                out[p.key] = tune.uniform(*p.args)
            elif p.kind == "int":
                out[p.key] = tune.randint(p.args[0], p.args[1] + 1)  # randint's upper is exclusive
            elif p.kind == "choice":
                out[p.key] = tune.choice(list(p.args))
            elif p.kind == "by":  # a constant for the searcher; apply_sample picks the trial's value
                out[p.key] = {"by": p.args}
            else:
                out[p.key] = p.args
        return out

    def experiment_for(self, sample: dict[str, Any]) -> dict:
        """The experiment dict of one trial: the fixed experiment with `sample` applied."""
        return apply_sample(self.experiment, sample)

    def trial_experiment(self, sample: dict[str, Any]) -> ExperimentConfig:
        """One trial's experiment, parsed: the fixed experiment with `sample` applied."""
        return experiment_from_dict(self.experiment_for(sample), f"{self.source}: trial experiment")


def _is_by(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"by"}


def apply_sample(experiment: dict, sample: dict[str, Any]) -> dict:
    exp = {section: dict(experiment.get(section) or {}) for section in SECTIONS}
    ratio = None
    for key, value in sample.items():
        if key == RATIO_KEY:
            ratio = value
            continue
        if _is_by(value):
            continue
        section, _, name = key.partition(".")
        exp[section][name] = value
    for key, value in sample.items():  # after the choices they follow are in place
        if _is_by(value):
            ((by, table),) = value["by"].items()
            by_section, _, by_name = by.partition(".")
            choice = exp[by_section].get(by_name, getattr(SECTIONS[by_section], by_name))
            if choice not in table:
                raise ConfigError(f"{key}: by {by}: no value for {choice!r} (has {', '.join(map(str, table))})")
            section, _, name = key.partition(".")
            exp[section][name] = table[choice]
    if ratio is not None:
        lr = exp["train"].get("lr", TrainConfig.lr)
        exp["train"]["lr_backbone"] = float(lr) * float(ratio)
    return exp


def _number(value: Any, where: str) -> float | int:
    """A bound: ints stay ints (for `int`), everything else through the config's float check."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _check_type(value, float, where)


def _parse_param(key: str, spec: Any, where: str) -> Param:
    section, dot, name = key.partition(".")
    if key != RATIO_KEY:
        if not dot or section not in SECTIONS:
            raise ConfigError(f"{where}: unknown key {key!r}; use section.name with section in {sorted(SECTIONS)}")
        known = {f.name for f in fields(SECTIONS[section])}
        renamed = getattr(SECTIONS[section], "RENAMED", {}).get(name)
        if renamed:  # a searched key is named as the experiment names it now (no old names)
            raise ConfigError(f"{where}: {key!r} is now called {section}.{renamed}")
        if name not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; {section} has {', '.join(sorted(known))}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-5, 1.0e-3]}}, got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if kind == "fixed":
        return Param(key, kind, args)
    if kind == "by":
        if not isinstance(args, dict) or len(args) != 1 or not isinstance(next(iter(args.values())), dict):
            raise ConfigError(
                f"{where}.by: expected {{choice key: {{choice: value, ...}}}}, e.g. "
                f"{{model.backbone: {{resnet50: r50.pth, resnet101: r101.pth}}}}, got {args!r}"
            )
        return Param(key, kind, {str(k): dict(v) for k, v in args.items()})
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.choice: expected a non-empty list, got {args!r}")
        return Param(key, kind, args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}.{kind}: expected [lower, upper], got {args!r}")
    lower, upper = (_number(v, f"{where}.{kind}") for v in args)
    if kind == "int":
        if not all(isinstance(v, int) for v in (lower, upper)):
            raise ConfigError(f"{where}.int: bounds must be integers, got {args!r}")
    if lower >= upper:
        raise ConfigError(f"{where}.{kind}: lower bound {lower} must be below the upper bound {upper}")
    if kind == "loguniform" and lower <= 0:
        raise ConfigError(f"{where}.loguniform: bounds must be positive, got {args!r}")
    return Param(key, kind, [lower, upper])


def _extremes(p: Param) -> list[Any]:
    return [p.args] if p.kind == "fixed" else list(p.args)


def _check_by(p: Param, params: dict[str, Param], experiment: dict, where: str) -> None:
    """A `by` parameter follows a `choice` of the same space and has a value for each choice
    (and none for anything else); each pair must make a valid experiment."""
    ((by, table),) = p.args.items()
    leader = params.get(by)
    if leader is None or leader.kind != "choice":
        raise ConfigError(
            f"{where}.by: {by!r} must be a choice of this search space (the key it follows), "
            f"got {leader.kind if leader else 'no such key'}"
        )
    missing = [c for c in leader.args if c not in table]
    extra = [k for k in table if k not in leader.args]
    if missing or extra:
        raise ConfigError(
            f"{where}.by.{by}: needs a value for each of {leader.args} and nothing else; "
            f"missing {missing}, not a choice {extra}"
        )
    for choice, value in table.items():
        try:
            experiment_from_dict(apply_sample(experiment, {by: choice, p.key: value}), "experiment")
        except ConfigError as e:
            raise ConfigError(f"{where}.by.{by}.{choice}: value {value!r} is invalid: {e}") from e


def parse_space(data: dict, source: str = "search space") -> SearchSpace:
    unknown = sorted(set(data) - {"experiment", "search", "scheduler"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: experiment, search, scheduler")
    experiment = copy.deepcopy(data.get("experiment") or {})
    fixed = experiment_from_dict(experiment, f"{source}: experiment")  # the fixed part alone must be valid
    search = data.get("search") or {}
    if not isinstance(search, dict):
        raise ConfigError(f"{source}: search: expected a mapping of section.key to a distribution")
    params = [_parse_param(str(k), v, f"{source}: search.{k}") for k, v in search.items()]
    by_key = {p.key: p for p in params}
    for p in params:
        if p.kind == "by":
            _check_by(p, by_key, experiment, f"{source}: search.{p.key}")
    # Each bound or choice, alone, must make a valid experiment (names the key on failure).
    for p in params:
        if p.kind == "by":
            continue
        for value in _extremes(p):
            try:
                experiment_from_dict(apply_sample(experiment, {p.key: value}), "experiment")
            except ConfigError as e:
                raise ConfigError(f"{source}: search.{p.key}: value {value!r} is invalid: {e}") from e
    from detr_ray.config import from_dict

    scheduler = from_dict(SchedulerSpec, data.get("scheduler"), f"{source}: scheduler")
    if scheduler.mode not in ("max", "min"):
        raise ConfigError(f"{source}: scheduler.mode: choose max or min, got {scheduler.mode!r}")
    for name in ("grace_period", "num_samples", "startup_trials"):
        if getattr(scheduler, name) < 1:
            raise ConfigError(f"{source}: scheduler.{name}: must be >= 1, got {getattr(scheduler, name)}")
    if not isinstance(scheduler.objectives, dict):
        raise ConfigError(f"{source}: scheduler.objectives: expected {{metric: max|min}}, got {scheduler.objectives!r}")
    for name, mode in scheduler.objectives.items():
        if not isinstance(name, str) or mode not in ("max", "min") or name == scheduler.metric:
            raise ConfigError(
                f"{source}: scheduler.objectives.{name}: expected a metric other than scheduler.metric "
                f"({scheduler.metric}) with max or min, got {mode!r}"
            )
    if scheduler.reduction_factor < 2:
        raise ConfigError(f"{source}: scheduler.reduction_factor: must be >= 2, got {scheduler.reduction_factor}")
    return SearchSpace(source, experiment, params, scheduler, fixed)


def load_space(path: str | Path) -> SearchSpace:
    """Reads and validates a search-space YAML; errors name the file and the key."""
    return parse_space(load_yaml(path), str(path))
