"""The base of every workload config, and names shared by all of them.

Configs are pydantic models: unknown keys and wrong types are errors, every
field carries a description (`rlgrad config WORKLOAD` prints them), and
nothing here imports torch, so the driver validates a whole sweep before any
worker starts.
"""

from __future__ import annotations

import warnings
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict

# Reward-std thresholds: the shares of inputs under each are reported by
# extraction, the PPO / GRPO monitors and the report. One definition.
REWARD_STD_THRESHOLDS = (0.01, 0.05, 0.1)


class RlgradDeprecation(UserWarning):
    """An old spelling that still loads; the CLI prints it as one `rlgrad: deprecated:` line."""


def deprecated(message: str) -> None:
    """Say once per process that a config used an old spelling (`message` names the new one)."""
    warnings.warn(message, RlgradDeprecation, stacklevel=3)


class StrictConfig(BaseModel):
    """Unknown keys and wrong types are errors (no silent coercion of '8' to 8)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _increasing_positive(thresholds: list[float]) -> list[float]:
    if not thresholds or any(t <= 0 for t in thresholds) or sorted(set(thresholds)) != list(thresholds):
        raise ValueError(f"reward_std_thresholds must be positive and strictly increasing, got {thresholds}")
    return thresholds


# a config field holding reward-std thresholds, validated the same everywhere
Thresholds = Annotated[list[float], AfterValidator(_increasing_positive)]


def _type_name(annotation) -> str:
    """A field's type as a user writes its values: int, list[int], train|test, str | None."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is Any:
        return "Any"
    return getattr(annotation, "__name__", str(annotation))


def _yaml_value(value) -> str:
    """A default as it is written in a sweep file: 5000, train, null, [250, 100]."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return text.removesuffix("...").strip()


def config_models(annotation) -> list[type[BaseModel]]:
    """The config models a field holds: itself, Optional[M], or each member of a
    (discriminated) union of models such as ControlledConfig.model."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in config_models(a)]


def union_tag(model_cls: type[BaseModel]) -> str | None:
    """The `type` tag that picks this model in a discriminated union, if it has one."""
    field = model_cls.model_fields.get("type")
    return field.default if field is not None and isinstance(field.default, str) else None


def describe_fields(config_cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) of every field, nested configs
    expanded: `generation.temperature`; each member of a union of configs under
    its tag: `model[mlp].hidden_sizes`. A nested config's own row has the
    default "(below)"; a required field's default is "(required)"."""
    rows = []
    for name, field in config_cls.model_fields.items():
        nested = config_models(field.annotation)
        description = field.description or ""
        if len(nested) == 1:
            rows.append((prefix + name, nested[0].__name__, "(below)", description))
            rows.extend(describe_fields(nested[0], f"{prefix}{name}."))
            continue
        default = "(required)" if field.is_required() else _yaml_value(field.get_default(call_default_factory=True))
        if nested:  # a union of configs, told apart by their `type`
            tags = [union_tag(m) or m.__name__ for m in nested]
            rows.append((prefix + name, "|".join(tags), default, f"{description} (pick one by `type`)"))
            for tag, member in zip(tags, nested):
                rows.extend(describe_fields(member, f"{prefix}{name}[{tag}]."))
            continue
        rows.append((prefix + name, _type_name(field.annotation), default, description))
    return rows
