"""PPO reinforcement finetuning of a language model (paper sections 4-5), with a
live monitor of the vanishing-gradient signature. Semantics are RL4LMs' PPO as
apple/ml-rlgrad runs it (rl4lms/algorithms/ppo/ppo.py on stable-baselines3,
rl4lms/envs/text_generation/alg_wrappers.py, policy/causal_policy.py,
policy/seq2seq_policy.py, kl_controllers.py); docs/fidelity.md lists each one.

One PPO iteration ("rollout", the `step` of every table):

  1. rollout     batches of inputs_per_rollout inputs, K completions y ~ π_old(·|x) each,
                 until the rollout holds rollout_tokens token transitions (RL4LMs' buffer
                 of n_steps x n_envs); task reward R(x, y) per completion
  2. KL penalty  per output token t:  kl_t = log π_old(y_t|s_t) - log π_ref(y_t|s_t)
                 r_t = -β kl_t,  plus R(x, y) at the last token      (β = kl_coef;
                 π_old at the sampling temperature T, π_ref = the frozen initial model at T = 1,
                 as alg_wrappers.py computes raw_log_probs - ref_log_probs)
  3. GAE         δ_t = r_t + γ V(s_{t+1}) - V(s_t)    (V = 0 after the last token; a
                 completion cut at the rollout's end bootstraps from V at the cut)
                 A_t = δ_t + γλ A_{t+1},   return G_t = A_t + V(s_t)
  4. updates     ppo_epochs passes over the rollout's transitions in shuffled minibatches
                 of minibatch_size TOKENS (~100 optimiser steps for 1,280 / 64 x 5), minimising
                   L = L_clip + vf_coef L_value - ent_coef H
                 L_clip  = -mean min(Â_t ρ_t, Â_t clip(ρ_t, 1-ε, 1+ε)),  ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t)
                 Â_t     = (A_t - mean) / (std + 1e-8) over the minibatch   (SB3 normalize_advantage)
                 L_value = mean (G_t - V_θ(s_t))^2                            (SB3: F.mse_loss, unclipped)
                 H       = mean entropy of π_θ(·|s_t)
                 π_θ(·|s) = softmax(logits / T)   (forward_policy divides by the temperature)
  5. controller  β <- β (1 + 0.1 clip((KL - KL_target) / KL_target, -0.2, 0.2)),
                 KL = mean over the rollout's tokens of kl_t   (kl_controllers.py)
  6. monitor     per input: reward mean and std over its K completions (1/K) and the
                 norm of its policy gradient  ĝ(x) = (1/K) Σ_k (r_k - b_k) ∇ log π(y_k|x)
                 (leave-one-out baseline, workloads.text.gradnorm), bucketed by reward std.

The critic is a separate copy of the initial language model with a bias-free
linear value head on its last hidden state at the position that predicts y_t
(the decoder's, for seq2seq), trained in the same optimiser steps. Dropout stays
off throughout, as in the reference, whose update leaves the policy in eval mode
(ppo.py: `set_training_mode(True)` is commented out; alg_wrappers.py sets False).

PPO runs the RL loop every algorithm shares (workloads/text/rl_loop.py): before
training and at the end (and every `eval_every_rollouts` rollouts) a FIXED
monitor set -- the first `num_eval_inputs` inputs of the train pool -- gets K
samples each, written as `samples` and `inputs` rows at that step: per-input
reward improvement against initial reward std is the paper's evidence.

Under torch.distributed with world_size > 1 the actor-critic is one
DistributedDataParallel module, every rank takes its slice of each batch's
inputs and its share of rollout_tokens (and every world_size-th input of the
monitor set), and metrics are summed over ranks with all_reduce. Every rank
reports once per rollout plus once at the end.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core.context import WorkloadContext
from .gradnorm import reward_stats
from .models import load_model_and_tokenizer, output_logits, resolve_dtype, token_log_probs
from .nlpo import ActionMasker
from .nlpo_config import NLPOConfig
from .ppo_config import PPOConfig
from .rl_loop import RLRun, Ranks, bucket_of, std_buckets, train
from .sampling import Group, Prompts, ScoredSamples, choice_seed
from .tasks import task_of

VALUE_HEAD_FILE = "value_head.pt"
VALUE_MODEL_DIR = "value_model"  # the critic's language model, beside the policy's weights
MASK_MODEL_DIR = "mask_model"  # NLPO's mask policy
NO_WEIGHT_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # RL4LMs base_policy._setup_optimizer


# ============================================================================
# The math. Tensors are [completions, output tokens], right-padded; `mask` is
# 1.0 on real output tokens (EOS included) and 0.0 on padding.
# ============================================================================


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def kl_penalised_rewards(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor,
                         task_rewards: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -β (log π_old - log π_ref)_t, with the task reward
    added at each completion's last token. Returns (rewards, kl_t)."""
    kl = (log_probs - ref_log_probs) * mask
    rewards = -kl_coef * kl
    last_token = mask.sum(dim=1).long() - 1  # every completion has >= 1 token (EOS at least)
    rewards[torch.arange(len(rewards)), last_token] += task_rewards
    return rewards, kl


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           gamma: float, gae_lambda: float,
                           kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over each completion's output tokens, backwards in t:

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   G_t = A_t + V_t

    with V_{t+1} = A_{t+1} = 0 after the last token (the episode ends at EOS or
    at max_new_tokens). `kept` (default: `mask`) marks the tokens the rollout
    keeps: a completion cut short at its last kept token t bootstraps from
    V_{t+1} with A_{t+1} = 0, as stable-baselines3's buffer does for an episode
    still running when the buffer fills. Returns (advantages, returns), zero
    outside `kept`."""
    kept = mask if kept is None else kept
    num_tokens = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(num_tokens)):
        if t + 1 < num_tokens:  # padding after the end counts as terminal
            next_value = values[:, t + 1] * mask[:, t + 1]
            next_advantage = advantages[:, t + 1] * kept[:, t + 1]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * gae_lambda * next_advantage) * kept[:, t]
    returns = (advantages + values) * kept
    return advantages, returns


def normalized(advantages: torch.Tensor) -> torch.Tensor:
    """(A - mean) / (std + 1e-8) over a minibatch's transitions, std with the 1/(n-1)
    normalisation torch uses (SB3 PPO.train); a single transition is left as it is."""
    if advantages.numel() < 2:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def clipped_policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), to minimise:

        mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)) = -mean_t min(A_t ρ_t, A_t clip(ρ_t, ...)),
        ρ_t = exp(log π_θ - log π_old)

    The max of the negatives is the pessimistic bound: a ratio pushed past 1±ε
    in the direction the advantage favours earns nothing more (and no gradient).
    Also returns the share of tokens whose ratio was clipped and the approximate
    KL(π_old || π_θ) estimate mean((ρ - 1) - log ρ), >= 0."""
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean(((ratio - 1).abs() > clip_range).float(), mask),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float | None) -> torch.Tensor:
    """mean_t (G_t - V_θ(s_t))^2, SB3 PPO's F.mse_loss(returns, values_pred) (no ½);
    with clip_range, V_pred = V_old + clip(V_θ - V_old, -ε_v, ε_v) as SB3 clips it."""
    if clip_range is not None:
        values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return masked_mean((returns - values).square(), mask)


def update_kl_coef(kl_coef: float, kl: float, target_kl: float | None) -> float:
    """RL4LMs' adaptive KL controller (rl4lms/envs/text_generation/kl_controllers.py),
    fed the rollout's per-token mean KL after each rollout:

        β <- β · (1 + 0.1 · clip((KL - KL_target) / KL_target, -0.2, 0.2))"""
    if target_kl is None:
        return kl_coef
    error = min(max((kl - target_kl) / target_kl, -0.2), 0.2)
    return kl_coef * (1.0 + 0.1 * error)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, ranks: Ranks) -> float:
    """1 - Var(G - V) / Var(G) over the real tokens of all ranks: 1 = a perfect critic,
    <= 0 = no better than a constant. Variances from all-reduced sums of moments."""
    residual = returns - values
    m = ranks.sum_named({"count": mask.sum().item(), "g1": (returns * mask).sum().item(),
                         "g2": (returns.square() * mask).sum().item(), "e1": (residual * mask).sum().item(),
                         "e2": (residual.square() * mask).sum().item()})
    returns_variance = m["g2"] / m["count"] - (m["g1"] / m["count"]) ** 2
    residual_variance = m["e2"] / m["count"] - (m["e1"] / m["count"]) ** 2
    return math.nan if returns_variance <= 0 else 1 - residual_variance / returns_variance


# ============================================================================
# The actor-critic: the policy LM, a separate value LM with a bias-free linear
# head (RL4LMs causal_policy.py / seq2seq_policy.py _build_model_heads), in one
# module so that DistributedDataParallel averages the gradients of all three.
# ============================================================================


class ActorCritic(nn.Module):
    def __init__(self, policy_lm, value_lm, temperature: float):
        super().__init__()
        self.lm = policy_lm
        self.value_lm = value_lm
        self.value_head = nn.Linear(value_lm.config.hidden_size, 1, bias=False)  # default init, as the reference's
        self.temperature = temperature

    def forward(self, prompt_ids: list[list[int]], output_ids: list[list[int]],
                action_masks: torch.Tensor | None = None):
        """For every output token t: log π(y_t|s_t) and the entropy of π(·|s_t) with
        π = softmax(logits / T) (the reference's forward_policy) -- restricted to
        `action_masks` [B, T, V] where given (NLPO) -- and V(s_t) from the value LM's
        last hidden state at the same position. Alignment:
        workloads.text.models.output_logits. Returns (log_probs, entropy, values, mask), [B, T]."""
        logits, outputs, output_mask, _ = output_logits(self.lm, prompt_ids, output_ids)
        mask = output_mask.to(torch.float32)
        scaled = logits.float() / self.temperature
        if action_masks is not None:
            scaled = scaled.masked_fill(~action_masks, -float("inf"))
        all_log_probs = torch.log_softmax(scaled, dim=-1)
        log_probs = all_log_probs.gather(-1, outputs.unsqueeze(-1)).squeeze(-1) * mask
        # 0 log 0 = 0 outside the mask (filled before the product: -inf * 0 would poison the gradient)
        finite = all_log_probs if action_masks is None else all_log_probs.masked_fill(~action_masks, 0.0)
        entropy = -(all_log_probs.exp() * finite).sum(dim=-1) * mask
        _, _, _, hidden = output_logits(self.value_lm, prompt_ids, output_ids, with_hidden=True)
        values = self.value_head(hidden.float()).squeeze(-1) * mask
        return log_probs, entropy, values, mask


# ============================================================================
# The run: the actor-critic beside the shared RL run (workloads/text/rl_loop.py).
# ============================================================================


def optimizer_for(model: nn.Module, config: PPOConfig) -> torch.optim.Optimizer:
    """AdamW over the actor-critic, no weight decay on biases and LayerNorm (RL4LMs base_policy.py)."""
    named = list(model.named_parameters())
    decayed = [p for n, p in named if not any(nd in n for nd in NO_WEIGHT_DECAY)]
    exempt = [p for n, p in named if any(nd in n for nd in NO_WEIGHT_DECAY)]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": config.weight_decay},
                              {"params": exempt, "weight_decay": 0.0}], lr=config.learning_rate)


def train_pool(config: PPOConfig) -> list[int]:
    """The train inputs rollouts draw from: num_train_inputs of them at random (seed), all of the
    split when it has fewer (the reference's datapool uses every train input)."""
    task = task_of(config)
    return task.choose_inputs("train", min(config.num_train_inputs, task.split_size("train")), config.seed)


class PPORun(RLRun):
    """The policy and the critic (resumed or initial), the frozen reference, the optimiser, the
    KL controller and, for NLPO, the mask policy. The evaluation set (the "monitor set") is
    the first num_eval_inputs inputs of the pool."""

    name = "ppo"

    def __init__(self, config: PPOConfig, ctx: WorkloadContext):
        if config.inputs_per_rollout % ctx.world_size:
            raise ValueError(f"inputs_per_rollout ({config.inputs_per_rollout}) must be a multiple of the "
                             f"{ctx.world_size} workers (every rank takes the same number of inputs)")
        super().__init__(config, ctx, train_pool(config))
        self.eval_every, self.checkpoint_every = config.eval_every_rollouts, config.checkpoint_every_rollouts
        value_lm, _ = load_model_and_tokenizer(os.path.join(self.resume_from, VALUE_MODEL_DIR) if self.resume_from
                                               else config.model, self.device, config.train_dtype)
        reference, _ = load_model_and_tokenizer(config.model, self.device, config.train_dtype)
        self.reference = reference.eval().requires_grad_(False)  # π_ref = the initial policy
        self.actor_critic = ActorCritic(self.policy, value_lm, config.generation.temperature).to(self.device)
        self.actor_critic.eval()  # dropout off: see the module docstring
        self.optimizer = optimizer_for(self.actor_critic, config)
        self.kl_coef = config.kl_coef  # β, moved by the KL controller
        self.masker = None  # NLPO's mask policy
        if isinstance(config, NLPOConfig):
            self.masker = ActionMasker(self.policy, config.top_mask, config.min_tokens_to_keep,
                                       self.tokenizer.all_special_ids, config.target_update_iterations)
            self.logits_processor = self.masker.logits_processor
        self.restore()
        self.train_model = self.actor_critic
        if self.ranks.distributed:  # after loading: DDP broadcasts rank 0's parameters when it wraps them
            self.train_model = DistributedDataParallel(self.actor_critic)
        self.start_sampling(resolve_dtype(config.dtype, self.device))

    num_steps = property(lambda self: self.config.num_rollouts)
    evaluation_ids = property(lambda self: self.pool[: self.config.num_eval_inputs])
    sampling_batch = property(lambda self: self.config.inputs_per_rollout)

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def save_models(self, directory: str) -> None:
        """The critic (its LM and head) and NLPO's mask policy beside the policy's weights."""
        self.actor_critic.value_lm.save_pretrained(os.path.join(directory, VALUE_MODEL_DIR))
        torch.save(self.actor_critic.value_head.state_dict(), os.path.join(directory, VALUE_HEAD_FILE))
        if self.masker:
            self.masker.model.save_pretrained(os.path.join(directory, MASK_MODEL_DIR))

    def restore_state(self, state: dict, directory: str) -> None:
        """The controller, the value head and the mask policy (the value LM is loaded as a model)."""
        self.kl_coef = state["kl_coef"]
        self.actor_critic.value_head.load_state_dict(torch.load(os.path.join(directory, VALUE_HEAD_FILE),
                                                                map_location=self.device, weights_only=True))
        if self.masker:
            mask_lm, _ = load_model_and_tokenizer(os.path.join(directory, MASK_MODEL_DIR), self.device,
                                                  self.config.train_dtype)
            self.masker.refresh(mask_lm)

    def progress_fields(self, metrics: dict) -> dict[str, str]:
        return {"reward": f"{metrics['reward_mean']:.3f}", "kl": f"{metrics['kl']:.3f}"}

    def train_step(self, step: int) -> dict:
        return ppo_iteration(self, step)


# ============================================================================
# One PPO iteration: rollout, KL-penalised advantages, updates, controller.
# ============================================================================


@dataclass
class Rollout:
    groups: list[Group]  # this rank's inputs of the step (every sampling batch), K completions each
    prompts: Prompts  # the groups' prompts, as one batch
    scored: ScoredSamples  # their completions (prompt-major) with task rewards
    completion_prompt_ids: list[list[int]]  # each completion's prompt ids (prompt-major, K per input)
    kept_tokens: list[int]  # per completion: its first tokens that the rollout keeps (rollout_tokens)


@dataclass
class Targets:
    """What the update compares against, fixed for all ppo_epochs: π_old, V_old, A_t, G_t."""

    old_log_probs: torch.Tensor
    old_values: torch.Tensor
    mask: torch.Tensor  # every sampled token
    kept: torch.Tensor  # the tokens the rollout keeps: what the update trains on
    action_masks: torch.Tensor | None  # NLPO: the allowed tokens at every position [B, T, V]
    advantages: torch.Tensor
    returns: torch.Tensor
    token_kl: torch.Tensor  # log π_old - log π_ref per output token


UPDATE_STATISTICS = ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl")


def token_quota(config: PPOConfig, rank: int, world_size: int) -> int | None:
    """This rank's share of rollout_tokens (None: keep every token of one batch)."""
    if config.rollout_tokens is None:
        return None
    return config.rollout_tokens // world_size + (1 if rank < config.rollout_tokens % world_size else 0)


def collect_rollout(run: PPORun, step: int) -> Rollout:
    """1. Batches of inputs (the same draws on every rank, each rank its slice), K completions
    each, until every rank holds its share of rollout_tokens (RL4LMs: `while not buffer.full`)."""
    config, ctx = run.config, run.ctx
    draws = random.Random(choice_seed(config.seed, step))
    quota = token_quota(config, ctx.rank, ctx.world_size)
    groups = []
    while True:
        groups += run.sample_groups(ctx.my_items(draws.sample(run.pool, config.inputs_per_rollout)))
        tokens = sum(len(o) for g in groups for o in g.scored.outputs)
        short = quota is not None and tokens < quota
        if run.ranks.sum_named({"short": short})["short"] == 0:  # every rank has its share (or there is no cap)
            break
    prompts, scored = Group.joined(groups)
    kept, left = [], math.inf if quota is None else quota
    for output in scored.outputs:  # the buffer fills in completion order
        kept.append(int(min(len(output), left)))
        left -= kept[-1]
    return Rollout(groups, prompts, scored, [p for p in prompts.ids for _ in range(config.num_samples_per_input)],
                   kept)


def penalised_advantages(run: PPORun, rollout: Rollout) -> Targets:
    """2. KL penalty and 3. GAE, with π_old, π_ref and V_old fixed for the whole update."""
    config = run.config
    prompts, outputs = rollout.completion_prompt_ids, rollout.scored.outputs
    with torch.no_grad():
        action_masks = run.masker.rollout_masks(prompts, outputs) if run.masker else None
        old_log_probs, _, old_values, mask = run.actor_critic(prompts, outputs, action_masks)
        # the KL penalty reads the unmasked policy (alg_wrappers.py: raw_log_probs - ref_log_probs)
        raw_log_probs = old_log_probs if action_masks is None else run.actor_critic(prompts, outputs)[0]
        ref_log_probs, _ = token_log_probs(run.reference, prompts, outputs)
        task_rewards = rollout.scored.reward_matrix.flatten().float().to(run.device)
        token_rewards, token_kl = kl_penalised_rewards(raw_log_probs, ref_log_probs, mask, task_rewards, run.kl_coef)
        positions = torch.arange(mask.shape[1], device=mask.device)
        kept = (positions < torch.tensor(rollout.kept_tokens, device=mask.device)[:, None]).float() * mask
        advantages, returns = generalized_advantages(token_rewards, old_values, mask, config.gamma,
                                                     config.gae_lambda, kept)
    return Targets(old_log_probs, old_values, mask, kept, action_masks, advantages, returns, token_kl)


def ppo_update(run: PPORun, rollout: Rollout, targets: Targets) -> dict[str, float]:
    """4. ppo_epochs passes over the kept token transitions in shuffled minibatches of
    minibatch_size transitions (all ranks together; SB3 RolloutBuffer.get(batch_size));
    returns each of UPDATE_STATISTICS averaged over the minibatches of all ranks."""
    config = run.config
    positions = targets.kept.nonzero().cpu()  # (completion, token) of every kept transition
    total = run.ranks.sum_named({"positions": len(positions)})["positions"]
    # the same number of minibatches on every rank (each backward all-reduces), none empty
    num_minibatches = max(1, min(math.ceil(total / config.minibatch_size), run.ranks.min(len(positions))))
    sums = dict.fromkeys(UPDATE_STATISTICS, 0.0)
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(positions))
        for batch in order.tensor_split(num_minibatches):
            for name, value in minibatch_step(run, rollout, targets, positions[batch]).items():
                sums[name] += value
    totals = run.ranks.sum_named(sums)
    count = config.ppo_epochs * num_minibatches * run.ctx.world_size
    return {name: total / count for name, total in totals.items()}


def minibatch_step(run: PPORun, rollout: Rollout, targets: Targets, positions: torch.Tensor) -> dict[str, float]:
    """One optimiser step on L = L_clip + vf_coef L_value - ent_coef H over the transitions
    `positions` [(completion, token)]: their completions go through the actor-critic
    once, and the loss reads the minibatch's tokens only (SB3 PPO.train)."""
    config = run.config
    rows, row_of = torch.unique(positions[:, 0], return_inverse=True)
    outputs = [rollout.scored.outputs[i] for i in rows.tolist()]
    action_masks = None
    if targets.action_masks is not None:
        action_masks = targets.action_masks[rows.to(targets.action_masks.device)][:, : max(map(len, outputs))]
    new_log_probs, entropy, new_values, _ = run.train_model(
        [rollout.completion_prompt_ids[i] for i in rows.tolist()], outputs, action_masks)
    here, there = (row_of, positions[:, 1]), (positions[:, 0], positions[:, 1])  # in the minibatch / the rollout
    ones = torch.ones(len(positions), device=new_log_probs.device)
    advantages = targets.advantages[there]
    if config.normalize_advantages:
        advantages = normalized(advantages)
    policy_loss, stats = clipped_policy_loss(new_log_probs[here], targets.old_log_probs[there], advantages, ones,
                                             config.clip_range)
    critic_loss = value_loss(new_values[here], targets.old_values[there], targets.returns[there], ones,
                             config.value_clip_range)
    mean_entropy = entropy[here].mean()
    loss = policy_loss + config.vf_coef * critic_loss - config.ent_coef * mean_entropy
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.actor_critic.parameters(), config.max_grad_norm)
    run.optimizer.step()
    return {"policy_loss": policy_loss.item(), "value_loss": critic_loss.item(), "entropy": mean_entropy.item(),
            "clip_fraction": stats["clip_fraction"].item(), "approx_kl": stats["approx_kl"].item()}


def rollout_kl(run: PPORun, targets: Targets) -> float:
    """5. What the KL controller reads: the per-token mean of log π_old - log π_ref over
    every sampled token of the rollout, all ranks (alg_wrappers.py kl_div_mean)."""
    totals = run.ranks.sum_named({"kl": targets.token_kl.sum().item(), "tokens": targets.mask.sum().item()})
    return totals["kl"] / totals["tokens"]


def rollout_statistics(run: PPORun, scored: ScoredSamples, grad_norms: list[float | None]):
    """6. The monitor: reward, reward std and the shares under each threshold over the step's
    inputs (all ranks); and per reward-std bucket the inputs, reward and gradient norm.
    Returns (statistics, {bucket name: its statistics})."""
    config = run.config
    thresholds = config.reward_std_thresholds
    buckets = std_buckets(thresholds)
    reward_mean, reward_std, _ = reward_stats(scored.reward_matrix)
    sums = {"inputs": len(reward_std), "reward_std": reward_std.sum().item(), "reward": reward_mean.sum().item(),
            **{f"below_{t}": (reward_std < t).sum().item() for t in thresholds}}
    for name, _, _ in buckets:
        mine = [i for i in range(len(reward_std)) if bucket_of(reward_std[i].item(), buckets) == name]
        sums.update({f"{name}/inputs": len(mine), f"{name}/reward": sum(reward_mean[i].item() for i in mine),
                     f"{name}/grad_norm": sum(grad_norms[i] or 0.0 for i in mine)})
    sums = run.ranks.sum_named(sums)
    num_inputs = sums["inputs"]
    statistics = {"reward_mean": sums["reward"] / num_inputs, "reward_std_mean": sums["reward_std"] / num_inputs,
                  **{f"share_reward_std_below_{t}": sums[f"below_{t}"] / num_inputs for t in thresholds}}
    by_bucket = {}
    for name, _, _ in buckets:
        count = sums[f"{name}/inputs"]
        by_bucket[name] = {"num_prompts": count, "reward_mean": sums[f"{name}/reward"] / count if count else None}
        if config.monitor_grad_norm:
            by_bucket[name]["grad_norm"] = sums[f"{name}/grad_norm"] / count if count else None
    return statistics, by_bucket


def ppo_iteration(run: PPORun, step: int) -> dict:
    """Rollout -> (monitor) -> advantages -> updates -> controller; logs and returns the step's metrics."""
    config, ctx = run.config, run.ctx
    seconds = {}
    tic = time.perf_counter()
    rollout = collect_rollout(run, step)
    seconds["rollout_seconds"] = time.perf_counter() - tic

    tic = time.perf_counter()  # the monitor's gradient norms: before the update, at the policy that sampled
    grad_norms = run.grad_norms(rollout.groups)
    seconds["grad_norm_seconds"] = time.perf_counter() - tic

    tic = time.perf_counter()
    targets = penalised_advantages(run, rollout)
    if run.masker and step % run.masker.update_every == 0:  # after the rollout, before the update (nlpo.py learn)
        run.masker.refresh(run.policy)
    update = ppo_update(run, rollout, targets)
    run.refresh_sampling()  # the next rollout samples the updated policy
    seconds["update_seconds"] = time.perf_counter() - tic

    kl = rollout_kl(run, targets)
    kl_coef_used = run.kl_coef
    run.kl_coef = update_kl_coef(run.kl_coef, kl, config.target_kl)

    statistics, by_bucket = rollout_statistics(run, rollout.scored, grad_norms)
    num_tokens = run.ranks.sum_named({"tokens": targets.kept.sum().item()})["tokens"]
    metrics = {"step": step, **statistics, "kl": kl, "kl_coef": kl_coef_used, "next_kl_coef": run.kl_coef,
               **update, "explained_variance": explained_variance(targets.old_values, targets.returns, targets.kept,
                                                                  run.ranks),
               "rollout_tokens": num_tokens, **seconds}
    ctx.log_metrics(step, {k: v for k, v in metrics.items() if k != "step"})
    for name, bucket_metrics in by_bucket.items():
        ctx.log_metrics(step, bucket_metrics, split=name)
        metrics.update({f"{metric}_{name}": value for metric, value in bucket_metrics.items() if value is not None})
    return metrics


def run_ppo(config: PPOConfig, ctx: WorkloadContext) -> dict:
    return train(PPORun(config, ctx))
