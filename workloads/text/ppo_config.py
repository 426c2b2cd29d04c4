"""The config of PPO (workloads/text/ppo.py). Torch-free."""

from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field, model_validator

from ..core.config import REWARD_STD_THRESHOLDS, Thresholds
from .config import (GRAD_NORM_OF, MODEL_DTYPE, TRAIN_DTYPE, GenerationConfig, GradNormOf, ModelDType, TextTaskConfig,
                     TrainDType)


class PPOConfig(TextTaskConfig):
    """PPO on a language model, with a live monitor of reward std and gradient norms.

    Actor-critic PPO (paper sections 4-5: "PPO" from the pretrained model and
    "PPO on supervised" from an SFT checkpoint), with a live monitor of
    per-input reward std and gradient norm.

    Semantics and defaults are RL4LMs' as apple/ml-rlgrad runs it (docs/fidelity.md):
    a rollout of 1,280 token transitions (n_steps 128 x 10 envs), 5 epochs of
    minibatches of 64 transitions (~100 optimiser steps per rollout), clip 0.2,
    unclipped value loss from a separate value network, advantages normalised per
    minibatch, log-probs at the sampling temperature, and the per-token KL
    controller. One deliberate difference: K >= 2 completions per input (RL4LMs
    draws one), so each input's reward std is observable during training."""

    produces_checkpoint: ClassVar[bool] = True  # `from_stage: sft` fills `model` with the SFT checkpoint

    num_train_inputs: int = Field(5000, ge=1, description=(
        "train inputs the rollouts' prompts are drawn from (all of the split when it has fewer)"))
    generation: GenerationConfig = Field(GenerationConfig(), description="rollout sampling (paper: temperature 1)")
    # rollouts
    num_rollouts: int = Field(100, ge=0, description="PPO iterations (a rollout, then ppo_epochs of updates); the tables' `step`")
    inputs_per_rollout: int = Field(8, ge=1, description=(
        "inputs drawn per sampling batch (RL4LMs: n_envs = 10 prompts per batch); batches are drawn until the "
        "rollout holds rollout_tokens transitions"))
    rollout_tokens: Optional[int] = Field(1280, ge=1, description=(
        "token transitions per rollout, all workers together (RL4LMs n_steps x n_envs: 128 x 10 for IMDB, "
        "CommonGen, DailyDialog; 256 x 10 NarrativeQA, ToTTo; 512 x 10 CNN/DM, IWSLT); exactly this many are "
        "kept in completion order and a completion cut short bootstraps from V at the cut, as RL4LMs' buffer "
        "does; null = one batch of inputs_per_rollout inputs, every token"))
    num_samples_per_input: int = Field(4, ge=2, description="K completions per input: makes each input's reward std observable")
    # optimisation (RL4LMs reference configs)
    learning_rate: float = Field(2e-6, gt=0, description="Adam learning rate (paper: 1e-6 to 2e-6 for t5-base / gpt2)")
    weight_decay: float = Field(1e-6, ge=0, description=(
        "AdamW weight decay, not applied to biases and LayerNorm (RL4LMs LMActorCriticPolicy: 1e-6)"))
    ppo_epochs: int = Field(5, ge=1, description="passes over each rollout (RL4LMs n_epochs: 5)")
    minibatch_size: int = Field(64, ge=1, description=(
        "token transitions per optimiser step, all workers together (RL4LMs batch_size: 64)"))
    clip_range: float = Field(0.2, gt=0, lt=1, description="policy ratio clip epsilon (RL4LMs: 0.2)")
    value_clip_range: Optional[float] = Field(None, gt=0, description=(
        "value clip; null = unclipped value loss (SB3 clip_range_vf, None in every reference config)"))
    vf_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus (paper: 0 or 0.01; section 5.1 sweeps it)")
    gamma: float = Field(0.99, ge=0, le=1, description="discount of the per-token rewards")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    normalize_advantages: bool = Field(True, description=(
        "normalise advantages over each minibatch's transitions (SB3 PPO normalize_advantage)"))
    max_grad_norm: Optional[float] = Field(0.5, gt=0, description="gradient clipping norm (SB3 PPO: 0.5); null = none")
    # KL penalty to the initial policy and its adaptive controller (Ziegler et al. 2019)
    kl_coef: float = Field(0.01, ge=0, description="initial KL penalty coefficient beta (paper: 0.001-0.2)")
    target_kl: Optional[float] = Field(0.1, gt=0, description=(
        "target of the adaptive controller for the rollout's per-token mean KL to the reference "
        "(RL4LMs kl_div.target_kl); null = fixed kl_coef"))
    # bookkeeping and the monitor
    seed: int = Field(0, description="seed of prompt choice and sampling")
    eval_every_rollouts: int = Field(0, ge=0, description="rollouts between monitor-set evaluations; 0 = only first and last")
    num_eval_inputs: int = Field(64, ge=1, description="fixed monitor set: the first train inputs of the pool")
    reward_std_thresholds: Thresholds = Field(list(REWARD_STD_THRESHOLDS), description="the monitor buckets inputs by reward std at these edges")
    dtype: ModelDType = Field("auto", description=MODEL_DTYPE)
    train_dtype: TrainDType = Field("float32", description=TRAIN_DTYPE)
    grad_norm_of: GradNormOf = Field("sampling_policy", description=GRAD_NORM_OF)
    monitor_grad_norm: bool = Field(True, description="per-input policy-gradient norms of every rollout")
    checkpoint_every_rollouts: int = Field(0, ge=0, description="rollouts between checkpoints; 0 = only at the end")

    @model_validator(mode="after")
    def _consistent(self):
        if self.rollout_tokens is not None and self.minibatch_size > self.rollout_tokens:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) exceeds a rollout's {self.rollout_tokens} "
                             "token transitions (rollout_tokens)")
        batch_tokens = self.inputs_per_rollout * self.num_samples_per_input * self.generation.max_new_tokens
        if self.rollout_tokens is None and self.minibatch_size > batch_tokens:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) exceeds a rollout's at most {batch_tokens} "
                             "token transitions (inputs_per_rollout x num_samples_per_input x max_new_tokens)")
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
