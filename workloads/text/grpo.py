"""The GRPO family: group-based policy gradient without a critic, exactly as TRL
computes it, with every sampled prompt's reward std and gradient norm recorded and
the mitigations of zero-std groups as switches. It runs the RL loop every algorithm
shares (workloads/text/rl_loop.py); this file holds its math and its step.

The objective is TRL 1.16's (trl/trainer/grpo_trainer.py `_generate_and_score_completions`
for the advantages, `_get_per_token_logps_and_entropies` for the log-probs,
`_compute_loss` for the loss; trl/trainer/rloo_trainer.py for RLOO), option by option
under TRL's names (grpo_config.py); tests/test_trl_parity.py checks it against TRL
itself. For a prompt with K completions o_k and rewards r_k (mean r̄; s = the group's
std with Bessel's correction, TRL's `nanstd`):

  log-probs  every one (π_θ, π_old, π_ref) of softmax(logits / T), T = generation.temperature
  advantage  grpo:  A_k = (r_k - r̄) / (s + 1e-4)   scale_rewards group
                    A_k = (r_k - r̄) / (S + 1e-4)   batch (S: std of all the step's rewards)
                    A_k =  r_k - r̄                 none
             rloo:  A_k =  r'_k - (Σ_{j≠k} r'_j) / (K-1),  r'_k = r_k - β Σ_t (log π_old - log π_ref)_kt
                    (normalize_advantages: (A - mean) / (std + 1e-4) over the step's completions)
  ratio      ρ_kt = exp(log π_θ - log π_old)_kt per token; per completion exp(mean_t log-ratio) with
             importance_sampling_level sequence; RLOO: exp(Σ_t log π_θ - Σ_t log π_old)
  token loss ℓ_kt = -min(ρ A_k, clip(ρ, 1-ε, 1+ε_high) A_k)   (ρ also capped at delta when set)
             cispo: ℓ_kt = -min(ρ, ε_high)|detached · A_k · log π_θ(o_kt)
             + β k3_kt (· ρ_kt with use_bias_correction_kl),  k3 = exp(ref - logp) - (ref - logp) - 1
  loss       grpo    mean_k (1/|o_k|) Σ_t ℓ_kt           bnpo  Σ_kt ℓ_kt / tokens of the minibatch
             dr_grpo Σ_kt ℓ_kt / (completions · max_new_tokens)
             dapo, cispo  Σ_kt ℓ_kt / (tokens of the rollout on all workers / optimiser steps per rollout)
             luspo   mean_k Σ_t ℓ_kt                     rloo  mean_k -min(ρ_k A_k, clip(ρ_k) A_k)

π_old is the policy that sampled, fixed for the rollout; as in TRL, it is the current policy
detached (ratio 1) when one optimiser step consumes the rollout once, else computed when the
rollout is taken. A rollout is shuffled once and split into the same minibatches for every one
of its num_iterations passes (TRL buffers the split generation batch).

Every group whose K rewards are equal has A = 0 for all its completions (grpo; rloo with
β = 0): it adds nothing to the policy gradient and its measured leave-one-out gradient norm
is exactly 0 -- the vanishing-gradient case this workload tracks.

Deliberate differences from TRL (docs/fidelity.md, "TRL"): a prompt's K completions stay on
the worker that sampled them (no gather; group statistics are local, batch statistics are
all-reduced); no gradient accumulation (one minibatch per optimiser step); no vLLM
importance-sampling correction; causal prompts are scored with positions that count real
tokens (TRL counts from the left padding: the same for rotary models, not for GPT-2).

One step s (1..num_steps):
    choose    prompts of the pool: uniform, or by p(1-p) of a running success estimate;
              optionally skip prompts predicted zero-std from their history (GRESO-style)
    sample    K completions each, scored; dynamic sampling drops equal-reward groups and
              refills (DAPO), counting the extra rollouts
    record    one `inputs` row per sampled prompt (reward mean, std, K, std = 0, gradient norm)
    update    advantages, num_iterations passes of minibatch steps of the loss above
    monitor   zero-std share, rollouts spent on zero-std groups, reward by initial-std bucket

`step` in the tables counts optimiser updates of the policy that drew the samples: the
rollout of step s is written at step s-1. The pool is also the evaluation set, sampled in
full at step 0 (its rows are step 1's rollout: same policy, nothing sampled twice) and
after the last update (step num_steps).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core.context import WorkloadContext
from .gradnorm import batched_grad_norms_unsupported, leave_one_out_advantages
from .config import grad_norm_temperature
from .grpo_config import GRPOConfig
from .models import load_model_and_tokenizer, resolve_dtype, token_log_probs
from .rl_loop import RLRun, Ranks, train
from .sampling import Group, choice_seed, engine_seed, is_zero_std
from .tasks import task_of
from .update_grads import leave_one_out_from_update, update_backward
from .vllm_sampler import build_for

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


# ============================================================================
# The math (pure functions: tests check them by hand and against TRL).
# ============================================================================


def bessel_std(values: torch.Tensor, ranks: Ranks | None = None) -> float:
    """The std (1/(n-1)) of `values` on every rank together (TRL's nanstd of the gathered batch)."""
    values = values.double().flatten()
    mean = batch_mean(values, ranks)
    local = {"n": values.numel(), "squares": (values - mean).square().sum().item()}
    totals = ranks.sum_named(local) if ranks else local
    return math.sqrt(totals["squares"] / (totals["n"] - 1)) if totals["n"] > 1 else 0.0


def batch_mean(values: torch.Tensor, ranks: Ranks | None = None) -> float:
    """The mean of `values` on every rank together (0 when there are none)."""
    local = {"n": values.numel(), "sum": values.double().sum().item()}
    totals = ranks.sum_named(local) if ranks else local
    return totals["sum"] / totals["n"] if totals["n"] else 0.0


def group_advantages(rewards: torch.Tensor, scale_rewards: str, batch_std: float | None = None) -> torch.Tensor:
    """[G, K] rewards -> [G, K] GRPO advantages: r - group mean, divided by (std + 1e-4) of the
    group (scale_rewards group), of the whole batch (`batch_std`, scale_rewards batch), or not."""
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale_rewards == "group":
        return centred / (rewards.std(dim=-1, keepdim=True, correction=1) + STD_EPS)
    if scale_rewards == "batch":
        return centred / (batch_std + STD_EPS)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"scale_rewards = {scale_rewards!r}: allowed group, batch, none")


def rloo_advantages(rewards: torch.Tensor, normalize: bool, ranks: Ranks | None = None) -> torch.Tensor:
    """[G, K] (KL-penalised) rewards -> RLOO advantages r_k - mean of the other K-1; with
    `normalize`, (A - mean) / (std + 1e-4) over all completions of the batch (all ranks)."""
    advantages = leave_one_out_advantages(rewards.double())
    if not normalize:
        return advantages
    return (advantages - batch_mean(advantages, ranks)) / (bessel_std(advantages, ranks) + STD_EPS)


def truncated(outputs: list[list[int]], stop_ids: set[int]) -> torch.Tensor:
    """Bool [N]: the completions that end in no stop token (cut at max_new_tokens)."""
    return torch.tensor([not output or output[-1] not in stop_ids for output in outputs], dtype=torch.bool)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """TRL's per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_log_probs - log_probs
    return delta.exp() - delta - 1


def importance_weights(log_probs, old_log_probs, mask, level: str) -> torch.Tensor:
    """ρ = π_θ / π_old per token [B, T], or per completion [B, 1] from its mean log-ratio (GSPO)."""
    log_ratio = log_probs - old_log_probs
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return log_ratio.exp()


def grpo_loss(config: GRPOConfig, log_probs, old_log_probs, ref_log_probs, advantages, mask,
              dapo_normaliser: float, counts: tuple[float, float] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The minibatch loss of advantage_estimator grpo (trl grpo_trainer.py `_compute_loss`):
    log-probs [B, T] at the sampling temperature, advantages [B, 1], mask 1 on the tokens that
    count. Returns the loss and its statistics (region-clipped share of tokens, mean KL).
    `counts` (completions, tokens that count) of the whole minibatch, when the rows given are
    only part of it (the rest have no gradient and add nothing to any sum): the normalisers."""
    completions, tokens = counts or (log_probs.shape[0], mask.sum().item())
    weight = importance_weights(log_probs, old_log_probs, mask, config.importance_sampling_level)
    low, high = config.epsilon, config.upper_epsilon
    kl = None
    if config.beta > 0:
        kl = k3_kl(log_probs, ref_log_probs)
        if config.use_bias_correction_kl:  # DeepSeek-V3.2: the unbiased reverse-KL gradient
            kl = kl * weight
    if config.loss_type == "cispo":  # MiniMax-M1: clipped, detached importance weights on log π
        per_token = -weight.clamp(max=high).detach() * advantages * log_probs
        clipped = (weight > high) & (advantages > 0)
    else:
        bounded = weight.clamp(1 - low, 1 + high)
        if config.delta is not None:  # INTELLECT-2's two-sided clip
            weight = weight.clamp(max=config.delta)
        per_token = -torch.minimum(weight * advantages, bounded * advantages)
        clipped = ((weight < 1 - low) & (advantages < 0)) | ((weight > 1 + high) & (advantages > 0))
    if kl is not None:
        per_token = per_token + config.beta * kl
    masked = per_token * mask  # [B, T] (a [B, 1] sequence-level term counts once per token)
    if config.loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / completions
    elif config.loss_type == "bnpo":
        loss = masked.sum() / max(tokens, 1.0)
    elif config.loss_type == "dr_grpo":
        loss = masked.sum() / (completions * config.generation.max_new_tokens)
    elif config.loss_type in ("dapo", "cispo"):
        loss = masked.sum() / max(dapo_normaliser, 1.0)
    elif config.loss_type == "luspo":
        loss = masked.sum(-1).sum() / completions
    else:
        raise ValueError(f"loss_type = {config.loss_type!r}")
    tokens = max(tokens, 1.0)
    stats = {"clip_fraction": (clipped.expand_as(mask) * mask).sum() / tokens,
             "kl": (kl.expand_as(mask) * mask).sum() / tokens if kl is not None else torch.zeros(())}
    return loss, stats


def rloo_loss(config: GRPOConfig, log_probs, old_log_probs, ref_log_probs, advantages, mask,
              counts: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict]:
    """The minibatch loss of advantage_estimator rloo (trl rloo_trainer.py `_compute_loss`): one
    ratio per completion from its summed log-probs, clipped, averaged over completions. The KL
    is in the reward already; its statistic is TRL's per-token mean of log π - log π_ref.
    `counts`: as grpo_loss's."""
    completions, tokens = counts or (log_probs.shape[0], mask.sum().item())
    weight = ((log_probs - old_log_probs) * mask).sum(-1, keepdim=True).exp()
    bounded = weight.clamp(1 - config.epsilon, 1 + config.upper_epsilon)
    loss = -torch.minimum(weight * advantages, bounded * advantages).sum() / completions
    clipped = ((weight < 1 - config.epsilon) & (advantages < 0)) | ((weight > 1 + config.upper_epsilon) & (advantages > 0))
    kl = torch.zeros(()) if ref_log_probs is None else (
        ((log_probs.detach() - ref_log_probs) * mask).sum() / max(tokens, 1.0))
    return loss, {"clip_fraction": clipped.double().sum() / completions, "kl": kl}


# ============================================================================
# The update: a rollout's groups -> num_iterations passes of minibatch steps.
# ============================================================================


@dataclass
class Learner:
    """What an update touches: the policy (under DDP: `train_model`), π_ref, the optimiser."""

    config: GRPOConfig
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    ranks: Ranks
    reference: nn.Module | None = None  # π_ref, loaded only when beta > 0
    train_model: nn.Module | None = None  # the policy under DistributedDataParallel; None = the policy
    stop_ids: set[int] = field(default_factory=set)  # EOS (and pad): a completion ending otherwise was truncated
    # "auto": the update's backward forms each prompt's share of the gradient (update_grads.py) where the
    # model is covered and the policy is not under DDP; "autograd": an ordinary loss.backward()
    update_path: Literal["auto", "autograd"] = "auto"
    skip_zero_advantage: bool = True  # completions without a gradient are not run (False: benchmarks' before)

    def __post_init__(self):
        self.train_model = self.train_model or self.policy
        self.per_prompt = (self.update_path == "auto" and not self.ranks.distributed
                           and batched_grad_norms_unsupported(self.policy) is None)

    def log_probs(self, model, prompts, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(o_t | ...) per token, mask of real tokens) of `model` at the sampling temperature:
        TRL divides the logits of the policy, π_old and π_ref alike by it."""
        return token_log_probs(model, prompts, outputs, temperature=self.config.generation.temperature)


@dataclass
class Batch:
    """A rollout's training completions on this rank, prompt-major, fixed for the whole update."""

    prompts: list[list[int]]  # each completion's prompt ids
    outputs: list[list[int]]
    advantages: torch.Tensor  # [N] float64
    keep: torch.Tensor  # [N] bool: counts in the loss (mask_truncated_completions drops the truncated)
    num_minibatches: int  # optimiser steps per pass, the same on every rank
    loss_tokens: float  # tokens that count, all ranks together (DAPO's normaliser)
    old_log_probs: torch.Tensor | None = None  # [N, T] π_old; None = π_θ detached (ratio 1)
    ref_log_probs: torch.Tensor | None = None  # [N, T] π_ref, when beta > 0
    rewards: torch.Tensor | None = None  # [N / K, K] each group's rewards (the leave-one-out norm's weights)


def rollout_batch(learner: Learner, groups: list[Group]) -> Batch:
    """The advantages and the fixed log-probs of a rollout (trl `_generate_and_score_completions`)."""
    config, ranks = learner.config, learner.ranks
    K = config.num_samples_per_input
    prompts = [p for g in groups for p in g.prompts.ids for _ in range(K)]
    outputs = [o for g in groups for o in g.scored.outputs]
    rewards = torch.stack([g.rewards for g in groups]) if groups else torch.zeros(0, K, dtype=torch.float64)
    keep = torch.ones(len(outputs), dtype=torch.bool)
    if config.mask_truncated_completions:
        keep = ~truncated(outputs, learner.stop_ids)
    num_minibatches = ranks.max(max(1, math.ceil(len(outputs) / config.minibatch_size)))
    lengths = torch.tensor([len(o) for o in outputs], dtype=torch.float64)
    loss_tokens = ranks.sum_named({"tokens": (lengths * keep).sum().item()})["tokens"]
    rloo = config.advantage_estimator == "rloo"
    old = ref = None
    if outputs:
        with torch.no_grad():
            if rloo or num_minibatches > 1 or config.num_iterations > 1:
                old, _ = learner.log_probs(learner.policy, prompts, outputs)
            if learner.reference is not None:
                ref, _ = learner.log_probs(learner.reference, prompts, outputs)
    if rloo:
        if ref is not None:  # RLOO: β · Σ_t (log π_old - log π_ref) comes off the reward (padding is 0 in both)
            kl = ((old - ref) * keep.to(old.device)[:, None]).sum(-1).double().cpu().view(-1, K)
            rewards = rewards - config.beta * kl
        advantages = rloo_advantages(rewards, config.normalize_advantages, ranks)
    else:
        batch_std = bessel_std(rewards, ranks) if config.scale_rewards == "batch" else None
        advantages = group_advantages(rewards, config.scale_rewards, batch_std)
    return Batch(prompts, outputs, advantages.flatten(), keep, num_minibatches, loss_tokens, old, ref,
                 torch.stack([g.rewards for g in groups]) if groups else None)


UPDATE_STATISTICS = ("loss", "clip_fraction", "kl", "grad_norm_total")


@dataclass
class UpdateMonitor:
    """What an update measures of its rollout for the record, by group (the rollout's groups in
    order) and completion (prompt-major), with the update's own forward and backward.

    update_norms[g]    ||W_g||, group g's share of the gradient of the optimiser step that trained on
                       it, first pass, before clipping (update_grads.py); 0 when its completions all have
                       advantage 0 and there is no KL term
    loo_norms[g]       the leave-one-out policy-gradient norm ||ĝ(x_g)|| at the policy that sampled,
                       where the first optimiser step's backward gives it (update_grads.py says when)
    log_probs[j]       log π(y_j | x) at temperature 1 under the policy that sampled, from the first
                       optimiser step's forward
    at_rollout_policy  called once, after the first backward and before the first optimiser step,
                       while the policy is still the one that sampled: the caller measures there what
                       the update did not
    """

    want_norms: bool = True
    update_norms: dict[int, float] = field(default_factory=dict)
    loo_norms: dict[int, float] = field(default_factory=dict)
    log_probs: dict[int, float] = field(default_factory=dict)
    at_rollout_policy: Callable[["UpdateMonitor"], None] | None = None


def grpo_update(learner: Learner, groups: list[Group], order: list[int] | None = None,
                monitor: UpdateMonitor | None = None) -> dict[str, float]:
    """num_iterations passes over the rollout in the same num_minibatches minibatches (`order`: the
    completions in order of the split, random by default; minibatch_shuffle groups keeps a prompt's
    K completions in one minibatch); every rank takes the same number of optimiser steps (one
    with nothing to train on steps with a zero loss, so DDP's all-reduce still meets). Returns
    each of UPDATE_STATISTICS averaged over the steps, the same on every rank; fills `monitor`."""
    config = learner.config
    K = config.num_samples_per_input
    batch = rollout_batch(learner, groups)
    n, steps = len(batch.outputs), batch.num_minibatches
    if order is None and config.minibatch_shuffle == "groups":
        shuffled = torch.randperm(n // K).tolist()
        minibatches = [[g * K + k for g in shuffled[m * len(shuffled) // steps : (m + 1) * len(shuffled) // steps]
                        for k in range(K)] for m in range(steps)]
    else:
        order = torch.randperm(n).tolist() if order is None else order
        minibatches = [order[m * n // steps : (m + 1) * n // steps] for m in range(steps)]
    sums = dict.fromkeys(UPDATE_STATISTICS, 0.0)
    for iteration in range(config.num_iterations):
        for m, idx in enumerate(minibatches):
            step_monitor = monitor if iteration == 0 else None
            for name, value in minibatch_step(learner, batch, idx, step_monitor, first=iteration == m == 0).items():
                sums[name] += value
    means = learner.ranks.sum_named({name: sums[name] / (config.num_iterations * steps) for name in sums})
    return {name: value / learner.ranks.world_size for name, value in means.items()}


def minibatch_step(learner: Learner, batch: Batch, idx: list[int], monitor: UpdateMonitor | None = None,
                   first: bool = False) -> dict[str, float]:
    """One optimiser step on the loss of the completions `idx` (`first`: the rollout's first, taken
    at the policy that sampled). A completion with advantage 0 and no KL term has no gradient: it
    is not run through the model, and stays counted in every normaliser (the gradient is the same)."""
    config = learner.config
    K = config.num_samples_per_input
    learner.optimizer.zero_grad(set_to_none=True)
    idx = sorted(idx)  # a prompt's completions side by side (the loss does not depend on their order)
    counts = (len(idx), float(sum(len(batch.outputs[i]) for i in idx if batch.keep[i])))
    active = [i for i in idx if not (learner.skip_zero_advantage and batch.advantages[i] == 0 and config.beta == 0)]
    # DAPO: the rollout's tokens over its optimiser steps, per rank (DDP averages the ranks)
    normaliser = batch.loss_tokens / (learner.ranks.world_size * batch.num_minibatches)

    def loss_of(log_probs, mask):
        """The minibatch loss as a function of the active completions' log-probs [B, T]."""
        width = log_probs.shape[1]
        mask = mask * batch.keep[active].to(log_probs)[:, None]
        old = log_probs.detach() if batch.old_log_probs is None else batch.old_log_probs[active, :width]
        advantages = batch.advantages[active].to(device=log_probs.device, dtype=log_probs.dtype).unsqueeze(1)
        ref = None if batch.ref_log_probs is None else batch.ref_log_probs[active, :width]
        if config.advantage_estimator == "rloo":
            return rloo_loss(config, log_probs, old, ref, advantages, mask, counts)
        return grpo_loss(config, log_probs, old, ref, advantages, mask, normaliser, counts)

    prompts, outputs = [batch.prompts[i] for i in active], [batch.outputs[i] for i in active]
    runs = [(g, len(list(members))) for g, members in itertools.groupby(active, key=lambda i: i // K)]
    unit_log_probs = result = None
    if not active:  # nothing with a gradient: a zero loss through the model keeps DDP's collectives matched
        stop = min(learner.stop_ids) if learner.stop_ids else 0
        (learner.log_probs(learner.train_model, [[stop]], [[stop]])[0].sum() * 0.0).backward()
        loss, stats = torch.zeros(()), {"clip_fraction": torch.zeros(()), "kl": torch.zeros(())}
    elif learner.per_prompt:
        result = update_backward(learner.policy, prompts, outputs, [size for _, size in runs], loss_of,
                                 temperature=config.generation.temperature,
                                 per_prompt=monitor is not None and monitor.want_norms)
        loss, stats, unit_log_probs = result.loss, result.stats, result.unit_log_probs.sum(-1)
    else:
        log_probs, mask = learner.log_probs(learner.train_model, prompts, outputs)
        loss, stats = loss_of(log_probs, mask.to(log_probs.dtype))
        loss.backward()
        if config.generation.temperature == 1.0:
            unit_log_probs = log_probs.detach().sum(-1)
    if monitor is not None:
        measured = learner.per_prompt and monitor.want_norms  # the shares of this backward (0 when none ran)
        measure_update(monitor, config, batch, idx, active, runs, result, unit_log_probs, first, measured)
        if first and monitor.at_rollout_policy is not None:
            monitor.at_rollout_policy(monitor)  # the optimiser has not moved the policy yet
    total = torch.nn.utils.clip_grad_norm_(learner.policy.parameters(),
                                           config.max_grad_norm if config.max_grad_norm else float("inf"))
    learner.optimizer.step()
    if not active:
        return dict.fromkeys(UPDATE_STATISTICS, 0.0)
    return {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}, "grad_norm_total": float(total)}


def measure_update(monitor: UpdateMonitor, config: GRPOConfig, batch: Batch, idx: list[int], active: list[int],
                   runs: list[tuple[int, int]], result, unit_log_probs: torch.Tensor | None, first: bool,
                   measured: bool) -> None:
    """A minibatch's per-group shares of the gradient into the monitor (`measured`: by the per-prompt
    backward, or none ran); on the rollout's first step also the log-probs and the leave-one-out
    norms its forward and backward give."""
    K = config.num_samples_per_input
    whole = {g for g, members in itertools.groupby(idx, key=lambda i: i // K) if len(list(members)) == K}
    ran = [g for g, _ in runs]
    if measured:
        norms = {} if result is None else dict(zip(ran, result.squared.clamp(min=0).sqrt().tolist()))
        for g in whole:  # not run: no gradient, share 0; a group split across minibatches has no one share
            monitor.update_norms[g] = norms.get(g, 0.0)
    if not first:
        return
    if unit_log_probs is not None:
        monitor.log_probs.update(zip(active, unit_log_probs.tolist()))
    if result is None or result.squared is None:
        return
    if grad_norm_temperature(config.grad_norm_of, config.generation) != config.generation.temperature:
        return  # the leave-one-out norm is of another distribution than the update's
    for g in whole - set(ran):  # every completion skipped (advantage 0): ĝ = 0 when the rewards are equal
        if not leave_one_out_advantages(batch.rewards[g]).any():
            monitor.loo_norms[g] = 0.0
    kept, start = [], 0
    for g, size in runs:
        kept.append([i - g * K for i in active[start : start + size]])
        start += size
    tolerance = 1e-9 if result.token_weights.dtype == torch.float64 else 1e-4  # a recomputed π_old's rounding
    derived = leave_one_out_from_update(result.squared, result.token_weights, result.mask, batch.rewards[ran],
                                        kept, tolerance)
    for g, norm in zip(ran, derived):
        if g in whole and norm is not None:
            monitor.loo_norms[g] = norm


# ============================================================================
# Choosing prompts: uniform, p(1-p), and skipping predicted zero-std prompts.
# ============================================================================


def success_estimate(history: list[tuple[float, float]], window: int) -> float | None:
    """Running success estimate p of a prompt: the mean reward over its last `window`
    observations (each (reward mean, reward std)), clipped to [0, 1]; None without history."""
    recent = history[-window:]
    if not recent:
        return None
    return min(1.0, max(0.0, sum(mean for mean, _ in recent) / len(recent)))


def variance_order(pool: list[int], history: dict[int, list], window: int, rng: random.Random) -> list[int]:
    """The pool sorted by p(1-p), largest first (Foster & Foerster 2025 'learnability');
    a prompt never observed counts as p = 0.5; ties in a seeded random order."""
    keys = {i: rng.random() for i in pool}

    def score(i):
        p = success_estimate(history.get(i, []), window)
        return 0.25 if p is None else p * (1 - p)

    return sorted(pool, key=lambda i: (-score(i), keys[i]))


def predicted_zero_std(history: list[tuple[float, float]], window: int, tolerance: float = 0.0) -> bool:
    """GRESO-style prediction: the prompt's last `window` observations were all zero-std."""
    recent = history[-window:]
    return len(recent) == window and all(is_zero_std(std, tolerance) for _, std in recent)


@dataclass
class Choice:
    order: list[int]  # candidates in the order the step takes them (initial batch, then refills)
    predicted: set[int] = field(default_factory=set)  # predicted zero-std and still sampled (explored)
    skipped: list[int] = field(default_factory=list)  # predicted zero-std and skipped: rollouts saved


def choose_prompts(config: GRPOConfig, pool: list[int], history: dict, step: int) -> Choice:
    """The step's candidate order (the same on every worker)."""
    rng = random.Random(choice_seed(config.seed, step))
    if config.selection == "variance":
        order = variance_order(pool, history, config.history_window, rng)
    else:
        order = rng.sample(pool, len(pool))
    choice = Choice([])
    for i in order:
        if config.skip_predicted_zero_std and predicted_zero_std(history.get(i, []), config.history_window,
                                                                   config.zero_std_tolerance):
            if rng.random() < config.skip_probability:
                choice.skipped.append(i)
                continue
            choice.predicted.add(i)
        choice.order.append(i)
    return choice


# ============================================================================
# The run and its step.
# ============================================================================


@dataclass
class Rollout:
    sampled: list[Group]  # every group this rank sampled this step (dropped ones included)
    train: list[Group]  # the groups trained on
    refills: int = 0  # completions drawn to replace dropped groups
    choice: Choice | None = None


TOTALS = ("rollouts", "refill_rollouts", "skipped_prompts", "explored_predicted", "explored_predicted_zero",
          "unpredicted_zero", "unpredicted")


class GRPORun(RLRun):
    name = "grpo"

    def __init__(self, config: GRPOConfig, ctx: WorkloadContext):
        if config.inputs_per_step % ctx.world_size:
            raise ValueError(f"inputs_per_step ({config.inputs_per_step}) must be a multiple of the "
                             f"{ctx.world_size} workers")
        super().__init__(config, ctx, task_of(config).choose_inputs("train", config.num_train_inputs, config.seed))
        self.checkpoint_every = config.checkpoint_every_steps
        reference = None
        if config.beta > 0:  # π_ref: the initial policy, frozen
            reference, _ = load_model_and_tokenizer(config.model, self.device, config.train_dtype)
            reference.eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
        self.learner = Learner(config, self.policy, optimizer, self.ranks, reference,
                               stop_ids={self.tokenizer.eos_token_id, self.tokenizer.pad_token_id})
        self.optimizer = optimizer
        self.history: dict[int, list[tuple[float, float]]] = {}  # input -> [(reward mean, std)], all ranks
        self.totals = dict.fromkeys(TOTALS, 0.0)  # cumulative counters (refills, skips, predictions)
        self.cache: dict[int, Group] = {}  # step-0 evaluation groups, step 1's rollout
        self.restore()
        # sampler: vllm -- built from the weights the policy holds now (resumed or not), in the
        # sampling dtype, seeded once per rank; else generate() on the policy or its sampling-dtype copy
        sampling_dtype = resolve_dtype(config.dtype, self.device)
        engine = build_for(config, self.policy, self.tokenizer, self.resume_from or config.model, self.device,
                           seed=engine_seed(config.seed, ctx.rank), dtype=sampling_dtype)
        if self.ranks.distributed:  # after loading: DDP broadcasts rank 0's parameters when it wraps them
            self.learner.train_model = DistributedDataParallel(self.policy)
        self.start_sampling(sampling_dtype, engine)

    num_steps = property(lambda self: self.config.num_steps)
    evaluation_ids = property(lambda self: self.pool)
    sampling_batch = property(lambda self: self.config.inputs_per_step)

    def state(self) -> dict:
        return {"totals": self.totals, "history": {str(k): v for k, v in self.history.items()}}

    def restore_state(self, state: dict, directory: str) -> None:
        self.totals = state["totals"]
        self.history = {int(k): [tuple(o) for o in v] for k, v in state["history"].items()}

    def progress_fields(self, metrics: dict) -> dict[str, str]:
        return {"reward": f"{metrics['reward_mean']:.3f}", "zero_std": f"{metrics['share_zero_std']:.2f}"}

    def evaluation_groups(self, step: int) -> list[Group]:
        """The pool's groups; at step 0 every rank keeps all of them: they are step 1's rollout."""
        if step > 0:
            self.cache.clear()  # the step-0 samples are stale once the policy has moved
            return super().evaluation_groups(step)
        groups = super().evaluation_groups(step)
        self.observe(groups)
        for part in self.ranks.gather({g.input_id: g for g in groups}):
            self.cache.update(part)
        return groups

    def sample_groups(self, input_ids: list[int]) -> list[Group]:
        """K scored completions for each prompt, in order; cached step-0 groups are reused."""
        fresh = {g.input_id: g for g in super().sample_groups([i for i in input_ids if i not in self.cache])}
        return [self.cache.get(i) or fresh[i] for i in input_ids]

    def observe(self, groups: list[Group]) -> None:
        """Every rank's new (reward mean, std) observations into the shared history."""
        for part in self.ranks.gather({g.input_id: (g.rewards.mean().item(), g.std) for g in groups}):
            for input_id, observation in part.items():
                self.history[input_id] = self.history.get(input_id, []) + [observation]
                if self.config.history_window:
                    self.history[input_id] = self.history[input_id][-self.config.history_window:]

    def collect_rollout(self, step: int) -> Rollout:
        """Choose, sample; with dynamic sampling drop equal-reward groups and refill from the
        rank's next candidates, up to max_refill_rounds rounds (DAPO)."""
        config = self.config
        choice = choose_prompts(config, self.pool, self.history, step)
        candidates = self.ctx.my_items(choice.order)
        want = config.inputs_per_step // self.ctx.world_size
        sampled = self.sample_groups(candidates[:want])
        taken, refills = want, 0
        train_groups = list(sampled)
        if config.dynamic_sampling:
            train_groups = [g for g in sampled if not g.zero_std(config.zero_std_tolerance)]
            for _ in range(config.max_refill_rounds):
                missing = want - len(train_groups)
                if missing <= 0 or taken >= len(candidates):
                    break
                extra = self.sample_groups(candidates[taken : taken + missing])
                taken += len(extra)
                refills += len(extra) * config.num_samples_per_input
                sampled += extra
                train_groups += [g for g in extra if not g.zero_std(config.zero_std_tolerance)]
        return Rollout(sampled, train_groups, refills, choice)

    def train_step(self, step: int) -> dict:
        """Rollout -> update (measuring) -> record -> monitor; logs and returns the step's metrics."""
        seconds = {"monitor_seconds": 0.0}
        tic = time.perf_counter()
        rollout = self.collect_rollout(step)
        seconds["rollout_seconds"] = time.perf_counter() - tic
        fresh = [g for g in rollout.sampled if not (step == 1 and g.input_id in self.cache)]  # step 0 wrote the rest
        shard = f"train-step-{step:09d}-rank-{self.ctx.rank:03d}"
        measured = {}

        def at_rollout_policy(monitor: UpdateMonitor) -> None:
            tic = time.perf_counter()
            if not self.ctx.writer.exists("inputs", shard):  # a retry reuses the rows written
                measured.update(self.measure_rest(fresh, rollout.train, monitor))
            seconds["monitor_seconds"] += time.perf_counter() - tic

        tic = time.perf_counter()
        update = grpo_update(self.learner, rollout.train,
                             monitor=UpdateMonitor(self.config.monitor_grad_norm, at_rollout_policy=at_rollout_policy))
        self.refresh_sampling()
        seconds["update_seconds"] = time.perf_counter() - tic - seconds["monitor_seconds"]
        tic = time.perf_counter()
        self.record(step - 1, shard, fresh, **measured)
        self.observe(fresh)
        seconds["record_seconds"] = time.perf_counter() - tic
        if step == 1:
            self.cache.clear()  # the step-0 samples are stale once the policy has moved
        metrics = {"step": step, **self.step_statistics(rollout), **update, **seconds}
        self.ctx.log_metrics(step, {k: v for k, v in metrics.items() if k != "step"})
        entries = [(g.input_id, g.rewards.mean().item() - self.initial_reward[g.input_id],
                    g.zero_std(self.config.zero_std_tolerance))
                   for g in rollout.sampled]
        return {**metrics, **self.by_initial_std(step, entries, ("num_prompts", "reward_gain"), "")}

    def measure_rest(self, fresh: list[Group], trained: list[Group], monitor: UpdateMonitor) -> dict:
        """The `record` arguments of the fresh groups at the policy that sampled: what the update's
        first backward measured (monitor), the rest measured here -- the leave-one-out norms by the
        separate pass (gradnorm.py), the log-probs by a no-grad forward."""
        K = self.config.num_samples_per_input
        index = {id(g): i for i, g in enumerate(trained)}
        grad_norms, update_norms, log_probs = [], [], []
        for group in fresh:
            g = index.get(id(group))
            trained_norm = None if g is None else monitor.update_norms.get(g)
            loo = None if g is None else monitor.loo_norms.get(g)
            if loo is None and g is None and group.zero_std(0.0):
                loo = 0.0  # not trained (dynamic sampling dropped it): equal rewards, ĝ = 0 exactly
            grad_norms.append(loo if self.config.monitor_grad_norm else None)
            update_norms.append(trained_norm if self.config.monitor_grad_norm else None)
            sums = [] if g is None else [monitor.log_probs.get(g * K + k) for k in range(K)]
            log_probs.append(sums if sums and None not in sums else None)
        missing = [i for i, norm in enumerate(grad_norms) if norm is None]
        if self.config.monitor_grad_norm and missing:
            for i, norm in zip(missing, self.grad_norms([fresh[i] for i in missing])):
                grad_norms[i] = norm
        missing = [i for i, sums in enumerate(log_probs) if sums is None]
        if missing:
            prompts, scored = Group.joined([fresh[i] for i in missing])
            for i, sums in zip(missing, self.sequence_log_probs(prompts, scored)):
                log_probs[i] = sums
        return {"grad_norms": grad_norms, "update_grad_norms": update_norms,
                "log_probs": [value for sums in log_probs for value in sums]}

    def step_statistics(self, rollout: Rollout) -> dict[str, float]:
        """The monitor of one step, over all ranks: zero-std share, rollouts spent on zero-std
        groups, dynamic sampling's refills, GRESO's counts; reward of the sampled groups."""
        K = self.config.num_samples_per_input
        zero = [g for g in rollout.sampled if g.zero_std(self.config.zero_std_tolerance)]
        predicted = rollout.choice.predicted
        s = self.ranks.sum_named({
            "sampled": len(rollout.sampled), "zero": len(zero), "refills": rollout.refills,
            "trained": len(rollout.train), "reward": sum(g.rewards.mean().item() for g in rollout.sampled),
            "tokens": sum(len(o) for g in rollout.sampled for o in g.scored.outputs),
            "zero_tokens": sum(len(o) for g in zero for o in g.scored.outputs),
            "predicted": sum(1 for g in rollout.sampled if g.input_id in predicted),
            "predicted_zero": sum(1 for g in zero if g.input_id in predicted)})
        skipped = len(rollout.choice.skipped)
        t = self.totals
        t["rollouts"] += s["sampled"] * K
        t["refill_rollouts"] += s["refills"]
        t["skipped_prompts"] += skipped
        t["explored_predicted"] += s["predicted"]
        t["explored_predicted_zero"] += s["predicted_zero"]
        t["unpredicted"] += s["sampled"] - s["predicted"]
        t["unpredicted_zero"] += s["zero"] - s["predicted_zero"]
        n = s["sampled"]
        return {"reward_mean": s["reward"] / n if n else math.nan, "num_prompts_sampled": n,
                "share_zero_std": s["zero"] / n if n else math.nan, "num_prompts_trained": s["trained"],
                "rollouts": n * K, "rollouts_on_zero_std": s["zero"] * K,
                "share_tokens_on_zero_std": s["zero_tokens"] / s["tokens"] if s["tokens"] else math.nan,
                "refill_rollouts": s["refills"], "cumulative_refill_rollouts": t["refill_rollouts"],
                "skipped_prompts": skipped, "rollouts_saved": skipped * K,
                "cumulative_rollouts_saved": t["skipped_prompts"] * K, **prediction_quality(t, self.config)}


def prediction_quality(t: dict, config: GRPOConfig) -> dict[str, float]:
    """GRESO's prediction, from cumulative counts. Precision is measured on the predicted
    prompts that were sampled anyway (probability 1 - skip_probability, a random subset);
    recall = predicted zero-std / all zero-std, the skipped ones counted at that precision."""
    if not config.skip_predicted_zero_std:
        return {}
    precision = t["explored_predicted_zero"] / t["explored_predicted"] if t["explored_predicted"] else math.nan
    predicted_zero = (t["explored_predicted"] + t["skipped_prompts"]) * (0 if math.isnan(precision) else precision)
    all_zero = predicted_zero + t["unpredicted_zero"]
    return {"prediction_precision": precision,
            "prediction_recall": predicted_zero / all_zero if all_zero else math.nan}


def run_grpo(config: GRPOConfig, ctx: WorkloadContext) -> dict:
    return train(GRPORun(config, ctx))
