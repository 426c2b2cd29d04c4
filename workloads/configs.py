"""Typed, validated configs: one per workload.

This module imports no torch and builds no model, so the orchestrator can
validate a whole sweep file (and every point of its search space) before a
single Ray worker starts. Defaults are the paper's settings where the paper
gives one (see ../shared/reference/paper.md); where it is silent the default
says so in its comment.

Model names accepted everywhere a config says `model`:
  * ``builtin:tiny-gpt2`` / ``builtin:tiny-t5`` -- tiny models built from a
    config with the built-in character tokenizer (offline, random init);
  * a local directory holding a Hugging Face checkpoint (``save_pretrained``);
  * a Hugging Face hub id such as ``gpt2`` or ``t5-base`` (needs hub access).
The orchestrator fills `model` in with a checkpoint directory when a stage says
``from_stage: <earlier stage>``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_MODELS = ("builtin:tiny-gpt2", "builtin:tiny-t5")
BUILTIN_TASKS = ("reverse",)


class StrictConfig(BaseModel):
    """Unknown keys and wrong types are errors (no silent coercion of '8' to 8)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GenerationConfig(StrictConfig):
    """Sampling settings shared by extraction and (later) PPO rollouts."""

    temperature: float = Field(1.0, gt=0)  # paper: sampling temperature 1
    top_k: int = Field(0, ge=0)  # 0 disables top-k (ToTTo uses 0, IMDB 50, ...)
    top_p: float = Field(1.0, gt=0, le=1)
    min_new_tokens: int = Field(0, ge=0)
    max_new_tokens: int = Field(48, ge=1)  # IMDB: exactly 48 new tokens
    max_prompt_length: int = Field(512, ge=1)  # GRUE prompts are cut at 512

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        return self


class ExtractConfig(StrictConfig):
    """Sample extraction (paper section 4): K samples per input, their rewards,
    per-input reward mean/std and the per-input policy-gradient norm."""

    model: str = "builtin:tiny-gpt2"
    task: str = "reverse"  # built-in offline task; GRUE tasks arrive with issue 4
    split: Literal["train", "validation", "test"] = "train"
    num_inputs: int = Field(5000, ge=1)  # paper: 5,000 random train inputs
    num_samples_per_input: int = Field(10, ge=2)  # paper: 10 samples per input (K)
    seed: int = 7  # paper: fixed seed 7 for choosing the inputs
    generation: GenerationConfig = GenerationConfig()
    batch_size: int = Field(16, ge=1)  # prompts per generate() call (x K sequences)
    compute_grad_norm: bool = True
    grad_norm_dtype: Literal["float32", "float64"] = "float32"
    shard_size: int = Field(256, ge=1)  # inputs per Parquet shard (unit of resumption)
    reward_std_thresholds: list[float] = [0.01, 0.05, 0.1]  # reported shares


class SFTConfig(StrictConfig):
    """Teacher-forced cross-entropy finetuning for causal and seq2seq models.
    The paper gives no SFT hyperparameters; these defaults are the usual
    Hugging Face Trainer ones, small enough for the built-in task."""

    model: str = "builtin:tiny-gpt2"
    task: str = "reverse"
    num_train_inputs: int = Field(5000, ge=1)
    frac_train_samples: float = Field(1.0, gt=0, le=1)  # section 5.2: labelled fraction
    max_steps: int = Field(-1, ge=-1)  # section 5.2: step cap; -1 = run num_epochs
    num_epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_prompt_length: int = Field(512, ge=1)
    seed: int = 0
    log_every: int = Field(10, ge=1)


# name -> (config class, "module:function" of the workload entry point).
# Entry points are imported lazily so that this registry stays torch-free.
WORKLOADS: dict[str, tuple[type[StrictConfig], str]] = {
    "extract": (ExtractConfig, "workloads.extract:run_extract"),
    "sft": (SFTConfig, "workloads.sft:run_sft"),
}
