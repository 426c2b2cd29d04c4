"""Sweep files: YAML -> typed, validated spec -> concrete trials.

A sweep file holds stages run in order. Each stage names a workload, gives
its config (keys map one to one onto the workload's config class, listed by
`rlgrad config WORKLOAD`), optionally `config_from:` -- an earlier stage whose
config block this one starts from (deep-merged, the stage's own keys win) --
a search (grid or Optuna) over any config field, Ray Train scaling, and
optionally `from_stage:` -- an earlier stage whose checkpoints this one starts
from (one trial per finished trial of that stage, times this stage's own
grid). Everything is validated before Ray
starts or anything is written: a bad file gives one line naming the field, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from workloads import WORKLOADS, validate_config
from workloads.core.config import config_models


class SpecError(ValueError):
    """A sweep file that cannot be run; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ScalingSpec(_Strict):
    """Maps onto ray.train.ScalingConfig.

    num_workers: 0 runs the workload inline in the Tune trial process, without a
    Ray Train worker group (as Ray Train's own num_workers=0 local mode does):
    for tiny stages where a worker group's ~10 s start-up would dominate. The
    trial then holds the per-worker resources itself."""

    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(1.0, ge=0)  # only used when use_gpu
    memory_per_worker_gb: float | None = Field(None, gt=0)
    # any other Ray resource a worker needs, e.g. {"accelerator_type:A100": 0.001}
    # or a node pool's custom resource {"big_mem_node": 1}
    custom_resources: dict[str, float] = {}

    def resources_per_worker(self) -> dict[str, float]:
        resources: dict[str, float] = {"CPU": self.cpus_per_worker, **self.custom_resources}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        if self.memory_per_worker_gb is not None:
            resources["memory"] = self.memory_per_worker_gb * 1024**3
        return resources


class FailureSpec(_Strict):
    """Maps onto ray.train.FailureConfig: worker-group restarts from the last checkpoint."""

    max_failures: int = Field(0, ge=-1)


# An Optuna parameter: exactly one of these distributions.
_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


class OptunaSearchSpec(_Strict):
    metric: str
    mode: Literal["min", "max"]
    num_samples: int = Field(8, ge=1)
    seed: int = 0
    params: dict[str, dict[str, list]]


class SearchSpec(_Strict):
    grid: dict[str, list] = {}
    optuna: OptunaSearchSpec | None = None


class StageSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    workload: str
    config: dict[str, Any] = {}
    config_from: str | None = None  # an earlier stage whose config block this one starts from
    search: SearchSpec = SearchSpec()
    from_stage: str | None = None
    scaling: ScalingSpec = ScalingSpec()
    failure: FailureSpec = FailureSpec()


class SweepSpec(_Strict):
    sweep: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    results: str = "results"
    stages: list[StageSpec] = Field(min_length=1)


# ---------------------------------------------------------------- loading


class YamlLoader(yaml.SafeLoader):
    """safe_load, plus YAML 1.2 numbers: PyYAML alone reads `1e-4` as a string."""


def _construct_number(loader, node):
    text = loader.construct_scalar(node)
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)[eE][-+]?\d+", text):
        return float(text)
    return loader.construct_yaml_float(node)  # PyYAML's own forms: 1.5, .nan, .inf


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$"),
    list("-+0123456789."),
)
YamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_number)


def _loc(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_fields(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at `loc` (the parent of an unknown key) within model_cls.
    In a discriminated union pydantic puts the tag in `loc` (model -> 'mlp' -> key)."""
    candidates: list[Any] = [model_cls]
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((c.model_fields[part] for c in candidates if part in c.model_fields), None)
        if field is not None:
            candidates = config_models(field.annotation)
        else:  # a union member's tag
            candidates = [c for c in candidates if getattr(c.model_fields.get("type"), "default", None) == part]
        if not candidates:
            return []
    return list(dict.fromkeys(name for c in candidates for name in c.model_fields))


def _format_error(err: pydantic.ValidationError, model_cls: type[BaseModel], prefix: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    where = _loc(((prefix,) if prefix else ()) + loc) if prefix else _loc(loc)
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_fields(model_cls, loc[:-1])
        ours = getattr(model_cls, "foreign_names", {}).get(key) if len(loc) == 1 else None
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if ours is not None:  # another framework's name (TRL's) for a field we name otherwise
            hint = f" ({key} is TRL's name: rlgrad calls it {ours})"
        return f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}"
    if first["type"] == "missing":
        return f"{where}: required field is missing"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and isinstance(first.get("input"), dict):
        return f"{where}: {message}"  # a rule about the config as a whole: the message names the fields
    return f"{where} = {first.get('input')!r}: {message}"


def _fail(source: str, message: str):
    raise SpecError(f"{source}: {message}")


def get_dotted(model_cls: type[BaseModel], dotted: str):
    """The pydantic field at a dotted path (e.g. generation.temperature), or None.
    A union of models (e.g. ControlledConfig.model) is searched member by member."""
    candidates: list[Any] = [model_cls]
    field = None
    for part in dotted.split("."):
        field = next((c.model_fields[part] for c in candidates if part in c.model_fields), None)
        if field is None:
            return None
        candidates = config_models(field.annotation)
    return field


def set_dotted(values: dict, dotted: str, value) -> dict:
    """A deep copy of `values` with the dotted path set to `value`."""
    values = copy.deepcopy(values)
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return values


def load_spec(path: str) -> tuple[SweepSpec, str]:
    """Read and fully validate a sweep file. Returns the spec and the file's text."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the sweep file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise SpecError(f"{path}: the sweep file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at line {line}); "
                        "save it as UTF-8") from None
    return parse_spec(text, source=path), text


def parse_spec(text: str, source: str = "<spec>") -> SweepSpec:
    try:
        raw = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        _fail(source, f"not valid YAML{where}: {getattr(e, 'problem', None) or e}")
    if not isinstance(raw, dict):
        _fail(source, f"a sweep file is a mapping with keys sweep, stages (got {type(raw).__name__})")
    try:
        spec = SweepSpec.model_validate(raw)
    except pydantic.ValidationError as e:
        _fail(source, _format_error(e, SweepSpec, ""))
    return _check_stages(spec, source)


def merge_configs(base: dict, own: dict) -> dict:
    """`own` deep-merged onto `base`: nested mappings merge key by key, `own` wins,
    lists and scalars are replaced whole. A mapping whose `type` differs (another
    member of a union such as ControlledConfig.model) replaces the base's whole."""
    merged = copy.deepcopy(base)
    for key, value in own.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict) and below.get("type", value.get("type")) == value.get("type", below.get("type")):
            merged[key] = merge_configs(below, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _config_from(stage: StageSpec, seen: dict[str, StageSpec], names: list[str], source: str, where: str) -> StageSpec:
    """The stage with its config block starting from the named earlier stage's
    (already merged) block. With from_stage the base's checkpoint field is left
    out: from_stage fills it."""
    base = seen.get(stage.config_from)
    if base is None:
        if stage.config_from in names:
            rule = "is this stage or a later one; config_from names an earlier stage"
        else:
            rule = "no stage of that name"
        _fail(source, f"{where}.config_from = {stage.config_from!r}: {rule}; earlier stages: {', '.join(seen) or 'none'}")
    config_cls, base_cls = WORKLOADS[stage.workload].config, WORKLOADS[base.workload].config
    if base_cls is not config_cls:
        _fail(source, f"{where}.config_from = {stage.config_from!r}: that stage's workload {base.workload!r} has config "
                      f"{base_cls.__name__}, this stage's {stage.workload!r} has {config_cls.__name__}; "
                      "config_from needs the same config class")
    base_config = dict(base.config)
    if stage.from_stage is not None:
        base_config.pop(config_cls.checkpoint_field, None)
    return stage.model_copy(update={"config": merge_configs(base_config, stage.config)})


def _absolute_paths(stage: StageSpec, config_cls, source: str) -> StageSpec:
    """The stage with the paths its config names relative to the sweep file (a dataset, a reward
    module) made absolute, in the config and in the grid: workers run in other directories."""
    resolve = getattr(config_cls, "resolve_relative_paths", None)
    if resolve is None:
        return stage
    base_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()
    grid = {key: [get_dotted_value(resolve(set_dotted({}, key, value), base_dir), key) for value in values]
            for key, values in stage.search.grid.items()}
    search = stage.search.model_copy(update={"grid": grid})
    return stage.model_copy(update={"config": resolve(stage.config, base_dir), "search": search})


def get_dotted_value(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values[part]
    return values


def _check_stages(spec: SweepSpec, source: str) -> SweepSpec:
    """Check every stage and return the spec with `config_from` blocks merged in."""
    seen: dict[str, StageSpec] = {}
    names = [stage.name for stage in spec.stages]
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}]"
        if stage.name in seen:
            _fail(source, f"{where}.name = {stage.name!r}: stage names must be unique")
        if stage.workload not in WORKLOADS:
            close = difflib.get_close_matches(stage.workload, list(WORKLOADS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(source, f"{where}.workload = {stage.workload!r}: unknown workload{hint}; allowed: {', '.join(sorted(WORKLOADS))}")
        config_cls = WORKLOADS[stage.workload].config
        if stage.from_stage is not None:
            if stage.from_stage not in seen:
                earlier = ", ".join(seen) or "none"
                _fail(source, f"{where}.from_stage = {stage.from_stage!r}: no earlier stage of that name; earlier stages: {earlier}")
            parent_cls = WORKLOADS[seen[stage.from_stage].workload][0]
            if not getattr(parent_cls, "produces_checkpoint", False):
                _fail(source, f"{where}.from_stage = {stage.from_stage!r}: workload {seen[stage.from_stage].workload!r} writes no checkpoint to start from")
            if getattr(config_cls, "checkpoint_field", None) is None:
                _fail(source, f"{where}.from_stage: workload {stage.workload!r} cannot start from a checkpoint")
            if getattr(config_cls, "checkpoint_field") in stage.config:
                field = config_cls.checkpoint_field
                _fail(source, f"{where}.config.{field}: set by from_stage={stage.from_stage!r}; remove it or remove from_stage")
        if stage.config_from is not None:
            stage = _config_from(stage, seen, names, source, where)
        stage = _absolute_paths(stage, config_cls, source)
        _check_config(stage, config_cls, source, where)
        seen[stage.name] = stage
    return spec.model_copy(update={"stages": list(seen.values())})


def _validate_values(stage: StageSpec, config_cls, values: dict, source: str, where: str):
    try:
        return validate_config(stage.workload, values)
    except pydantic.ValidationError as e:
        _fail(source, _format_error(e, config_cls, f"{where}.config"))


def _check_config(stage: StageSpec, config_cls, source: str, where: str) -> None:
    _validate_values(stage, config_cls, stage.config, source, where)
    search = stage.search
    if search.grid and search.optuna is not None:
        _fail(source, f"{where}.search: give either grid or optuna, not both")
    searched = list(search.grid) + (list(search.optuna.params) if search.optuna else [])
    for key in searched:
        if get_dotted(config_cls, key) is None:
            fields = list(config_cls.model_fields)
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(source, f"{where}.search: {key!r} is not a field of {config_cls.__name__}{hint}; allowed: {', '.join(fields)}")
    for key, values in search.grid.items():
        if not values:
            _fail(source, f"{where}.search.grid.{key}: the list of values is empty")
    # Every grid point is a config the workload accepts (cross-field rules included).
    for params in grid_points(stage):
        _validate_values(stage, config_cls, apply_params(stage.config, params), source, where)
    if search.optuna is not None:
        for key, dist in search.optuna.params.items():
            pwhere = f"{where}.search.optuna.params.{key}"
            if len(dist) != 1 or next(iter(dist)) not in _DISTRIBUTIONS:
                _fail(source, f"{pwhere} = {dist!r}: give exactly one of {', '.join(_DISTRIBUTIONS)}")
            kind, args = next(iter(dist.items()))
            if kind != "choice" and (len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]):
                _fail(source, f"{pwhere}.{kind} = {args!r}: give [low, high] numbers with low < high")
            if kind == "loguniform" and args[0] <= 0:
                _fail(source, f"{pwhere}.loguniform = {args!r}: bounds must be > 0")
            if kind == "choice" and not args:
                _fail(source, f"{pwhere}.choice: the list of values is empty")
            for bound in args:
                _validate_values(stage, config_cls, apply_params(stage.config, {key: bound}), source, pwhere)


def apply_params(config: dict, params: dict) -> dict:
    """A config block with a search point's {dotted key: value} set."""
    for key, value in params.items():
        config = set_dotted(config, key, value)
    return config


def grid_points(stage: StageSpec) -> list[dict]:
    """The cartesian product of the stage's grid as a list of {dotted key: value}."""
    keys = list(stage.search.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(stage.search.grid[k] for k in keys))]


# ---------------------------------------------------------------- trials


@dataclass(frozen=True)
class ResolvedTrial:
    stage: str
    workload: str
    trial_id: str  # "<stage>-<first 10 hex of config_hash>"
    config_hash: str
    params: dict  # the searched values
    parent_trial: str | None
    config: Any  # the typed workload config; checkpoint field = "@<stage>/<trial>" reference


def resolve_trial(stage: StageSpec, params: dict, parent_trial: str | None) -> ResolvedTrial:
    """Build the concrete config of one trial and its identity.

    A from_stage reference is stored as "@<stage>/<trial>" (not a path), so
    the hash -- and hence the trial id used for resumption -- does not change
    when results move between a laptop and a bucket.
    """
    values = apply_params(stage.config, params)
    config_cls = WORKLOADS[stage.workload].config
    if parent_trial is not None:
        values = set_dotted(values, config_cls.checkpoint_field, f"@{stage.from_stage}/{parent_trial}")
    config = validate_config(stage.workload, values)
    payload = json.dumps({"workload": stage.workload, "config": config.model_dump(mode="json")}, sort_keys=True)
    config_hash = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return ResolvedTrial(
        stage=stage.name,
        workload=stage.workload,
        trial_id=f"{stage.name}-{config_hash[:10]}",
        config_hash=config_hash,
        params=dict(params),
        parent_trial=parent_trial,
        config=config,
    )


def resolved_trials(spec: SweepSpec) -> list[dict]:
    """Every trial the sweep would run, as plain data: stage, trial id, workload,
    parent trial, searched values and the complete config (every default filled,
    the grid point applied, a `from_stage` checkpoint as the "@<stage>/<trial>"
    reference the driver fills in). A from_stage stage gets one trial per trial
    of its parent stage (the driver runs those whose parent finished).

    Optuna draws its points at run time, so an Optuna stage gives one entry per
    parent with its base config, the search space and no trial id; a stage that
    starts from it cannot know its parents' ids either, and shows the reference
    as "@<stage>/<trial drawn at run time>"."""
    entries: list[dict] = []
    trial_ids: dict[str, list[str] | None] = {}  # stage -> its trial ids; None: known only at run time
    for stage in spec.stages:
        if stage.from_stage is None:
            parents: list[str | None] = [None]
        else:
            parents = trial_ids[stage.from_stage] or [_DRAWN_AT_RUN_TIME]
        ids_known = stage.search.optuna is None and (stage.from_stage is None or trial_ids[stage.from_stage] is not None)
        stage_ids = []
        for parent in parents:
            if stage.search.optuna is not None:
                opt = stage.search.optuna
                base = resolve_trial(stage, {}, parent)
                entries.append({"stage": stage.name, "trial": None, "workload": stage.workload,
                                "parent_trial": parent,
                                "trials": f"{opt.num_samples} drawn by Optuna at run time",
                                "search_space": opt.model_dump(mode="json"),
                                "base_config": base.config.model_dump(mode="json")})
                continue
            for params in grid_points(stage) or [{}]:
                trial = resolve_trial(stage, params, parent)
                stage_ids.append(trial.trial_id)
                entries.append({"stage": stage.name, "trial": trial.trial_id if ids_known else None,
                                "workload": stage.workload, "parent_trial": parent, "params": params,
                                "config": trial.config.model_dump(mode="json")})
        trial_ids[stage.name] = stage_ids if ids_known else None
    for entry in entries:
        if entry["parent_trial"] is None:
            del entry["parent_trial"]
    return entries


_DRAWN_AT_RUN_TIME = "<trial drawn at run time>"


def resolved_trials_yaml(spec: SweepSpec, source: str) -> str:
    """`rlgrad validate --resolved`: resolved_trials as one YAML document."""
    entries = resolved_trials(spec)
    header = f"# {source}: {len(entries)} trial(s) or Optuna search(es); complete configs, defaults filled\n"
    return header + yaml.safe_dump({"sweep": spec.sweep, "trials": entries}, sort_keys=False, width=100)


def resolved_spec_yaml(spec: SweepSpec) -> str:
    """The spec as run: every default filled in, for <results>/<sweep>/sweep.yaml.
    `config_from` is left out: its block is merged into `config`, so a file that
    copies blocks and one that names them give the same sweep.yaml."""
    data = spec.model_dump(mode="json", exclude={"stages": {"__all__": {"config_from"}}})
    for stage_data, stage in zip(data["stages"], spec.stages):
        config = validate_config(stage.workload, stage.config).model_dump(mode="json")
        if stage.from_stage is not None:
            config[WORKLOADS[stage.workload].config.checkpoint_field] = f"@{stage.from_stage}"
        stage_data["config"] = config
    return yaml.safe_dump(data, sort_keys=False)
