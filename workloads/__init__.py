"""The science: data, models, rewards, sampling, gradient norms, training loops.

Three parts, imports flowing one way (text and controlled -> core):
  core/        the context a workload runs in, table schemas and storage,
               hub/availability probing, local data, the config base
  text/        language-model RFT: models, tasks, rewards, sampling, gradient
               norms, and the extract / sft / ppo / grpo workloads
  controlled/  classifier "policies": SFT vs RFT (paper section 4.2)

Each workload is a plain function `run(config, ctx)` of its validated config
(which sits beside it and imports no torch) and a `WorkloadContext`; nothing
here imports Ray.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import NamedTuple

from .controlled.config import ControlledConfig
from .core.config import StrictConfig
from .noop import NoopConfig
from .text.extract_config import ExtractConfig
from .text.grpo_config import GRPOConfig
from .text.nlpo_config import NLPOConfig
from .text.ppo_config import PPOConfig
from .text.sft_config import SFTConfig


class Workload(NamedTuple):
    config: type[StrictConfig]
    entry: str  # "module:function", imported when the workload runs (the registry stays torch-free)


WORKLOADS: dict[str, Workload] = {
    "extract": Workload(ExtractConfig, "workloads.text.extract:run_extract"),
    "sft": Workload(SFTConfig, "workloads.text.sft:run_sft"),
    "ppo": Workload(PPOConfig, "workloads.text.ppo:run_ppo"),
    "nlpo": Workload(NLPOConfig, "workloads.text.ppo:run_ppo"),  # PPO's loop with NLPO's action mask
    "grpo": Workload(GRPOConfig, "workloads.text.grpo:run_grpo"),
    "controlled": Workload(ControlledConfig, "workloads.controlled.finetune:run_controlled"),
    "noop": Workload(NoopConfig, "workloads.noop:run_noop"),
}


def validate_config(workload: str, values: dict):
    """The typed config of `workload` built from plain values (raises pydantic.ValidationError)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; allowed: {sorted(WORKLOADS)}")
    return WORKLOADS[workload].config.model_validate(values)


def run_workload(workload: str, config, ctx):
    """Run `workload` with a config (typed, or plain values to validate) in `ctx`."""
    config_cls, entry = WORKLOADS[workload]
    if not isinstance(config, config_cls):
        config = validate_config(workload, config)
    if ctx.num_cpus is not None:
        threads = max(1, int(ctx.num_cpus))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        else:  # torch reads it when first imported; a workload without torch never pays that import
            os.environ["OMP_NUM_THREADS"] = str(threads)
    module_name, func_name = entry.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return func(config, ctx)
    finally:
        ctx.close()
