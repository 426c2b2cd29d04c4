"""The config of the GRPO family (workloads/text/grpo.py). Torch-free.

Semantics follow TRL's GRPO trainer (huggingface/trl, trl/trainer/grpo_trainer.py
and grpo_config.py): `variant` picks the advantage and the loss aggregation that
TRL's `loss_type` / `scale_rewards` pick, `epsilon_low` / `epsilon_high` are TRL's
`epsilon` / `epsilon_high`, `beta` is TRL's `beta` (KL to the reference, k3
estimator), `num_iterations` is TRL's μ. RLOO follows trl/trainer/rloo_trainer.py.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ..core.config import REWARD_STD_THRESHOLDS, Thresholds
from .config import (GRAD_NORM_OF, MODEL_DTYPE, TRAIN_DTYPE, GenerationConfig, GradNormOf, ModelDType,
                     SampledTaskConfig, TrainDType)

VARIANTS = ("grpo", "dr_grpo", "rloo", "dapo")
DAPO_EPSILON_HIGH = 0.28  # DAPO (Yu et al. 2025) clip-higher default


class GRPOConfig(SampledTaskConfig):
    """Critic-free group policy gradient: GRPO, Dr. GRPO, RLOO, DAPO, zero-std mitigations.

    Every sampled prompt's reward std and gradient norm is recorded at every step."""

    produces_checkpoint: ClassVar[bool] = True  # `from_stage: sft` = SFT warm start

    task: str = Field("arithmetic_d1", description="a text task; the math tasks have exact 0/1 rewards (workloads/text/math_tasks.py)")
    generation: GenerationConfig = Field(GenerationConfig(max_new_tokens=32, max_prompt_length=256),
                                         description="rollout sampling; `generation.temperature` is the temperature mitigation")
    # data and steps
    num_train_inputs: int = Field(64, ge=1, description="the prompt pool; it is also the fixed evaluation set sampled at the first and last step")
    num_steps: int = Field(10, ge=0, description="GRPO iterations (rollout -> advantages -> updates); the tables' `step` counts updates done")
    inputs_per_step: int = Field(16, ge=1, description="prompts trained on per step, summed over workers (TRL: per_device_train_batch_size x devices / num_generations)")
    num_samples_per_input: int = Field(8, description="K completions per prompt (TRL num_generations, default 8); a group method needs K >= 2")
    # the objective (TRL names in brackets)
    variant: Literal["grpo", "dr_grpo", "rloo", "dapo"] = Field("grpo", description=(
        "grpo: A=(r-mean)/(std+1e-4), loss = mean over completions of their token mean [loss_type grpo]; "
        "dr_grpo: A=r-mean, loss = token sum / (completions x max_new_tokens) [dr_grpo, scale_rewards none]; "
        "rloo: A=r - mean of the other K-1 (rloo_trainer), token-sum / tokens; "
        "dapo: A=(r-mean)/(std+1e-4), token-level loss over all tokens of the batch [dapo], clip-higher"))
    epsilon_low: float = Field(0.2, gt=0, lt=1, description="lower clip: ratio >= 1 - epsilon_low (TRL epsilon, default 0.2)")
    epsilon_high: Optional[float] = Field(None, gt=0, description="upper clip: ratio <= 1 + epsilon_high (TRL epsilon_high); null = epsilon_low, or 0.28 for dapo (DAPO paper)")
    beta: float = Field(0.0, ge=0, description="KL(pi || pi_ref) coefficient, k3 estimator per token (TRL beta, default 0: no reference model)")
    num_iterations: int = Field(1, ge=1, description="passes over each rollout (TRL num_iterations, mu; default 1)")
    minibatch_size: int = Field(64, ge=1, description="completions per optimiser step on each worker")
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate (TRL default 1e-6)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (TRL default 0)")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="gradient clipping (TRL/Trainer default 1.0); null = none")
    dtype: ModelDType = Field("auto", description=MODEL_DTYPE)
    train_dtype: TrainDType = Field("float32", description=TRAIN_DTYPE)
    # mitigations of zero-std groups
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling: drop groups whose K rewards are all equal and refill with new prompts")
    max_refill_rounds: int = Field(3, ge=0, description="dynamic sampling: refill rounds per step before training on what there is (DAPO max_num_gen_batches - 1)")
    selection: Literal["uniform", "variance"] = Field("uniform", description=(
        "uniform: a random draw from the pool; variance: the prompts with the largest p(1-p), p = running "
        "success estimate (Foster & Foerster 2025 'learnability'; Bae et al. 2025)"))
    skip_predicted_zero_std: bool = Field(False, description="GRESO-style: skip a prompt whose last history_window observations all had std 0 (with probability skip_probability) before rollout")
    skip_probability: float = Field(0.9, ge=0, le=1, description="chance that a predicted zero-std prompt is skipped; the rest are sampled and measure the prediction's precision")
    history_window: int = Field(2, ge=0, description="observations per prompt kept for the running estimates (p for variance selection, zero-std streak for skipping); 0 = none")
    # bookkeeping and the monitor
    seed: int = Field(0, description="seed of prompt choice and sampling")
    grad_norm_of: GradNormOf = Field("sampling_policy", description=GRAD_NORM_OF)
    monitor_grad_norm: bool = Field(True, description="per-prompt leave-one-out gradient norm of every sampled group (workloads.text.gradnorm)")
    reward_std_thresholds: Thresholds = Field(list(REWARD_STD_THRESHOLDS), description="monitor buckets by initial reward std at these edges")
    checkpoint_every_steps: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")

    @property
    def clip_high(self) -> float:
        if self.epsilon_high is not None:
            return self.epsilon_high
        return DAPO_EPSILON_HIGH if self.variant == "dapo" else self.epsilon_low

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_samples_per_input < 2:
            raise ValueError(f"num_samples_per_input (K) = {self.num_samples_per_input}: a group method needs K >= 2 "
                             "(the advantage compares each completion with its group)")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon_low:
            raise ValueError(f"epsilon_high ({self.epsilon_high}) < epsilon_low ({self.epsilon_low}): "
                             "DAPO's decoupled clip raises the upper bound, never lowers it")
        if self.history_window == 0 and (self.selection != "uniform" or self.skip_predicted_zero_std):
            rule = f"selection: {self.selection}" if self.selection != "uniform" else "skip_predicted_zero_std"
            raise ValueError(f"{rule} needs history (history_window >= 1): it ranks prompts by their past rewards")
        if self.inputs_per_step > self.num_train_inputs:
            raise ValueError(f"inputs_per_step ({self.inputs_per_step}) exceeds num_train_inputs ({self.num_train_inputs})")
        if self.reward == "task" and self.reward_args:
            raise ValueError("reward_args needs an explicit reward name (reward: task takes no arguments)")
        return self
