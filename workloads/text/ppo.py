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

Before training and at the end (and every `eval_every_rollouts` rollouts) a FIXED
monitor set -- the first `num_eval_inputs` inputs of the train pool -- gets K
samples each, written as `samples` and `inputs` rows at that step: per-input
reward improvement against initial reward std is the paper's evidence.

Under torch.distributed with world_size > 1 the actor-critic is one
DistributedDataParallel module, every rank takes its slice of each batch's
inputs and its share of rollout_tokens (and a contiguous chunk of the monitor
set), and metrics are summed over ranks with all_reduce. Every rank reports
once per rollout plus once at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..core.context import WorkloadContext
from .config import grad_norm_temperature
from .gradnorm import per_input_grad_norms, reward_stats
from .models import load_model_and_tokenizer, output_logits, resolve_dtype, sequence_log_probs, token_log_probs
from .nlpo import ActionMasker
from .nlpo_config import NLPOConfig
from .ppo_config import PPOConfig
from .rewards import get_reward
from .sampling import Prompts, SamplingModel, ScoredSamples, prompts_of, sample_and_score, table_rows
from .tasks import choose_inputs, get_examples, resolve_reward, split_size

VALUE_HEAD_FILE = "value_head.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "rlgrad_ppo_state.json"  # step done, kl_coef, initial monitor reward stds
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, sum_over_ranks) -> float:
    """1 - Var(G - V) / Var(G) over the real tokens of all ranks: 1 = a perfect critic,
    <= 0 = no better than a constant. Variances from all-reduced sums of moments."""
    residual = returns - values
    count, g1, g2, e1, e2 = sum_over_ranks(torch.stack([
        mask.sum(), (returns * mask).sum(), (returns.square() * mask).sum(),
        (residual * mask).sum(), (residual.square() * mask).sum()]).double()).tolist()
    returns_variance = g2 / count - (g1 / count) ** 2
    residual_variance = e2 / count - (e1 / count) ** 2
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
# The monitor: reward-std buckets.
# ============================================================================


def std_buckets(thresholds: list[float]) -> list[tuple[str, float, float]]:
    """[0.01, 0.05, 0.1] -> std_lt_0.01 [0, 0.01), std_0.01_0.05, std_0.05_0.1, std_ge_0.1 [0.1, inf)."""
    edges = [0.0, *thresholds, math.inf]
    names = [f"std_lt_{thresholds[0]}"]
    names += [f"std_{low}_{high}" for low, high in zip(thresholds, thresholds[1:])]
    names += [f"std_ge_{thresholds[-1]}"]
    return [(name, edges[i], edges[i + 1]) for i, name in enumerate(names)]


def bucket_of(std: float, buckets: list[tuple[str, float, float]]) -> str:
    return next(name for name, low, high in buckets if low <= std < high)


# ============================================================================
# What one run holds, and how it starts (fresh or from a checkpoint).
# ============================================================================


@dataclass
class PPORun:
    config: PPOConfig
    ctx: WorkloadContext
    device: torch.device
    distributed: bool
    tokenizer: object
    actor_critic: ActorCritic
    train_model: nn.Module  # actor_critic, wrapped in DistributedDataParallel under torch.distributed
    reference: nn.Module  # π_ref: the frozen initial policy
    optimizer: torch.optim.Optimizer
    reward_fn: object
    pool: list[int]  # the train inputs rollouts draw from; the monitor set is its head
    masker: ActionMasker | None = None  # NLPO's mask policy; None for PPO
    step: int = 0  # rollouts done
    kl_coef: float = 0.0  # β, moved by the KL controller
    initial_monitor_std: dict[int, float] = field(default_factory=dict)  # monitor input -> reward std at step 0
    sampler: SamplingModel | None = None  # what generate() runs: the policy LM, or its copy in the sampling dtype

    @property
    def lm(self):
        return self.actor_critic.lm

    @property
    def monitor_ids(self) -> list[int]:
        return self.pool[: self.config.num_eval_inputs]

    def sum_over_ranks(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.distributed:
            tensor = tensor.to(self.device)  # NCCL reduces GPU tensors only
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.cpu()

    def prompts(self, input_ids: list[int]) -> tuple[list, Prompts]:
        examples = get_examples(self.config.task, "train", input_ids, self.config.dataset_path)
        return examples, prompts_of(self.config.task, examples, self.tokenizer, self.config.generation,
                                    self.lm.config.is_encoder_decoder, "ppo")

    def sample(self, prompts: Prompts) -> ScoredSamples:
        return sample_and_score(self.sampler.model, self.tokenizer, self.reward_fn, prompts, self.config.num_samples_per_input,
                                self.config.generation, self.masker.logits_processor if self.masker else None)

    def grad_norms(self, prompts: Prompts, scored: ScoredSamples) -> list[float | None]:
        """Each input's leave-one-out policy-gradient norm (workloads.text.gradnorm), or None when off."""
        if not self.config.monitor_grad_norm:
            return [None] * len(prompts.ids)
        temperature = grad_norm_temperature(self.config.grad_norm_of, self.config.generation)
        return per_input_grad_norms(self.lm, prompts.ids, scored.outputs_by_input(), scored.reward_matrix,
                                    temperature=temperature).tolist()


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
    size = min(config.num_train_inputs, split_size(config.task, "train", config.dataset_path))
    return choose_inputs(config.task, "train", size, config.seed, config.dataset_path)


def start_run(config: PPOConfig, ctx: WorkloadContext) -> PPORun:
    """The policy and the critic (resumed or initial), the frozen reference, the optimiser and the data."""
    if config.inputs_per_rollout % ctx.world_size:
        raise ValueError(f"inputs_per_rollout ({config.inputs_per_rollout}) must be a multiple of the "
                         f"{ctx.world_size} workers (every rank takes the same number of inputs)")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    device = torch.device(ctx.device)
    resuming = bool(ctx.resume_from) and os.path.isdir(ctx.resume_from)
    lm, tokenizer = load_model_and_tokenizer(ctx.resume_from if resuming else config.model, device, config.train_dtype)
    value_lm, _ = load_model_and_tokenizer(os.path.join(ctx.resume_from, VALUE_MODEL_DIR) if resuming
                                           else config.model, device, config.train_dtype)
    reference, _ = load_model_and_tokenizer(config.model, device, config.train_dtype)  # π_ref = the initial policy
    reference.eval().requires_grad_(False)
    actor_critic = ActorCritic(lm, value_lm, config.generation.temperature).to(device)
    actor_critic.eval()  # dropout off: see the module docstring
    run = PPORun(config, ctx, device, distributed, tokenizer, actor_critic, actor_critic, reference,
                 optimizer_for(actor_critic, config),
                 reward_fn=get_reward(*resolve_reward(config.task, config.reward, config.reward_args)),
                 pool=train_pool(config),
                 kl_coef=config.kl_coef)
    if isinstance(config, NLPOConfig):
        run.masker = ActionMasker(lm, config.top_mask, config.min_tokens_to_keep, tokenizer.all_special_ids,
                                  config.target_update_iterations)
    if resuming:
        load_checkpoint(run, ctx.resume_from)
    if distributed:  # after loading: DDP broadcasts rank 0's parameters when it wraps them
        run.train_model = DistributedDataParallel(actor_critic)
    run.sampler = SamplingModel(lm, resolve_dtype(config.dtype, device))  # after DDP's broadcast
    return run


# ============================================================================
# One PPO iteration: rollout, KL-penalised advantages, updates, controller.
# ============================================================================


@dataclass
class Rollout:
    prompts: Prompts  # this rank's inputs of the step (every sampling batch)
    scored: ScoredSamples  # K completions each, with task rewards
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
    draws = random.Random(config.seed * 1_000_003 + step)
    quota = token_quota(config, ctx.rank, ctx.world_size)
    batches = []
    while True:
        _, prompts = run.prompts(ctx.my_items(draws.sample(run.pool, config.inputs_per_rollout)))
        batches.append((prompts, run.sample(prompts)))
        tokens = sum(len(o) for _, scored in batches for o in scored.outputs)
        short = torch.tensor([float(quota is not None and tokens < quota)])
        if run.sum_over_ranks(short).item() == 0:  # every rank has its share (or there is no cap)
            break
    prompts = Prompts([t for p, _ in batches for t in p.texts], [i for p, _ in batches for i in p.ids],
                      [r for p, _ in batches for r in p.references])
    scored = ScoredSamples.of(config.num_samples_per_input, [o for _, s in batches for o in s.outputs],
                              [t for _, s in batches for t in s.texts], [r for _, s in batches for r in s.rewards])
    kept, left = [], math.inf if quota is None else quota
    for output in scored.outputs:  # the buffer fills in completion order
        kept.append(int(min(len(output), left)))
        left -= kept[-1]
    return Rollout(prompts, scored, [p for p in prompts.ids for _ in range(config.num_samples_per_input)], kept)


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
    total, fewest = (run.sum_over_ranks(torch.tensor([float(len(positions))])).item(),
                     run.sum_over_ranks(torch.tensor([float(len(positions))]), op=dist.ReduceOp.MIN).item())
    # the same number of minibatches on every rank (each backward all-reduces), none empty
    num_minibatches = max(1, min(math.ceil(total / config.minibatch_size), int(fewest)))
    sums = dict.fromkeys(UPDATE_STATISTICS, 0.0)
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(positions))
        for batch in order.tensor_split(num_minibatches):
            for name, value in minibatch_step(run, rollout, targets, positions[batch]).items():
                sums[name] += value
    totals = run.sum_over_ranks(torch.tensor([sums[name] for name in UPDATE_STATISTICS], dtype=torch.float64))
    count = config.ppo_epochs * num_minibatches * run.ctx.world_size
    return {name: total / count for name, total in zip(UPDATE_STATISTICS, totals.tolist())}


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
    total, count = run.sum_over_ranks(
        torch.tensor([targets.token_kl.sum().item(), targets.mask.sum().item()], dtype=torch.float64)).tolist()
    return total / count


def rollout_statistics(run: PPORun, scored: ScoredSamples, grad_norms: list[float | None]):
    """6. The monitor: reward, reward std and the shares under each threshold over the step's
    inputs (all ranks); and per reward-std bucket the inputs, reward and gradient norm.
    Returns (statistics, {bucket name: its statistics})."""
    config = run.config
    thresholds = config.reward_std_thresholds
    buckets = std_buckets(thresholds)
    names = [name for name, _, _ in buckets]
    reward_mean, reward_std, _ = reward_stats(scored.reward_matrix)
    sums = torch.tensor([float(len(reward_std)), reward_std.sum().item(), reward_mean.sum().item(),
                         *[(reward_std < t).sum().item() for t in thresholds]], dtype=torch.float64)
    bucket_sums = torch.zeros(len(buckets), 3, dtype=torch.float64)  # inputs, reward sum, grad-norm sum
    for i in range(len(reward_std)):
        b = names.index(bucket_of(reward_std[i].item(), buckets))
        bucket_sums[b] += torch.tensor([1.0, reward_mean[i].item(), grad_norms[i] or 0.0], dtype=torch.float64)
    sums, bucket_sums = run.sum_over_ranks(sums), run.sum_over_ranks(bucket_sums)
    num_inputs = sums[0].item()
    statistics = {"reward_mean": sums[2].item() / num_inputs, "reward_std_mean": sums[1].item() / num_inputs,
                  **{f"share_reward_std_below_{t}": sums[3 + j].item() / num_inputs for j, t in enumerate(thresholds)}}
    by_bucket = {}
    for b, name in enumerate(names):
        count, reward_sum, grad_sum = bucket_sums[b].tolist()
        by_bucket[name] = {"num_prompts": count, "reward_mean": reward_sum / count if count else None}
        if config.monitor_grad_norm:
            by_bucket[name]["grad_norm"] = grad_sum / count if count else None
    return statistics, by_bucket


def ppo_iteration(run: PPORun, step: int) -> dict:
    """Rollout -> (monitor) -> advantages -> updates -> controller; logs and returns the step's metrics."""
    config, ctx = run.config, run.ctx
    seconds = {}
    tic = time.perf_counter()
    rollout = collect_rollout(run, step)
    seconds["rollout_seconds"] = time.perf_counter() - tic

    tic = time.perf_counter()  # the monitor's gradient norms: before the update, at the policy that sampled
    grad_norms = run.grad_norms(rollout.prompts, rollout.scored)
    seconds["grad_norm_seconds"] = time.perf_counter() - tic

    tic = time.perf_counter()
    targets = penalised_advantages(run, rollout)
    if run.masker and step % run.masker.update_every == 0:  # after the rollout, before the update (nlpo.py learn)
        run.masker.refresh(run.lm)
    update = ppo_update(run, rollout, targets)
    run.sampler.refresh()  # the next rollout samples the updated policy
    seconds["update_seconds"] = time.perf_counter() - tic

    kl = rollout_kl(run, targets)
    kl_coef_used = run.kl_coef
    run.kl_coef = update_kl_coef(run.kl_coef, kl, config.target_kl)

    statistics, by_bucket = rollout_statistics(run, rollout.scored, grad_norms)
    num_tokens = run.sum_over_ranks(torch.tensor([targets.kept.sum().item()], dtype=torch.float64)).item()
    metrics = {"step": step, **statistics, "kl": kl, "kl_coef": kl_coef_used, "next_kl_coef": run.kl_coef,
               **update,
               "explained_variance": explained_variance(targets.old_values, targets.returns, targets.kept,
                                                        run.sum_over_ranks),
               "rollout_tokens": num_tokens, **seconds}
    ctx.log_metrics(step, {k: v for k, v in metrics.items() if k != "step"})
    for name, bucket_metrics in by_bucket.items():
        ctx.log_metrics(step, bucket_metrics, split=name)
        metrics.update({f"{metric}_{name}": value for metric, value in bucket_metrics.items() if value is not None})
    return metrics


# ============================================================================
# The fixed monitor set: the paper's evidence, written to the tables.
# ============================================================================


def evaluate_monitor_set(run: PPORun, step: int) -> None:
    """K samples for each monitor input (this rank's contiguous chunk), written as
    `samples` and `inputs` rows at `step`; logs the set's reward by INITIAL reward std."""
    rows = monitor_set_rows(run, step)
    if step == 0:  # every rank keeps every input's initial std (rank 0 checkpoints them)
        chunks = [{row["input_id"]: row["reward_std"] for row in rows}]
        if run.distributed:
            gathered = [None] * run.ctx.world_size
            dist.all_gather_object(gathered, chunks[0])
            chunks = gathered
        for part in chunks:
            run.initial_monitor_std.update(part)
    log_reward_by_initial_std(run, step, rows)


def monitor_set_rows(run: PPORun, step: int) -> list[dict]:
    """This rank's monitor `inputs` rows at `step`: sampled and written, or read back on a retry."""
    config, ctx = run.config, run.ctx
    monitor_ids = run.monitor_ids
    first = ctx.rank * len(monitor_ids) // ctx.world_size
    end = (ctx.rank + 1) * len(monitor_ids) // ctx.world_size
    shard = f"monitor-step-{step:09d}-inputs-{first:06d}-{end - 1:06d}"
    if end <= first:
        return []
    if ctx.writer.exists("inputs", shard):  # a retry: the rows are on disk already
        return ctx.writer.read("inputs", shard, ["input_id", "reward_mean", "reward_std"])
    torch.manual_seed(config.seed * 1_000_003 + 7919 * step + first)  # the same samples on a retry
    sample_rows, input_rows = [], []
    for batch_start in range(first, end, config.inputs_per_rollout):
        examples, prompts = run.prompts(monitor_ids[batch_start : min(end, batch_start + config.inputs_per_rollout)])
        scored = run.sample(prompts)
        with torch.no_grad():
            log_probs = sequence_log_probs(run.lm, [p for p in prompts.ids for _ in range(scored.num_samples_per_input)],
                                           scored.outputs).tolist()
        samples, inputs = table_rows(step, examples, prompts, scored, log_probs, run.grad_norms(prompts, scored),
                                     ctx.model_name(config.model), f"{config.task}/train")
        sample_rows += samples
        input_rows += inputs
    ctx.writer.write("samples", shard, sample_rows)  # samples first: `inputs` marks the shard done
    ctx.writer.write("inputs", shard, input_rows)
    return input_rows


def log_reward_by_initial_std(run: PPORun, step: int, rows: list[dict]) -> None:
    """The live version of the paper's plot: the monitor set's reward grouped by initial reward std."""
    buckets = std_buckets(run.config.reward_std_thresholds)
    names = [name for name, _, _ in buckets]
    sums = torch.zeros(len(buckets), 2, dtype=torch.float64)  # inputs, reward sum
    for row in rows:
        b = names.index(bucket_of(run.initial_monitor_std[row["input_id"]], buckets))
        sums[b] += torch.tensor([1.0, row["reward_mean"]], dtype=torch.float64)
    sums = run.sum_over_ranks(sums)
    total_count, total_reward = sums.sum(dim=0).tolist()
    run.ctx.log_metrics(step, {"reward_mean": total_reward / total_count, "num_inputs": total_count}, split="monitor")
    for b, name in enumerate(names):
        count, reward_sum = sums[b].tolist()
        run.ctx.log_metrics(step, {"reward_mean": reward_sum / count if count else None, "num_inputs": count},
                            split=f"monitor_initial_{name}")


# ============================================================================
# Checkpoints: weights + tokenizer (loadable by every workload), value head,
# optimiser and controller state.
# ============================================================================


def save_checkpoint(run: PPORun, step: int, directory: str) -> None:
    """Weights + tokenizer (loadable by every workload), the critic, optimiser and controller state."""
    run.lm.save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)
    run.actor_critic.value_lm.save_pretrained(os.path.join(directory, VALUE_MODEL_DIR))
    if run.masker:
        run.masker.model.save_pretrained(os.path.join(directory, MASK_MODEL_DIR))
    torch.save(run.actor_critic.value_head.state_dict(), os.path.join(directory, VALUE_HEAD_FILE))
    torch.save(run.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"step": step, "kl_coef": run.kl_coef,
                   "initial_monitor_std": {str(k): v for k, v in run.initial_monitor_std.items()}}, f)


def load_checkpoint(run: PPORun, directory: str) -> None:
    """The value head, optimiser and controller state of a checkpoint (the two LMs are loaded as models)."""
    def load(name):
        return torch.load(os.path.join(directory, name), map_location=run.device, weights_only=True)

    run.actor_critic.value_head.load_state_dict(load(VALUE_HEAD_FILE))
    if run.masker:
        mask_lm, _ = load_model_and_tokenizer(os.path.join(directory, MASK_MODEL_DIR), run.device,
                                              run.config.train_dtype)
        run.masker.refresh(mask_lm)
    run.optimizer.load_state_dict(load(OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    run.step, run.kl_coef = state["step"], state["kl_coef"]
    run.initial_monitor_std = {int(k): v for k, v in state["initial_monitor_std"].items()}


def report(run: PPORun, metrics: dict, checkpoint_step: int | None) -> None:
    """Every rank reports once; rank 0 hands over a checkpoint when one is due."""
    if checkpoint_step is None:
        run.ctx.report(metrics)
    else:
        run.ctx.report_checkpoint(metrics, lambda directory: save_checkpoint(run, checkpoint_step, directory))


# ============================================================================
# The workload.
# ============================================================================


def run_ppo(config: PPOConfig, ctx: WorkloadContext) -> dict:
    run = start_run(config, ctx)
    start_step = run.step
    if start_step == 0:
        evaluate_monitor_set(run, 0)
    progress = tqdm(range(start_step + 1, config.num_rollouts + 1), desc=f"ppo {ctx.model_name(config.model)}", unit="rollout",
                    disable=not (ctx.is_main and ctx.show_progress))
    metrics: dict = {}
    for step in progress:
        # every (step, rank) has its own seed: a run resumed at step s draws what an
        # uninterrupted run would have drawn from s on
        torch.manual_seed(config.seed * 1_000_003 + step * 1009 + ctx.rank)
        metrics = ppo_iteration(run, step)
        run.step = step
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
        last = step == config.num_rollouts  # the final monitor pass and checkpoint come after the loop
        if config.eval_every_rollouts and step % config.eval_every_rollouts == 0 and not last:
            evaluate_monitor_set(run, step)
        checkpoint_due = config.checkpoint_every_rollouts and step % config.checkpoint_every_rollouts == 0 and not last
        report(run, metrics, step if checkpoint_due else None)
    progress.close()

    # the end: the monitor set at the final policy, and the final checkpoint
    final_step = max(config.num_rollouts, start_step)
    if final_step > 0:
        evaluate_monitor_set(run, final_step)
    final_metrics = {**metrics, "step": final_step, "kl_coef": run.kl_coef}
    final_metrics.pop("next_kl_coef", None)
    report(run, final_metrics, final_step)
    return final_metrics
