"""The config of PPO (workloads/text/ppo.py). Torch-free."""

from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field, model_validator

from ..core.config import REWARD_STD_THRESHOLDS, Thresholds
from .config import GenerationConfig, TextTaskConfig


class PPOConfig(TextTaskConfig):
    """PPO on a language model, with a live monitor of reward std and gradient norms.

    Actor-critic PPO (paper sections 4-5: "PPO" from the pretrained model and
    "PPO on supervised" from an SFT checkpoint), with a live monitor of
    per-input reward std and gradient norm.

    Defaults are the RL4LMs reference configs the paper used (paper.md, "PPO
    settings"): 5 epochs per rollout, minibatch 64, clip 0.2, lr 2e-6, initial
    KL coefficient 0.001-0.2 with an adaptive target, temperature 1. The
    rollout size (inputs_per_rollout x num_samples_per_input completions) is
    ours: RL4LMs collects 128-512 steps across 10 environments with one
    sample per prompt; K >= 2 samples per input make each input's reward
    std observable during training."""

    produces_checkpoint: ClassVar[bool] = True  # `from_stage: sft` fills `model` with the SFT checkpoint

    num_train_inputs: int = Field(5000, ge=1, description="train inputs the rollouts' prompts are drawn from")
    generation: GenerationConfig = Field(GenerationConfig(), description="rollout sampling (paper: temperature 1)")
    # rollouts
    num_rollouts: int = Field(100, ge=0, description="PPO iterations (a rollout, then ppo_epochs of updates); the tables' `step`")
    inputs_per_rollout: int = Field(32, ge=1, description="inputs drawn per rollout")
    num_samples_per_input: int = Field(4, ge=2, description="K completions per input: makes each input's reward std observable")
    # optimisation (RL4LMs reference configs)
    learning_rate: float = Field(2e-6, gt=0, description="Adam learning rate (paper: 1e-6 to 2e-6 for t5-base / gpt2)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    ppo_epochs: int = Field(5, ge=1, description="passes over each rollout (RL4LMs n_epochs: 5)")
    minibatch_size: int = Field(64, ge=1, description="completions per optimiser step, summed over workers (RL4LMs batch_size: 64)")
    clip_range: float = Field(0.2, gt=0, lt=1, description="policy ratio clip epsilon (RL4LMs: 0.2)")
    value_clip_range: Optional[float] = Field(0.2, gt=0, description="value clip; null = unclipped value loss")
    vf_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus (paper: 0 or 0.01; section 5.1 sweeps it)")
    gamma: float = Field(0.99, ge=0, le=1, description="discount of the per-token rewards")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    normalize_advantages: bool = Field(True, description="whiten advantages over the rollout's tokens")
    max_grad_norm: Optional[float] = Field(0.5, gt=0, description="gradient clipping norm; null = none")
    # KL penalty to the initial policy and its adaptive controller (Ziegler et al. 2019)
    kl_coef: float = Field(0.01, ge=0, description="initial KL penalty coefficient beta (paper: 0.001-0.2)")
    target_kl: Optional[float] = Field(0.1, gt=0, description="KL target of the adaptive controller; null = fixed kl_coef")
    kl_horizon: int = Field(10000, ge=1, description="controller horizon, in completions")
    # bookkeeping and the monitor
    seed: int = Field(0, description="seed of prompt choice and sampling")
    eval_every_rollouts: int = Field(0, ge=0, description="rollouts between monitor-set evaluations; 0 = only first and last")
    num_eval_inputs: int = Field(64, ge=1, description="fixed monitor set: the first train inputs of the pool")
    reward_std_thresholds: Thresholds = Field(list(REWARD_STD_THRESHOLDS), description="the monitor buckets inputs by reward std at these edges")
    monitor_grad_norm: bool = Field(True, description="per-input policy-gradient norms of every rollout")
    checkpoint_every_rollouts: int = Field(0, ge=0, description="rollouts between checkpoints; 0 = only at the end")

    @model_validator(mode="after")
    def _consistent(self):
        rollout_size = self.inputs_per_rollout * self.num_samples_per_input
        if self.minibatch_size > rollout_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) exceeds a rollout's "
                             f"{rollout_size} completions (inputs_per_rollout x num_samples_per_input)")
        if self.inputs_per_rollout > self.num_train_inputs:
            raise ValueError(f"inputs_per_rollout ({self.inputs_per_rollout}) exceeds num_train_inputs "
                             f"({self.num_train_inputs})")
        if self.num_eval_inputs > self.num_train_inputs:
            raise ValueError(f"num_eval_inputs ({self.num_eval_inputs}) exceeds num_train_inputs "
                             f"({self.num_train_inputs}): the monitor set is drawn from the train inputs")
        if self.target_kl is not None and self.kl_coef == 0:
            raise ValueError("an adaptive KL controller (target_kl) cannot grow a kl_coef of 0; "
                             "set kl_coef > 0 or target_kl: null")
        if self.reward == "task" and self.reward_args:
            raise ValueError("reward_args needs an explicit reward name (reward: task takes no arguments)")
        return self
