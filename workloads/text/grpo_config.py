"""The config of the GRPO family (workloads/text/grpo.py). Torch-free.

The objective is TRL's (trl==1.16.0), under TRL's names and defaults:
`advantage_estimator: grpo` is trl/trainer/grpo_trainer.py (GRPOTrainer) with its
`loss_type`, `scale_rewards`, `epsilon` / `epsilon_high` / `delta`, `beta`,
`use_bias_correction_kl`, `num_iterations`, `mask_truncated_completions` and
`importance_sampling_level` (trl/trainer/grpo_config.py); `advantage_estimator:
rloo` is trl/trainer/rloo_trainer.py (RLOOTrainer) with `normalize_advantages`.
docs/fidelity.md ("TRL") lists each option and the test that pins it against TRL
itself (tests/test_trl_parity.py).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ..core.config import REWARD_STD_THRESHOLDS, Thresholds, deprecated
from .config import (GRAD_NORM_OF, MODEL_DTYPE, TRAIN_DTYPE, GenerationConfig, GradNormOf, ModelDType,
                     SampledTaskConfig, TrainDType)

# the fields that only TRL's GRPOTrainer reads (RLOOTrainer has none of them)
GRPO_ONLY = ("loss_type", "scale_rewards", "importance_sampling_level", "use_bias_correction_kl", "delta")
# the old `variant` (before TRL's names), as the TRL settings it stood for
VARIANTS = {
    "grpo": {"advantage_estimator": "grpo", "loss_type": "grpo", "scale_rewards": "group"},
    "dr_grpo": {"advantage_estimator": "grpo", "loss_type": "dr_grpo", "scale_rewards": "none"},
    "dapo": {"advantage_estimator": "grpo", "loss_type": "dapo", "scale_rewards": "group", "epsilon_high": 0.28},
    "rloo": {"advantage_estimator": "rloo"},
}


def _spelled(settings: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in settings.items())


class GRPOConfig(SampledTaskConfig):
    """Group policy gradient exactly as TRL computes it: GRPO, Dr. GRPO, DAPO, RLOO, ...

    Critic-free; TRL's loss types (grpo, bnpo, dr_grpo, dapo, cispo, luspo) and RLOO, with
    the zero-std mitigations. Every sampled prompt's reward std and gradient norm is
    recorded at every step."""

    produces_checkpoint: ClassVar[bool] = True  # `from_stage: sft` = SFT warm start
    # TRL's names of fields this config calls otherwise: refused with ours (spec.py)
    foreign_names: ClassVar[dict[str, str]] = {
        "num_generations": "num_samples_per_input",
        "max_completion_length": "generation.max_new_tokens",
        "max_prompt_length": "generation.max_prompt_length",
        "temperature": "generation.temperature",
        "top_p": "generation.top_p",
        "top_k": "generation.top_k",
        "per_device_train_batch_size": "minibatch_size",
        "reward_funcs": "reward",
    }

    task: str = Field("arithmetic_d1", description="a text task; the math tasks have exact 0/1 rewards (workloads/text/math_tasks.py)")
    generation: GenerationConfig = Field(GenerationConfig(max_new_tokens=32, max_prompt_length=256), description=(
        "rollout sampling; generation.temperature is also the temperature of every log-prob the update takes "
        "(TRL divides the logits by it), and the temperature mitigation; max_new_tokens is TRL's "
        "max_completion_length"))
    # data and steps
    num_train_inputs: int = Field(64, ge=1, description="the prompt pool; it is also the fixed evaluation set sampled at the first and last step")
    num_steps: int = Field(10, ge=0, description="GRPO iterations (rollout -> advantages -> updates); the tables' `step` counts updates done")
    inputs_per_step: int = Field(16, ge=1, description="prompts trained on per step, summed over workers (TRL: generation_batch_size / num_generations)")
    num_samples_per_input: int = Field(8, description="K completions per prompt (TRL num_generations, default 8); a group method needs K >= 2")
    # the objective, by TRL's names
    advantage_estimator: Literal["grpo", "rloo"] = Field("grpo", description=(
        "grpo: A = r - mean of the group, scaled by scale_rewards; the loss per loss_type, beta x k3 KL in the loss "
        "(TRL GRPOTrainer); rloo: A = r - mean of the other K-1 rewards, one importance ratio per completion from its "
        "summed log-probs, loss = mean over completions, beta x KL in the reward (TRL RLOOTrainer; veRL "
        "algorithm.adv_estimator)"))
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo"] = Field("dapo", description=(
        "how per-token losses are aggregated (TRL loss_type, default dapo): grpo = mean over completions of their "
        "token mean; bnpo = token mean of the minibatch; dr_grpo = token sum / (completions x max_new_tokens); "
        "dapo = token sum / (rollout tokens of all workers / optimiser steps per rollout); cispo = dapo's "
        "normaliser with clipped, detached importance weights on log-probs (MiniMax-M1); luspo = mean over "
        "completions of their token sum (LUSPO). grpo estimator only; TRL's sapo and vespo are not offered"))
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description=(
        "advantage scaling (TRL scale_rewards, default group): group = / (std of the group + 1e-4), batch = / (std "
        "of all the step's rewards + 1e-4), none = not scaled (Dr. GRPO); std with Bessel's correction as TRL's "
        "nanstd; true / false are TRL's spellings of group / none. grpo estimator only"))
    normalize_advantages: bool = Field(False, description=(
        "rloo estimator: (A - mean) / (std + 1e-4) over all the step's completions (TRL RLOOConfig, default false)"))
    epsilon: float = Field(0.2, gt=0, lt=1, description="lower clip: ratio >= 1 - epsilon (TRL epsilon, default 0.2)")
    epsilon_high: Optional[float] = Field(None, gt=0, description=(
        "upper clip: ratio <= 1 + epsilon_high (TRL epsilon_high; null = epsilon; DAPO recommends 0.28); with "
        "loss_type cispo, the cap of the detached importance weight (TRL; ScaleRL recommends 5.0)"))
    delta: Optional[float] = Field(None, gt=1, description=(
        "two-sided clipping: the unclipped ratio is also capped at delta (TRL delta, INTELLECT-2; null = off)"))
    beta: float = Field(0.0, ge=0, description=(
        "KL coefficient (TRL beta, default 0: no reference model). grpo: beta x k3 per token in the loss, "
        "k3 = exp(ref - logp) - (ref - logp) - 1; rloo: beta x sum over the completion of (log pi_old - log pi_ref) "
        "subtracted from its reward"))
    use_bias_correction_kl: bool = Field(True, description=(
        "grpo with beta > 0: multiply k3 by the (differentiable) importance ratio, the unbiased reverse-KL gradient "
        "of DeepSeek-V3.2 (TRL use_bias_correction_kl, default true; false = the plain k3 term)"))
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description=(
        "grpo: one ratio per token, or per completion from its mean log-ratio (GSPO) (TRL, default token)"))
    num_iterations: int = Field(1, ge=1, description="passes over each rollout (TRL num_iterations, mu; default 1)")
    mask_truncated_completions: bool = Field(False, description=(
        "completions that hit max_new_tokens without EOS get no loss and are not counted in a normaliser (TRL, "
        "default false; DAPO's overlong filtering)"))
    minibatch_size: int = Field(64, ge=1, description=(
        "completions per optimiser step on each worker (TRL per_device_train_batch_size x "
        "gradient_accumulation_steps); a rollout takes ceil(completions / minibatch_size) steps, the same on "
        "every worker (TRL steps_per_generation)"))
    minibatch_shuffle: Literal["groups", "completions"] = Field("groups", description=(
        "how a rollout is shuffled into its minibatches: groups keeps each prompt's K completions in one "
        "minibatch, so each prompt's share of an optimiser step is measured (update_grad_norm); completions "
        "shuffles the completions themselves (TRL). The same with one minibatch per rollout"))
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
    monitor_grad_norm: bool = Field(True, description=(
        "per-prompt gradient norms of every sampled group: the leave-one-out policy-gradient norm (grad_norm, "
        "workloads.text.gradnorm) and the prompt's share of the update (update_grad_norm), from the update's "
        "own backward where the algebra allows (workloads.text.update_grads)"))
    reward_std_thresholds: Thresholds = Field(list(REWARD_STD_THRESHOLDS), description="monitor buckets by initial reward std at these edges")
    checkpoint_every_steps: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")

    @property
    def upper_epsilon(self) -> float:
        """TRL's epsilon_high as used: epsilon when not set."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @model_validator(mode="before")
    @classmethod
    def _old_and_trl_spellings(cls, values):
        """`variant` (and `epsilon_low`) as the TRL fields they stood for, with a deprecation line;
        TRL's boolean scale_rewards as its names."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if "epsilon_low" in values:
            if "epsilon" in values:
                raise ValueError("give epsilon (TRL's name), not epsilon_low as well")
            values["epsilon"] = values.pop("epsilon_low")
            deprecated("grpo config field `epsilon_low` is now `epsilon` (TRL's name)")
        if "variant" in values:
            variant = values.pop("variant")
            if variant not in VARIANTS:
                raise ValueError(f"variant = {variant!r}: allowed grpo, dr_grpo, dapo, rloo (deprecated: use "
                                 "advantage_estimator, loss_type and scale_rewards)")
            settings = VARIANTS[variant]
            clash = {k: values[k] for k in settings if k in values and values[k] != settings[k]}
            if clash and not (variant == "dapo" and set(clash) == {"epsilon_high"}):
                raise ValueError(f"variant: {variant} means {_spelled(settings)}, which contradicts {_spelled(clash)}: "
                                 "drop `variant` (deprecated)")
            values = {**settings, **values}
            deprecated(f"grpo config field `variant: {variant}` is now `{_spelled(settings)}` (TRL's names)")
        if isinstance(values.get("scale_rewards"), bool):  # TRL: True = group, False = none
            values["scale_rewards"] = "group" if values["scale_rewards"] else "none"
        return values

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_samples_per_input < 2:
            raise ValueError(f"num_samples_per_input (K) = {self.num_samples_per_input}: a group method needs K >= 2 "
                             "(the advantage compares each completion with its group)")
        if self.advantage_estimator == "rloo":
            changed = [name for name in GRPO_ONLY if getattr(self, name) != type(self).model_fields[name].default]
            if changed:
                raise ValueError(f"{', '.join(changed)}: TRL's GRPOTrainer options, which advantage_estimator rloo "
                                 "(TRL's RLOOTrainer: one sequence-level loss) does not read; drop them or use "
                                 "advantage_estimator: grpo")
        elif self.normalize_advantages:
            raise ValueError("normalize_advantages is TRL's RLOOTrainer option (advantage_estimator: rloo); "
                             "the grpo estimator scales by scale_rewards")
        if self.loss_type != "cispo" and self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"epsilon_high ({self.epsilon_high}) < epsilon ({self.epsilon}): "
                             "DAPO's decoupled clip raises the upper bound, never lowers it")
        if self.history_window == 0 and (self.selection != "uniform" or self.skip_predicted_zero_std):
            rule = f"selection: {self.selection}" if self.selection != "uniform" else "skip_predicted_zero_std"
            raise ValueError(f"{rule} needs history (history_window >= 1): it ranks prompts by their past rewards")
        if self.inputs_per_step > self.num_train_inputs:
            raise ValueError(f"inputs_per_step ({self.inputs_per_step}) exceeds num_train_inputs ({self.num_train_inputs})")
        if self.reward == "task" and self.reward_args:
            raise ValueError("reward_args needs an explicit reward name (reward: task takes no arguments)")
        return self
