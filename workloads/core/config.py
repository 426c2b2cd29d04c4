"""The base of every workload config, and names shared by all of them.

Configs are pydantic models: unknown keys and wrong types are errors, every
field carries a description (`rlgrad config WORKLOAD` prints them), and
nothing here imports torch, so the driver validates a whole sweep before any
worker starts.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# Reward-std thresholds: the shares of inputs under each are reported by
# extraction, the PPO / GRPO monitors and the report. One definition.
REWARD_STD_THRESHOLDS = (0.01, 0.05, 0.1)


class StrictConfig(BaseModel):
    """Unknown keys and wrong types are errors (no silent coercion of '8' to 8)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _increasing_positive(thresholds: list[float]) -> list[float]:
    if not thresholds or any(t <= 0 for t in thresholds) or sorted(set(thresholds)) != list(thresholds):
        raise ValueError(f"reward_std_thresholds must be positive and strictly increasing, got {thresholds}")
    return thresholds


# a config field holding reward-std thresholds, validated the same everywhere
Thresholds = Annotated[list[float], AfterValidator(_increasing_positive)]


def describe_fields(config_cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) of every field, nested configs expanded."""
    rows = []
    for name, field in config_cls.model_fields.items():
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        if nested is not None:
            rows.append((prefix + name, nested.__name__, "(below)", field.description or ""))
            rows.extend(describe_fields(nested, prefix + name + "."))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        rows.append((prefix + name, type_name, repr(default), field.description or ""))
    return rows
