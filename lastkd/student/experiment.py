"""Distillation against its baseline: named arms x seeds of one training config, and a paired report.

An experiment is one base :class:`TrainConfig`, named **arms** that override some of its fields
(default: ``ce`` = alpha 0, ``kd`` = the config's distillation, ``kd-shuffled`` = the same with
the teacher vectors permuted across clips, a control that must do worse whenever the teacher is
informative) and a list of seeds. Every (arm, seed) is an ordinary training run whose config
differs from the others of its seed only by the arm's overrides: the engine derives data order,
augmentation and initial weights from the seed alone, so the arms of one seed are *paired* and
their differences are measured without the seed-to-seed noise.

The module is layered so a service can use the pure parts without running anything here:

* :class:`ExperimentConfig` validates the whole experiment (every arm's config included);
* :func:`expand` gives the child (arm, seed, TrainConfig) list a job system submits;
* :func:`build_report` turns child results (metrics + history, :class:`ChildResult`) into the
  report; :func:`write_report` writes it as JSON, markdown and PNG plots;
* :func:`run_local` trains the children one after another through
  :func:`lastkd.student.training.train` (resumable: each child has its own run folder).

Intervals are two-sided 95% Student-t intervals over seeds (for paired differences: over the
per-seed differences), so with 2 seeds they are wide (t = 12.71): a difference is called
"within noise" whenever its interval contains 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lastkd.ids import check_name
from lastkd.jsonsafe import to_jsonable
from lastkd.student.config import ConfigError, TrainConfig
from lastkd.validation import config_problems, problems, read_config_file, summary

ARM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
BASELINE_ARM = "ce"
# The three arms of the question "does distillation help, and is it the teacher that helps?"
DEFAULT_ARMS: dict[str, dict[str, Any]] = {
    "ce": {"distill": {"alpha_start": 0.0, "alpha_end": 0.0}},
    "kd": {},
    "kd-shuffled": {"distill": {"teacher_order": "shuffled"}},
}
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
MAX_ARMS = 16
MAX_SEEDS = 64
CONFIDENCE = 0.95
# Fields an arm may not override: the experiment sets them per child.
_RESERVED = ("name", "seed")
# Arms compare recipes on the same data: file paths come from the base config alone (where they
# are resolved and confined to the data roots once).
# (The same fields as TrainConfig.path_fields.)
_PATH_FIELDS = ("data.path", "data.label_path", "data.missing_skeletons", "data.cache_dir", "eval.label_map")


class ExperimentError(ValueError):
    """An experiment config or a set of child results that cannot form an experiment/report."""


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def _nested(override: Mapping[str, Any]) -> dict[str, Any]:
    """``{"distill.alpha_start": 0}`` and ``{"distill": {"alpha_start": 0}}`` both as nested dicts."""
    out: dict[str, Any] = {}
    for key, value in override.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ExperimentError(f"override {key!r} sets a field inside a non-mapping value")
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = _merge(node[leaf], _nested(value))
        else:
            node[leaf] = _nested(value) if isinstance(value, Mapping) else value
    return out


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def child_name(experiment: str, arm: str, seed: int) -> str:
    """Registry name of one child's student: ``<experiment>-<arm>-s<seed>``."""
    return f"{experiment}-{arm}-s{seed}"


class ExperimentConfig(BaseModel):
    """One experiment: a base TrainConfig, named arms overriding its fields, and the seeds.

    ``arms`` maps a name to a (nested or dotted) mapping of TrainConfig fields; ``{}`` is the base
    config itself. ``baseline`` names the arm every other arm is compared with (paired by seed).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., description="Experiment name; children are named <name>-<arm>-s<seed>.")
    base: TrainConfig
    arms: dict[str, dict[str, Any]] = Field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_ARMS.items()})
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    baseline: str = BASELINE_ARM

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("arms")
    @classmethod
    def _arms(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not 1 <= len(value) <= MAX_ARMS:
            raise ValueError(f"between 1 and {MAX_ARMS} arms, got {len(value)}")
        for arm, override in value.items():
            if not ARM_RE.match(arm):
                raise ValueError(f"arm name {arm!r}: 1-32 letters, digits, '_' or '-', starting with a letter or digit")
            nested = _nested(override)
            for key in nested:
                if key in _RESERVED:
                    raise ValueError(f"arms.{arm}.{key}: set by the experiment (per child), not by an arm")
            for dotted in _PATH_FIELDS:
                section, leaf = dotted.split(".")
                if isinstance(nested.get(section), dict) and leaf in nested[section]:
                    raise ValueError(f"arms.{arm}.{dotted}: arms share the base config's data; set paths in base")
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            for s in value:
                if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 2**31 - 1:
                    raise ValueError(f"seeds must be integers in [0, 2**31 - 1], got {s!r}")
            if not 1 <= len(value) <= MAX_SEEDS:
                raise ValueError(f"between 1 and {MAX_SEEDS} seeds, got {len(value)}")
            if len(set(value)) != len(value):
                raise ValueError("seeds must not repeat (a repeated seed is the same run twice)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.baseline not in self.arms:
            raise ValueError(f"baseline arm {self.baseline!r} is not among the arms {sorted(self.arms)}")
        configs: dict[str, TrainConfig] = {}
        for arm in self.arms:
            configs[arm] = self.arm_config(arm)  # raises naming arms.<arm>.<field>
        longest = child_name(self.name, max(self.arms, key=len), max(self.seeds))
        if len(longest) > 64:
            raise ValueError(
                f"child name {longest!r} is longer than 64 characters: shorten the experiment or arm names"
            )
        seen: dict[str, str] = {}
        for arm, cfg in configs.items():
            d = {k: v for k, v in cfg.training_dict().items() if k != "name"}
            if not cfg.distill.enabled:  # distillation settings that never act do not make a new arm
                d["distill"] = None
            key = json.dumps(d, sort_keys=True)
            if key in seen:
                hint = ""
                if not self.base.distill.enabled:
                    hint = " (base.distill trains nothing: set distill.feature_set and a non-zero alpha)"
                raise ValueError(f"arms {seen[key]!r} and {arm!r} train the same config{hint}")
            seen[key] = arm
        return self

    def arm_config(self, arm: str, seed: int | None = None) -> TrainConfig:
        """The TrainConfig of ``arm`` (for ``seed``: named and seeded as that child)."""
        if arm not in self.arms:
            raise ExperimentError(f"unknown arm {arm!r}; the experiment has {sorted(self.arms)}")
        raw = _merge(self.base.model_dump(mode="json"), _nested(self.arms[arm]))
        if seed is not None:
            raw["seed"] = seed
            raw["name"] = child_name(self.name, arm, seed)
        try:
            return TrainConfig.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(summary(problems(exc, prefix=f"arms.{arm}."))) from None

    def config_hash(self) -> str:
        """sha256 (hex) of what determines the experiment's results: children's training dicts."""
        record = [[c.arm, c.seed, c.config.config_hash()] for c in expand(self)]
        return hashlib.sha256(json.dumps([self.baseline, record]).encode()).hexdigest()

    def select(self, arms: Sequence[str] | None = None, seeds: int | None = None) -> ExperimentConfig:
        """A copy restricted to ``arms`` (the baseline is always kept) and/or seeds ``0..seeds-1``."""
        update: dict[str, Any] = {}
        if arms is not None:
            unknown = [a for a in arms if a not in self.arms]
            if unknown:
                raise ExperimentError(f"--arms: unknown arm(s) {unknown}; the experiment has {sorted(self.arms)}")
            keep = [self.baseline, *[a for a in arms if a != self.baseline]]
            update["arms"] = {a: self.arms[a] for a in keep}
        if seeds is not None:
            if isinstance(seeds, bool) or not 1 <= seeds <= MAX_SEEDS:
                raise ExperimentError(f"--seeds must be between 1 and {MAX_SEEDS}, got {seeds}")
            update["seeds"] = tuple(range(seeds))
        try:
            return ExperimentConfig.model_validate({**self.model_dump(mode="json"), **update})
        except ValidationError as exc:
            raise ExperimentError(summary(problems(exc))) from None

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> ExperimentConfig:
        """An experiment mapping (with ``base``) or a plain TrainConfig mapping (default arms).

        Raises :class:`ConfigError` with one line per bad field (``base.epochs``, ``arms.kd...``).
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(raw).__name__}")
        if "base" not in raw:  # a training config: the experiment is its default comparison
            train = TrainConfig.from_dict(raw, source)
            raw = {"name": train.name, "base": train.model_dump(mode="json")}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(config_problems(exc, source, "experiment config")) from None

    @classmethod
    def from_yaml(cls, path: Path | str) -> ExperimentConfig:
        """Read an experiment (or training) config file; the file checks of every job config."""
        raw = read_config_file(path, ConfigError)
        return cls.from_dict(raw, source=str(path))

    def confined(self, roots: Sequence[Path]) -> ExperimentConfig:
        """A copy whose base paths are absolute, real and inside ``roots``; every arm is checked too.

        The one path rule (:func:`lastkd.student.paths.confine_config_paths`, as for ``lastkd
        train`` and ``POST /train``). Raises :class:`~lastkd.datapaths.DataPathError` naming the
        field (``base.<field>`` or ``arms.<arm>.<field>``).
        """
        from lastkd.datapaths import DataPathError
        from lastkd.student.paths import confine_config_paths

        def renamed(exc: DataPathError, prefix: str) -> DataPathError:
            message = str(exc).removeprefix(f"{exc.field}: ")
            return DataPathError(f"{prefix}{exc.field}", message, exc.kind)

        try:
            exp = self.model_copy(update={"base": confine_config_paths(self.base, roots)})
        except DataPathError as exc:
            raise renamed(exc, "base.") from None
        for arm in exp.arms:  # an arm that overrides a path is held to the same rule
            try:
                confine_config_paths(exp.arm_config(arm), roots)
            except DataPathError as exc:
                raise renamed(exc, f"arms.{arm}.") from None
        return exp


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChildSpec:
    """One (arm, seed) training run of an experiment."""

    arm: str
    seed: int
    config: TrainConfig

    @property
    def key(self) -> str:
        """``<arm>-s<seed>``: the child's folder name and id within the experiment."""
        return f"{self.arm}-s{self.seed}"


def expand(exp: ExperimentConfig) -> list[ChildSpec]:
    """Every (arm, seed) child, seed-major (all arms of the first seed first: early pairs)."""
    return [ChildSpec(arm, seed, exp.arm_config(arm, seed)) for seed in exp.seeds for arm in exp.arms]


@dataclass
class ChildResult:
    """What the report needs from one finished child: final metrics and per-epoch history.

    ``metrics`` is the engine's final metrics (top1, top5, per_class, object_classes, robustness);
    ``history`` its per-epoch entries (train_ce, train_distill, train_total, val_top1, ...), i.e.
    what a published student's ``metrics.json`` holds as ``final`` and ``history``.
    """

    arm: str
    seed: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    wall_s: float | None = None

    @classmethod
    def from_train_result(cls, arm: str, seed: int, result: Any, wall_s: float | None = None) -> ChildResult:
        """From a :class:`lastkd.student.training.TrainResult`."""
        return cls(arm, seed, dict(result.metrics), list(result.history), wall_s)

    @classmethod
    def from_metrics_json(cls, arm: str, seed: int, obj: Mapping[str, Any]) -> ChildResult:
        """From a published ``metrics.json`` (``{"final": ..., "history": [...]}``)."""
        if (
            not isinstance(obj, Mapping)
            or not isinstance(obj.get("final"), Mapping)
            or not isinstance(obj.get("history"), list)
        ):
            raise ExperimentError(f"child {arm}-s{seed}: metrics must have 'final' (mapping) and 'history' (list)")
        return cls(arm, seed, dict(obj["final"]), list(obj["history"]))


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def _t_cdf(x: float, df: int) -> float:
    """CDF of Student's t with ``df`` degrees of freedom at ``x >= 0`` (regularised incomplete beta
    by its continued fraction, Numerical Recipes 6.4): no scipy dependency for one quantile."""
    z = df / (df + x * x)
    a, b = df / 2.0, 0.5
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(z) + b * math.log1p(-z)

    # Lentz's continued fraction for I_z(a, b); converges fast for z < (a+1)/(a+b+2).
    def cf(a: float, b: float, z: float) -> float:
        tiny = 1e-300
        c, d = 1.0, 1.0 - (a + b) * z / (a + 1.0)
        d = 1.0 / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, 300):
            m2 = 2 * m
            for num in (
                m * (b - m) * z / ((a + m2 - 1) * (a + m2)),
                -(a + m) * (a + b + m) * z / ((a + m2) * (a + m2 + 1)),
            ):
                d = 1.0 + num * d
                d = 1.0 / (d if abs(d) > tiny else tiny)
                c = 1.0 + num / c
                c = c if abs(c) > tiny else tiny
                h *= d * c
            if abs(d * c - 1.0) < 1e-15:
                break
        return h

    if z < (a + 1) / (a + b + 2):
        ibeta = math.exp(ln_front) * cf(a, b, z) / a
    else:
        ln_front_sym = ln_front  # symmetric relation I_z(a,b) = 1 - I_{1-z}(b,a)
        ibeta = 1.0 - math.exp(ln_front_sym) * cf(b, a, 1.0 - z) / b
    return 1.0 - 0.5 * ibeta


def t_critical(df: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided critical value of Student's t: P(|T| <= t) = confidence (bisection on the CDF)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ExperimentError(f"degrees of freedom must be a positive int, got {df!r}")
    target = 0.5 + confidence / 2.0
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and two-sided t interval of ``values`` (``lo``/``hi`` None for fewer than 2 values).

    ``within_noise`` is True when the interval contains 0, None when there is no interval.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ExperimentError("an interval needs at least one value")
    mean = float(np.mean(vals))
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "lo": None, "hi": None, "within_noise": None, "values": vals}
    std = float(np.std(vals, ddof=1))
    half = t_critical(n - 1, confidence) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "std": std, "lo": lo, "hi": hi, "within_noise": bool(lo <= 0.0 <= hi), "values": vals}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _final_distill(child: ChildResult, distilling: bool) -> float | None:
    if not distilling or not child.history:
        return None
    value = child.history[-1].get("train_distill")
    return None if value is None else float(value)


def _per_class(child: ChildResult) -> dict[int, tuple[str, float]]:
    out = {}
    for p in child.metrics.get("per_class") or []:
        if p.get("accuracy") is not None:
            out[int(p["index"])] = (str(p.get("name", p["index"])), float(p["accuracy"]))
    return out


def _robustness(child: ChildResult) -> dict[str, float]:
    return {
        k: float(v["top1"]) for k, v in (child.metrics.get("robustness") or {}).items() if v.get("top1") is not None
    }


def _all_known(values: Sequence[float | None]) -> list[float] | None:
    """The values when none is missing, else None: an interval over some seeds only would not be paired."""
    known = [v for v in values if v is not None]
    return known if len(known) == len(values) else None


def _object_top1(child: ChildResult) -> float | None:
    value = (child.metrics.get("object_classes") or {}).get("top1")
    return None if value is None else float(value)


def _shuffled_twins(exp: ExperimentConfig) -> dict[str, str]:
    """``{shuffled_arm: joined_arm}`` for arms that differ only by ``distill.teacher_order``."""

    def key(cfg: TrainConfig) -> str:
        d = cfg.training_dict()
        d.pop("name", None)
        d["distill"] = {k: v for k, v in d["distill"].items() if k != "teacher_order"}
        return json.dumps(d, sort_keys=True)

    cfgs = {arm: exp.arm_config(arm) for arm in exp.arms}
    joined = {key(c): arm for arm, c in cfgs.items() if c.distill.teacher_order == "joined" and c.distill.enabled}
    return {
        arm: joined[key(c)] for arm, c in cfgs.items() if c.distill.teacher_order == "shuffled" and key(c) in joined
    }


def _sentence(
    arm: str, baseline: str, what: str, iv: dict[str, Any], scale: float = 100.0, unit: str = " points"
) -> str:
    diff = f"{scale * iv['mean']:+.2f}{unit}"
    if iv["lo"] is None:
        return f"{arm} vs {baseline}, {what}: {diff} from 1 seed: no interval, so noise cannot be told from an effect."
    ci = f"95% CI [{scale * iv['lo']:+.2f}, {scale * iv['hi']:+.2f}] over {iv['n']} seeds"
    verdict = (
        "within noise (the interval contains 0)"
        if iv["within_noise"]
        else ("a real difference (the interval excludes 0)")
    )
    return f"{arm} vs {baseline}, {what}: {diff} ({ci}): {verdict}."


def build_report(exp: ExperimentConfig, children: Sequence[ChildResult]) -> dict[str, Any]:
    """The experiment's report, computed from the child results only (pure; no I/O).

    Seeds for which some arm has no result are left out (listed in ``missing``) so every
    comparison stays paired; raises :class:`ExperimentError` if no seed is complete or a child
    is unknown or duplicated.
    """
    by_key: dict[tuple[str, int], ChildResult] = {}
    for c in children:
        if c.arm not in exp.arms or c.seed not in exp.seeds:
            raise ExperimentError(f"child {c.arm}-s{c.seed} is not part of experiment {exp.name!r}")
        if (c.arm, c.seed) in by_key:
            raise ExperimentError(f"child {c.arm}-s{c.seed} given twice")
        by_key[(c.arm, c.seed)] = c
    arms = list(exp.arms)
    missing = [f"{a}-s{s}" for s in exp.seeds for a in arms if (a, s) not in by_key]
    seeds = [s for s in exp.seeds if all((a, s) in by_key for a in arms)]
    if not seeds:
        raise ExperimentError(f"experiment {exp.name!r}: no seed has a result for every arm (missing {missing})")
    distilling = {a: exp.arm_config(a).distill.enabled for a in arms}
    base = exp.baseline

    per_arm: dict[str, Any] = {}
    for arm in arms:
        kids = [by_key[(arm, s)] for s in seeds]
        losses = _all_known([_final_distill(k, distilling[arm]) for k in kids])
        objects = _all_known([_object_top1(k) for k in kids])
        robust_keys = sorted(set.intersection(*[set(_robustness(k)) for k in kids]))
        epochs = min(len(k.history) for k in kids)
        curves = {
            key: [float(np.mean([k.history[e].get(key, np.nan) for k in kids])) for e in range(epochs)]
            for key in ("train_total", "train_ce", "train_distill", "val_top1")
        }
        per_arm[arm] = {
            "distilling": distilling[arm],
            "top1": interval([k.metrics["top1"] for k in kids]),
            "top5": interval([k.metrics["top5"] for k in kids]),
            "final_distill_loss": None if losses is None else interval(losses),
            "object_top1": None if objects is None else interval(objects),
            "robustness": {key: interval([_robustness(k)[key] for k in kids]) for key in robust_keys},
            "curves": curves,
        }

    paired: dict[str, Any] = {}
    sentences: list[str] = []
    for arm in arms:
        if arm == base:
            continue
        pairs = [(by_key[(arm, s)], by_key[(base, s)]) for s in seeds]
        entry: dict[str, Any] = {
            "top1": interval([a.metrics["top1"] - b.metrics["top1"] for a, b in pairs]),
            "top5": interval([a.metrics["top5"] - b.metrics["top5"] for a, b in pairs]),
        }
        obj = [(_object_top1(a), _object_top1(b)) for a, b in pairs]
        obj_diffs = _all_known([None if x is None or y is None else x - y for x, y in obj])
        entry["object_top1"] = None if obj_diffs is None else interval(obj_diffs)
        classes = sorted(set.intersection(*[set(_per_class(a)) & set(_per_class(b)) for a, b in pairs]))
        entry["per_class"] = [
            {
                "index": i,
                "name": _per_class(pairs[0][0])[i][0],
                "diff": interval([_per_class(a)[i][1] - _per_class(b)[i][1] for a, b in pairs]),
            }
            for i in classes
        ]
        rkeys = sorted(set.intersection(*[set(_robustness(a)) & set(_robustness(b)) for a, b in pairs]))
        entry["robustness"] = {k: interval([_robustness(a)[k] - _robustness(b)[k] for a, b in pairs]) for k in rkeys}
        paired[arm] = entry
        sentences.append(_sentence(arm, base, "top-1", entry["top1"]))
        sentences.append(_sentence(arm, base, "top-5", entry["top5"]))
        if entry["object_top1"] is not None:
            sentences.append(_sentence(arm, base, "object-interaction top-1", entry["object_top1"]))
        for k, iv in entry["robustness"].items():
            sentences.append(_sentence(arm, base, f"top-1 under {k}", iv))

    ratios = {}
    for shuffled, joined in _shuffled_twins(exp).items():
        a, b = per_arm[shuffled]["final_distill_loss"], per_arm[joined]["final_distill_loss"]
        if a is not None and b is not None and b["mean"] > 0:
            ratios[f"{shuffled}/{joined}"] = a["mean"] / b["mean"]
            sentences.append(
                f"final distillation loss {shuffled} / {joined} = {a['mean'] / b['mean']:.2f} "
                f"({a['mean']:.4f} vs {b['mean']:.4f}): "
                + (
                    "the teacher carries information about the clip the student can use."
                    if a["mean"] / b["mean"] >= 1.5
                    else "shuffling the teacher barely matters: it carries little the student can learn per clip."
                )
            )

    return to_jsonable(
        {
            "name": exp.name,
            "baseline": base,
            "arms": arms,
            "seeds": seeds,
            "missing": missing,
            "confidence": CONFIDENCE,
            "per_arm": per_arm,
            "paired": paired,
            "distill_loss_ratio": ratios,
            "summary": sentences,
            "children": [
                {
                    "arm": c.arm,
                    "seed": c.seed,
                    "top1": c.metrics.get("top1"),
                    "top5": c.metrics.get("top5"),
                    "final_distill_loss": _final_distill(c, distilling[c.arm]),
                    "wall_s": c.wall_s,
                }
                for c in (by_key[(a, s)] for s in seeds for a in arms)
            ],
        }
    )


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _pct_iv(iv: dict[str, Any] | None, signed: bool = False) -> str:
    if iv is None:
        return "n/a"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    text = fmt.format(100 * iv["mean"])
    if iv["lo"] is not None:
        text += f" [{fmt.format(100 * iv['lo'])}, {fmt.format(100 * iv['hi'])}]"
    return text


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: accuracy per arm, paired differences, the verdicts in words."""
    lines = [
        f"# Experiment {report['name']}",
        "",
        f"Arms {', '.join(report['arms'])}; seeds {report['seeds']}; baseline `{report['baseline']}`. "
        "Accuracies in %, mean [95% t interval over seeds].",
    ]
    if report["missing"]:
        lines.append(f"Left out (incomplete seeds): {', '.join(report['missing'])}.")
    lines += ["", "| arm | top-1 | top-5 | object top-1 | final distill loss |", "|---|---|---|---|---|"]
    for arm in report["arms"]:
        a = report["per_arm"][arm]
        loss = a["final_distill_loss"]
        loss_txt = "n/a" if loss is None else f"{loss['mean']:.4f}"
        lines.append(
            f"| {arm} | {_pct_iv(a['top1'])} | {_pct_iv(a['top5'])} | {_pct_iv(a['object_top1'])} | {loss_txt} |"
        )
    if report["paired"]:
        lines += [
            "",
            f"## Paired differences against `{report['baseline']}` (points)",
            "",
            "| arm | top-1 | top-5 | object top-1 | "
            + " | ".join(sorted({k for p in report["paired"].values() for k in p["robustness"]}))
            + " |",
        ]
        rkeys = sorted({k for p in report["paired"].values() for k in p["robustness"]})
        lines.append("|---" * (4 + len(rkeys)) + "|")
        for arm, p in report["paired"].items():
            cells = [_pct_iv(p["top1"], True), _pct_iv(p["top5"], True), _pct_iv(p["object_top1"], True)]
            cells += [_pct_iv(p["robustness"].get(k), True) for k in rkeys]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## In words", ""] + [f"- {s}" for s in report["summary"]]
    return "\n".join(lines) + "\n"


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[str]:
    """accuracy.png (per arm, with intervals), per_class_diff.png, loss_curves.png (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        written.append(name)

    arms = report["arms"]
    fig = Figure(figsize=(max(5, 1.4 * len(arms)), 4))
    ax = fig.add_subplot()
    for offset, metric in ((-0.15, "top1"), (0.15, "top5")):
        ivs = [report["per_arm"][a][metric] for a in arms]
        means = [iv["mean"] for iv in ivs]
        err = [
            [iv["mean"] - iv["lo"] if iv["lo"] is not None else 0 for iv in ivs],
            [iv["hi"] - iv["mean"] if iv["hi"] is not None else 0 for iv in ivs],
        ]
        ax.errorbar(
            np.arange(len(arms)) + offset, means, yerr=err, fmt="o", capsize=4, label=metric.replace("top", "top-")
        )
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("val accuracy (mean, 95% interval)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"{report['name']}: accuracy per arm")
    save(fig, "accuracy.png")

    if report["paired"]:
        n = len(report["paired"])
        fig = Figure(figsize=(8, 2.5 + 2.2 * n))
        for row, (arm, p) in enumerate(report["paired"].items()):
            ax = fig.add_subplot(n, 1, row + 1)
            pcs = p["per_class"]
            if pcs:
                means = [c["diff"]["mean"] for c in pcs]
                ax.bar(range(len(pcs)), means, color=["tab:green" if m >= 0 else "tab:red" for m in means])
                ax.set_xticks(
                    range(len(pcs)), [c["name"] for c in pcs], rotation=90 if len(pcs) > 12 else 0, fontsize=7
                )
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylabel("accuracy diff")
            ax.set_title(f"per-class: {arm} - {report['baseline']}")
        save(fig, "per_class_diff.png")

    fig = Figure(figsize=(10, 4))
    for col, key in enumerate(("train_total", "train_distill")):
        ax = fig.add_subplot(1, 2, col + 1)
        for arm in arms:
            ys = report["per_arm"][arm]["curves"].get(key) or []
            if ys and any(y is not None for y in ys):
                ax.plot(range(1, len(ys) + 1), [np.nan if y is None else y for y in ys], marker="o", label=arm)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{key.replace('_', ' ')} (mean over seeds)")
        if ax.get_lines():
            ax.legend()
    save(fig, "loss_curves.png")
    return written


def write_report(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    tmp = out_dir / ".report.json.tmp"
    tmp.write_text(json.dumps(to_jsonable(report), indent=2) + "\n", encoding="utf-8")
    tmp.replace(paths["json"])
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    for name in write_plots(report, out_dir / "plots"):
        paths[name] = out_dir / "plots" / name
    return paths


# --------------------------------------------------------------------------------------------
# local runner
# --------------------------------------------------------------------------------------------
@dataclass
class LocalRun:
    """What :func:`run_local` produced."""

    report: dict[str, Any]
    children: list[ChildResult]
    paths: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0


def run_local(
    exp: ExperimentConfig,
    out_dir: Path,
    *,
    store_path: Path | None = None,
    data_roots: list[Path] | None = None,
    hooks_for: Callable[[ChildSpec], Any] | None = None,
    on_child: Callable[[ChildSpec, ChildResult], None] | None = None,
) -> LocalRun:
    """Train every child one after another in ``out_dir/runs/<arm>-s<seed>``, then write the report.

    Re-running resumes: finished children are read back, an interrupted one continues from its
    last epoch. ``hooks_for(child)`` may give each child its :class:`TrainHooks`; a cancelled
    child stops the experiment with :class:`ExperimentError` (nothing is reported).
    """
    from lastkd.student import training as engine

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    results: list[ChildResult] = []
    for child in expand(exp):
        hooks = hooks_for(child) if hooks_for is not None else None
        t1 = time.perf_counter()
        result = engine.train(
            child.config,
            out_dir / "runs" / child.key,
            store_path=store_path if child.config.distill.enabled else None,
            hooks=hooks,
            data_roots=data_roots,
        )
        if result.state is not engine.RunState.COMPLETED:
            raise ExperimentError(f"child {child.key} was cancelled after {result.epochs_completed} epoch(s)")
        done = ChildResult.from_train_result(child.arm, child.seed, result, time.perf_counter() - t1)
        results.append(done)
        if on_child is not None:
            on_child(child, done)
    report = build_report(exp, results)
    paths = write_report(report, out_dir)
    return LocalRun(report, results, paths, time.perf_counter() - t0)


__all__ = [
    "ARM_RE",
    "BASELINE_ARM",
    "DEFAULT_ARMS",
    "ChildResult",
    "ChildSpec",
    "ExperimentConfig",
    "ExperimentError",
    "LocalRun",
    "build_report",
    "child_name",
    "expand",
    "interval",
    "render_markdown",
    "run_local",
    "t_critical",
    "write_plots",
    "write_report",
]
