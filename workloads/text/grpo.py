"""The GRPO family: group-based policy gradient without a critic (GRPO, Dr. GRPO,
RLOO, DAPO), with every sampled prompt's reward std and gradient norm recorded,
and the mitigations of zero-std groups as switches.

Semantics follow TRL (huggingface/trl, trl/trainer/grpo_trainer.py:
`_generate_and_score_completions` for the advantages, `_compute_loss` for the
loss; trl/trainer/rloo_trainer.py for RLOO). For a prompt with K completions and
rewards r_1..r_K (mean r̄, std s with Bessel's correction as TRL's `nanstd`):

    grpo     A_k = (r_k - r̄) / (s + 1e-4)        loss = mean_k [ (1/|o_k|) Σ_t ℓ_kt ]
    dr_grpo  A_k =  r_k - r̄                      loss = Σ_k Σ_t ℓ_kt / (completions · max_new_tokens)
    dapo     A_k = (r_k - r̄) / (s + 1e-4)        loss = Σ_k Σ_t ℓ_kt / (tokens of the batch, all workers)
    rloo     A_k =  r_k - (Σ_{j≠k} r_j)/(K-1)    loss = mean_k ℓ_k with a SEQUENCE-level ratio (rloo_trainer)

    ℓ_t = -min(ρ_t A, clip(ρ_t, 1-ε_low, 1+ε_high) A) + β k3_t,   ρ_t = π_θ/π_old,
    k3_t = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1   (TRL's per-token KL)

Every group whose K rewards are equal has A = 0 for all its completions: it adds
nothing to the policy gradient (with β = 0) and its measured leave-one-out
gradient norm is exactly 0 -- the vanishing-gradient case this workload tracks.

Deliberate differences from TRL: (1) RLOO's KL is the same per-token k3 term as
GRPO's (TRL's RLOO subtracts β·KL from the reward); (2) a prompt's K completions
always sit on one worker, so group statistics need no gather; (3) `scale_rewards:
batch` is not offered.

One step s (1..num_steps), like CleanRL's ppo.py:
    choose    prompts of the pool: uniform, or by p(1-p) of a running success estimate;
              optionally skip prompts predicted zero-std from their history (GRESO-style)
    sample    K completions each, scored (workloads.text.sampling); dynamic sampling
              drops equal-reward groups and refills (DAPO), counting the extra rollouts
    record    one `inputs` row per sampled prompt (reward mean, std, K, std = 0, gradient norm)
    update    advantages, num_iterations passes of clipped-surrogate minibatch steps
    monitor   zero-std share, rollouts spent on zero-std groups, reward by initial-std bucket
    checkpoint

`step` in the tables counts optimiser updates of the policy that drew the samples:
the rollout of step s is written at step s-1. The pool is also the evaluation set,
sampled in full at step 0 (its rows are step 1's rollout: same policy, nothing
sampled twice) and after the last update (step num_steps).
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
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..core.context import WorkloadContext
from .config import grad_norm_temperature
from .gradnorm import per_input_grad_norms, reward_stats
from .grpo_config import GRPOConfig
from .models import load_model_and_tokenizer, resolve_dtype, token_log_probs
from .ppo import bucket_of, std_buckets
from .rewards import get_reward
from .sampling import Prompts, SamplingModel, ScoredSamples, prompts_of, sample_and_score, table_rows
from .tasks import choose_inputs, get_examples, resolve_reward
from .vllm_sampler import build_for

STATE_FILE = "rlgrad_grpo_state.json"
OPTIMIZER_FILE = "optimizer.pt"
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


# ============================================================================
# The math (pure functions: the tests check them against hand computation).
# ============================================================================


def group_advantages(rewards: torch.Tensor, variant: str) -> torch.Tensor:
    """[G, K] rewards -> [G, K] advantages of `variant` (module docstring)."""
    rewards = rewards.double()
    K = rewards.shape[-1]
    mean = rewards.mean(dim=-1, keepdim=True)
    if variant in ("grpo", "dapo"):
        return (rewards - mean) / (rewards.std(dim=-1, keepdim=True, correction=1) + STD_EPS)
    if variant == "dr_grpo":
        return rewards - mean
    if variant == "rloo":
        return rewards - (rewards.sum(dim=-1, keepdim=True) - rewards) / (K - 1)
    raise ValueError(f"unknown variant {variant!r}")


def clipped_token_loss(log_probs, old_log_probs, advantages, eps_low: float, eps_high: float):
    """-min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A) per token ([B, T]; advantages [B, 1] or [B, T])
    and the clipped-token indicator (TRL's is_low_clipped | is_high_clipped)."""
    ratio = (log_probs - old_log_probs).exp()
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    was_clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return loss, was_clipped


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """TRL's per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_log_probs - log_probs
    return delta.exp() - delta - 1


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, variant: str, max_new_tokens: int,
                   token_normaliser: float) -> torch.Tensor:
    """The variant's reduction of per-token losses [B, T] (mask 1 on real tokens)."""
    if variant == "grpo":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    if variant == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    if variant == "dapo":
        return (per_token * mask).sum() / max(token_normaliser, 1.0)
    raise ValueError(f"aggregate_loss: {variant!r} is sequence-level")


def policy_loss(config: GRPOConfig, log_probs, old_log_probs, ref_log_probs, advantages, mask,
                token_normaliser: float):
    """The minibatch loss of config.variant and its statistics (clip fraction, KL)."""
    if config.variant == "rloo":  # rloo_trainer: one ratio per sequence from summed log-probs
        seq, old_seq = (log_probs * mask).sum(1, keepdim=True), (old_log_probs * mask).sum(1, keepdim=True)
        per_seq, was_clipped = clipped_token_loss(seq, old_seq, advantages, config.epsilon_low, config.clip_high)
        loss = per_seq.mean()
        clip_fraction = was_clipped.float().mean()
    else:
        per_token, was_clipped = clipped_token_loss(log_probs, old_log_probs, advantages, config.epsilon_low,
                                                    config.clip_high)
        loss = None
        clip_fraction = (was_clipped.float() * mask).sum() / mask.sum().clamp(min=1.0)
    kl = torch.zeros((), device=log_probs.device)
    if config.beta > 0:
        token_kl = k3_kl(log_probs, ref_log_probs)
        kl = (token_kl * mask).sum() / mask.sum().clamp(min=1.0)
        if config.variant == "rloo":
            loss = loss + config.beta * ((token_kl * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
        else:
            per_token = per_token + config.beta * token_kl
    if loss is None:
        loss = aggregate_loss(per_token, mask, config.variant, config.generation.max_new_tokens, token_normaliser)
    return loss, {"clip_fraction": clip_fraction.item(), "kl": kl.item()}


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


def predicted_zero_std(history: list[tuple[float, float]], window: int) -> bool:
    """GRESO-style prediction: the prompt's last `window` observations all had reward std 0."""
    recent = history[-window:]
    return len(recent) == window and all(std == 0 for _, std in recent)


@dataclass
class Choice:
    order: list[int]  # candidates in the order the step takes them (initial batch, then refills)
    predicted: set[int] = field(default_factory=set)  # predicted zero-std and still sampled (explored)
    skipped: list[int] = field(default_factory=list)  # predicted zero-std and skipped: rollouts saved


def choose_prompts(config: GRPOConfig, pool: list[int], history: dict, step: int) -> Choice:
    """The step's candidate order (the same on every worker)."""
    rng = random.Random(config.seed * 1_000_003 + step)
    if config.selection == "variance":
        order = variance_order(pool, history, config.history_window, rng)
    else:
        order = rng.sample(pool, len(pool))
    choice = Choice([])
    for i in order:
        if config.skip_predicted_zero_std and predicted_zero_std(history.get(i, []), config.history_window):
            if rng.random() < config.skip_probability:
                choice.skipped.append(i)
                continue
            choice.predicted.add(i)
        choice.order.append(i)
    return choice


# ============================================================================
# What one run holds.
# ============================================================================


@dataclass
class Group:
    """One prompt's K completions, scored (this worker's)."""

    input_id: int
    example: object
    prompts: Prompts  # a Prompts of one prompt
    scored: ScoredSamples

    @property
    def rewards(self) -> torch.Tensor:
        return self.scored.reward_matrix[0]

    @property
    def std(self) -> float:
        return reward_stats(self.scored.reward_matrix)[1][0].item()


@dataclass
class GRPORun:
    config: GRPOConfig
    ctx: WorkloadContext
    device: torch.device
    distributed: bool
    tokenizer: object
    policy: torch.nn.Module
    train_model: torch.nn.Module  # policy, under DistributedDataParallel when distributed
    reference: torch.nn.Module | None  # π_ref, loaded only when beta > 0
    optimizer: torch.optim.Optimizer
    reward_fn: object
    pool: list[int]
    step: int = 0
    history: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # input -> [(mean, std)]
    initial_std: dict[int, float] = field(default_factory=dict)
    initial_reward: dict[int, float] = field(default_factory=dict)
    cache: dict[int, Group] = field(default_factory=dict)  # step-0 evaluation groups, reused by step 1
    engine: object | None = None  # sampler: vllm -- the engine the rollouts come from, refreshed after every update
    totals: dict[str, float] = field(default_factory=dict)  # cumulative counters (refills, skips, predictions)
    sampler: SamplingModel | None = None  # what generate() runs: the policy, or its copy in the sampling dtype

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.cpu()

    def max_over_ranks(self, value: int) -> int:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, obj):
        """[obj of every rank] (just [obj] on one worker)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj)
        return out


def start_run(config: GRPOConfig, ctx: WorkloadContext) -> GRPORun:
    if config.inputs_per_step % ctx.world_size:
        raise ValueError(f"inputs_per_step ({config.inputs_per_step}) must be a multiple of the "
                         f"{ctx.world_size} workers")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    device = torch.device(ctx.device)
    resuming = bool(ctx.resume_from) and os.path.isdir(ctx.resume_from)
    policy, tokenizer = load_model_and_tokenizer(ctx.resume_from if resuming else config.model, device,
                                                 config.train_dtype)
    policy.eval()  # dropout off: π_old and π_θ are the same function before the first update
    reference = None
    if config.beta > 0:
        reference, _ = load_model_and_tokenizer(config.model, device, config.train_dtype)
        reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    run = GRPORun(config, ctx, device, distributed, tokenizer, policy, policy, reference, optimizer,
                  get_reward(*resolve_reward(config.task, config.reward, config.reward_args)),
                  choose_inputs(config.task, "train", config.num_train_inputs, config.seed, config.dataset_path))
    run.totals = dict.fromkeys(TOTALS, 0.0)
    if resuming:
        load_checkpoint(run, ctx.resume_from)
    # sampler: vllm -- built from the weights the policy holds now (resumed or not), in the
    # sampling dtype, seeded once per rank; else generate() on the policy or its sampling-dtype copy
    sampling_dtype = resolve_dtype(config.dtype, device)
    run.engine = build_for(config, policy, tokenizer, ctx.resume_from if resuming else config.model, device,
                           seed=config.seed * 1_000_003 + ctx.rank, dtype=sampling_dtype)
    if distributed:
        run.train_model = DistributedDataParallel(policy)
    run.sampler = SamplingModel(policy, policy.dtype if run.engine is not None else sampling_dtype)  # after DDP's broadcast
    return run


TOTALS = ("rollouts", "refill_rollouts", "skipped_prompts", "explored_predicted", "explored_predicted_zero",
          "unpredicted_zero", "unpredicted")


# ============================================================================
# Sampling and recording.
# ============================================================================


def sample_groups(run: GRPORun, input_ids: list[int]) -> list[Group]:
    """K scored completions for each prompt (cached step-0 groups are reused), in order."""
    fresh = [i for i in input_ids if i not in run.cache]
    groups = {}
    config = run.config
    for start in range(0, len(fresh), config.inputs_per_step):
        chunk = fresh[start : start + config.inputs_per_step]
        examples = get_examples(config.task, "train", chunk, config.dataset_path)
        # rollouts are cut where the reference's RL environment cuts them (stage "ppo")
        prompts = prompts_of(config.task, examples, run.tokenizer, config.generation,
                             run.policy.config.is_encoder_decoder, "ppo")
        scored = sample_and_score(run.sampler.model, run.tokenizer, run.reward_fn, prompts,
                                  config.num_samples_per_input, config.generation, engine=run.engine)
        K = config.num_samples_per_input
        for j, (input_id, example) in enumerate(zip(chunk, examples)):
            rows = slice(j * K, (j + 1) * K)
            groups[input_id] = Group(input_id, example, prompts.subset([j]),
                                     ScoredSamples.of(K, scored.outputs[rows], scored.texts[rows], scored.rewards[rows]))
    return [run.cache[i] if i in run.cache else groups[i] for i in input_ids]


def record(run: GRPORun, step: int, groups: list[Group], shard: str) -> list[dict]:
    """`samples` and `inputs` rows of freshly sampled groups at `step`, with each prompt's
    gradient norm at the policy that sampled them; returns the `inputs` rows."""
    if not groups:
        return []
    config = run.config
    if run.ctx.writer.exists("inputs", shard):  # a retry: the rows are on disk already
        return run.ctx.writer.read("inputs", shard, ["input_id", "reward_mean", "reward_std", "grad_norm"])
    K = config.num_samples_per_input
    prompts = Prompts([t for g in groups for t in g.prompts.texts], [p for g in groups for p in g.prompts.ids],
                      [r for g in groups for r in g.prompts.references])
    scored = ScoredSamples.of(K, [o for g in groups for o in g.scored.outputs],
                              [t for g in groups for t in g.scored.texts], [r for g in groups for r in g.scored.rewards])
    grad_norms = [None] * len(groups)
    if config.monitor_grad_norm:
        grad_norms = per_input_grad_norms(run.policy, prompts.ids, scored.outputs_by_input(), scored.reward_matrix,
                                          temperature=grad_norm_temperature(config.grad_norm_of,
                                                                            config.generation)).tolist()
    with torch.no_grad():
        log_probs, _ = token_log_probs(run.policy, [p for p in prompts.ids for _ in range(K)], scored.outputs)
    sample_rows, input_rows = table_rows(step, [g.example for g in groups], prompts, scored,
                                         log_probs.sum(dim=1).tolist(), grad_norms, run.ctx.model_name(config.model),
                                         f"{config.task}/train")
    run.ctx.writer.write("samples", shard, sample_rows)  # samples first: `inputs` marks the shard done
    run.ctx.writer.write("inputs", shard, input_rows)
    return input_rows


def observe(run: GRPORun, groups: list[Group], initial: bool = False) -> None:
    """Every rank's new (reward mean, std) observations into the shared history."""
    mine = {g.input_id: (g.rewards.mean().item(), g.std) for g in groups}
    for part in run.gather(mine):
        for input_id, observation in part.items():
            run.history.setdefault(input_id, []).append(observation)
            if initial:
                run.initial_reward[input_id], run.initial_std[input_id] = observation
        if run.config.history_window:
            for input_id in part:
                run.history[input_id] = run.history[input_id][-run.config.history_window:]


def evaluate_pool(run: GRPORun, step: int) -> list[dict]:
    """The whole pool (this rank's every world_size-th prompt) sampled and recorded at `step`;
    at step 0 the groups are kept for step 1 on every rank, and initial stds noted."""
    torch.manual_seed(run.config.seed * 1_000_003 + 7919 * step + run.ctx.rank)
    mine = run.ctx.my_items(run.pool)
    groups = sample_groups(run, mine)
    rows = record(run, step, groups, f"eval-step-{step:09d}-rank-{run.ctx.rank:03d}")
    if step == 0:
        observe(run, groups, initial=True)
        for part in run.gather({g.input_id: g for g in groups}):
            run.cache.update(part)
    return rows


# ============================================================================
# One step: rollout (with dynamic sampling), update, monitor.
# ============================================================================


@dataclass
class Rollout:
    sampled: list[Group]  # every group this rank sampled this step (dropped ones included)
    train: list[Group]  # the groups trained on
    refills: int = 0  # completions drawn to replace dropped groups
    choice: Choice | None = None


def collect_rollout(run: GRPORun, step: int) -> Rollout:
    """Choose, sample; with dynamic sampling drop equal-reward groups and refill from the
    rank's next candidates, up to max_refill_rounds rounds (DAPO)."""
    config = run.config
    choice = choose_prompts(config, run.pool, run.history, step)
    candidates = run.ctx.my_items(choice.order)
    want = config.inputs_per_step // run.ctx.world_size
    sampled = sample_groups(run, candidates[:want])
    taken, refills = want, 0
    train = list(sampled)
    if config.dynamic_sampling:
        train = [g for g in sampled if g.std > 0]
        for _ in range(config.max_refill_rounds):
            missing = want - len(train)
            if missing <= 0 or taken >= len(candidates):
                break
            extra = sample_groups(run, candidates[taken : taken + missing])
            taken += len(extra)
            refills += len(extra) * config.num_samples_per_input
            sampled += extra
            train += [g for g in extra if g.std > 0]
    return Rollout(sampled, train, refills, choice)


def grpo_update(run: GRPORun, groups: list[Group]) -> dict[str, float]:
    """num_iterations passes of minibatch steps over this rank's training groups; the same
    number of optimiser steps on every rank (a rank with nothing to train on steps with a
    zero loss, so DDP's all-reduce still meets). Returns the named update statistics."""
    config = run.config
    K = config.num_samples_per_input
    prompts = [p for g in groups for p in g.prompts.ids for _ in range(K)]
    outputs = [o for g in groups for o in g.scored.outputs]
    advantages = (group_advantages(torch.stack([g.rewards for g in groups]), config.variant).flatten()
                  if groups else torch.zeros(0, dtype=torch.float64))
    num_minibatches = run.max_over_ranks(max(1, math.ceil(len(outputs) / config.minibatch_size)))
    old_log_probs, ref_log_probs = rollout_log_probs(run, prompts, outputs)
    sums = dict.fromkeys(UPDATE_STATISTICS, 0.0)
    for _ in range(config.num_iterations):
        order = torch.randperm(len(outputs)).tolist()
        for m in range(num_minibatches):
            idx = order[m * len(order) // num_minibatches : (m + 1) * len(order) // num_minibatches]
            stats = minibatch_step(run, prompts, outputs, advantages, old_log_probs, ref_log_probs, idx)
            for name, value in stats.items():
                sums[name] += value
    steps = config.num_iterations * num_minibatches
    # every rank reports the same statistics: the mean of the ranks' (the loss then equals
    # the one-process loss on all ranks' groups; grad_norm_total is all-reduced already)
    means = run.sum_over_ranks(torch.tensor([sums[name] / steps for name in UPDATE_STATISTICS],
                                            dtype=torch.float64)) / run.ctx.world_size
    return dict(zip(UPDATE_STATISTICS, means.tolist()))


UPDATE_STATISTICS = ("loss", "clip_fraction", "kl", "grad_norm_total")


def rollout_log_probs(run: GRPORun, prompts, outputs):
    """log π_old per token (None when num_iterations == 1: π_old = π_θ detached, as TRL) and log π_ref."""
    old = ref = None
    if not outputs:
        return old, ref
    with torch.no_grad():
        if run.config.num_iterations > 1:
            old, _ = token_log_probs(run.policy, prompts, outputs)
        if run.reference is not None:
            ref, _ = token_log_probs(run.reference, prompts, outputs)
    return old, ref


def minibatch_step(run: GRPORun, prompts, outputs, advantages, old_log_probs, ref_log_probs, idx) -> dict:
    config = run.config
    run.optimizer.zero_grad(set_to_none=True)
    if not idx:  # nothing here: a zero loss through the model keeps DDP's collective calls matched
        dummy = [[run.tokenizer.eos_token_id]]
        log_probs, _ = token_log_probs(run.train_model, [dummy[0]], dummy)
        (log_probs.sum() * 0.0).backward()
        tokens = run.sum_over_ranks(torch.tensor([0.0], dtype=torch.float64))
        run.optimizer.step()
        return dict.fromkeys(UPDATE_STATISTICS, 0.0)
    log_probs, mask = token_log_probs(run.train_model, [prompts[i] for i in idx], [outputs[i] for i in idx])
    mask = mask.to(log_probs.dtype)
    width = mask.shape[1]
    old = log_probs.detach() if old_log_probs is None else old_log_probs[idx, :width]
    ref = None if ref_log_probs is None else ref_log_probs[idx, :width]
    tokens = run.sum_over_ranks(torch.tensor([mask.sum().item()], dtype=torch.float64)).item()
    adv = advantages[idx].to(device=log_probs.device, dtype=log_probs.dtype).unsqueeze(1)
    loss, stats = policy_loss(config, log_probs, old, ref, adv, mask, tokens / run.ctx.world_size)
    loss.backward()
    total = torch.nn.utils.clip_grad_norm_(run.policy.parameters(),
                                           config.max_grad_norm if config.max_grad_norm else float("inf"))
    run.optimizer.step()
    return {"loss": loss.item(), **stats, "grad_norm_total": float(total)}


def step_statistics(run: GRPORun, rollout: Rollout) -> dict[str, float]:
    """The monitor of one step, over all ranks: zero-std share, rollouts spent on zero-std
    groups, dynamic sampling's refills, GRESO's counts; reward of the trained groups."""
    config = run.config
    K = config.num_samples_per_input
    zero = [g for g in rollout.sampled if g.std == 0]
    tokens = sum(len(o) for g in rollout.sampled for o in g.scored.outputs)
    zero_tokens = sum(len(o) for g in zero for o in g.scored.outputs)
    predicted = rollout.choice.predicted
    local = [len(rollout.sampled), len(zero), tokens, zero_tokens, rollout.refills, len(rollout.train),
             sum(g.rewards.mean().item() for g in rollout.sampled),
             sum(1 for g in rollout.sampled if g.input_id in predicted),
             sum(1 for g in zero if g.input_id in predicted)]
    n, n_zero, tokens, zero_tokens, refills, n_train, reward_sum, n_pred, n_pred_zero = \
        run.sum_over_ranks(torch.tensor(local, dtype=torch.float64)).tolist()
    skipped = len(rollout.choice.skipped)
    t = run.totals
    t["rollouts"] += n * K
    t["refill_rollouts"] += refills
    t["skipped_prompts"] += skipped
    t["explored_predicted"] += n_pred
    t["explored_predicted_zero"] += n_pred_zero
    t["unpredicted"] += n - n_pred
    t["unpredicted_zero"] += n_zero - n_pred_zero
    return {"reward_mean": reward_sum / n if n else math.nan, "num_prompts_sampled": n,
            "share_zero_std": n_zero / n if n else math.nan, "num_prompts_trained": n_train,
            "rollouts": n * K, "rollouts_on_zero_std": n_zero * K,
            "share_tokens_on_zero_std": zero_tokens / tokens if tokens else math.nan,
            "refill_rollouts": refills, "cumulative_refill_rollouts": t["refill_rollouts"],
            "skipped_prompts": skipped, "rollouts_saved": skipped * K,
            "cumulative_rollouts_saved": t["skipped_prompts"] * K, **prediction_quality(t, config)}


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


def reward_by_initial_std(run: GRPORun, step: int, rows: list[dict]) -> dict[str, float]:
    """The evaluation of the whole pool by each prompt's INITIAL reward std: prompts, reward,
    share at std 0 now; logged under split eval_initial_<bucket>."""
    entries = [(row["input_id"], row["reward_mean"], row["reward_std"] == 0) for row in rows]
    return by_initial_std(run, step, entries, ("num_inputs", "reward_mean"), "eval_")


def gain_by_initial_std(run: GRPORun, step: int, groups: list[Group]) -> dict[str, float]:
    """The step's sampled prompts by their INITIAL reward std: prompts, reward now minus
    reward at step 0, share at std 0 now; logged under split initial_<bucket>."""
    entries = [(g.input_id, g.rewards.mean().item() - run.initial_reward[g.input_id], g.std == 0) for g in groups]
    return by_initial_std(run, step, entries, ("num_prompts", "reward_gain"), "")


def by_initial_std(run: GRPORun, step: int, entries: list[tuple[int, float, bool]], names: tuple[str, str],
                   prefix: str) -> dict[str, float]:
    """Per bucket of the prompts' initial reward std, over all ranks, from this rank's
    (input_id, value, std 0 now): count, mean value, share at std 0 now (named `names` and
    share_zero_std); logged under split {prefix}initial_<bucket>, returned as
    {prefix}<name>_initial_<bucket>."""
    buckets = std_buckets(run.config.reward_std_thresholds)
    labels = [label for label, _, _ in buckets]
    sums = torch.zeros(len(buckets), 3, dtype=torch.float64)  # prompts, value sum, zero-std now
    for input_id, value, zero_now in entries:
        sums[labels.index(bucket_of(run.initial_std[input_id], buckets))] += torch.tensor(
            [1.0, value, float(zero_now)], dtype=torch.float64)
    sums = run.sum_over_ranks(sums)
    out = {}
    for b, label in enumerate(labels):
        count, value_sum, zero = sums[b].tolist()
        values = {names[0]: count, names[1]: value_sum / count if count else None,
                  "share_zero_std": zero / count if count else None}
        run.ctx.log_metrics(step, values, split=f"{prefix}initial_{label}")
        out.update({f"{prefix}{k}_initial_{label}": v for k, v in values.items() if v is not None})
    return out


def grpo_step(run: GRPORun, step: int) -> dict:
    """One iteration: rollout -> record -> update -> monitor; logs and returns the metrics."""
    seconds = {}
    tic = time.perf_counter()
    torch.manual_seed(run.config.seed * 1_000_003 + step * 1009 + run.ctx.rank)
    rollout = collect_rollout(run, step)
    seconds["rollout_seconds"] = time.perf_counter() - tic
    tic = time.perf_counter()
    fresh = [g for g in rollout.sampled if not (step == 1 and g.input_id in run.cache)]
    record(run, step - 1, fresh, f"train-step-{step:09d}-rank-{run.ctx.rank:03d}")
    observe(run, [g for g in rollout.sampled if step > 1 or g.input_id not in run.cache])
    seconds["record_seconds"] = time.perf_counter() - tic
    tic = time.perf_counter()
    update = grpo_update(run, rollout.train)
    run.sampler.refresh()  # the next samples come from the updated policy
    if run.engine is not None:  # ... and so do vLLM's (TRL colocate: sync_weights)
        run.engine.refresh_weights(run.policy)
    seconds["update_seconds"] = time.perf_counter() - tic
    if step == 1:
        run.cache.clear()  # the step-0 samples are stale once the policy has moved
    metrics = {"step": step, **step_statistics(run, rollout), **update, **seconds}
    run.ctx.log_metrics(step, {k: v for k, v in metrics.items() if k != "step"})
    return {**metrics, **gain_by_initial_std(run, step, rollout.sampled)}


# ============================================================================
# Checkpoints.
# ============================================================================


def save_checkpoint(run: GRPORun, step: int, directory: str) -> None:
    """Weights + tokenizer (loadable by every workload) and the run's state. The AdamW
    moments (2x the weights: 1.1 GB of a 1.6 GB SmolLM2 checkpoint) only matter to a run
    that goes on training, so the final checkpoint, which a later stage loads as a
    model and a retry only re-evaluates, leaves them out."""
    run.policy.save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)
    if step < run.config.num_steps:
        torch.save(run.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"step": step, "totals": run.totals,
                   "history": {str(k): v for k, v in run.history.items()},
                   "initial_std": {str(k): v for k, v in run.initial_std.items()},
                   "initial_reward": {str(k): v for k, v in run.initial_reward.items()}}, f)


def load_checkpoint(run: GRPORun, directory: str) -> None:
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    if state["step"] < run.config.num_steps:  # training goes on: it needs the optimiser's moments
        run.optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location=run.device,
                                                 weights_only=True))
    run.step, run.totals = state["step"], state["totals"]
    run.history = {int(k): [tuple(o) for o in v] for k, v in state["history"].items()}
    run.initial_std = {int(k): v for k, v in state["initial_std"].items()}
    run.initial_reward = {int(k): v for k, v in state["initial_reward"].items()}


def report(run: GRPORun, metrics: dict, checkpoint_step: int | None) -> None:
    """Every rank reports once; rank 0 hands over a checkpoint when one is due."""
    if checkpoint_step is None:
        run.ctx.report(metrics)
    else:
        run.ctx.report_checkpoint(metrics, lambda directory: save_checkpoint(run, checkpoint_step, directory))


# ============================================================================
# The workload.
# ============================================================================


def run_grpo(config: GRPOConfig, ctx: WorkloadContext) -> dict:
    run = start_run(config, ctx)
    start_step = run.step
    if start_step == 0:
        rows = evaluate_pool(run, 0)
        reward_by_initial_std(run, 0, rows)
    progress = tqdm(range(start_step + 1, config.num_steps + 1), desc=f"grpo {ctx.model_name(config.model)}", unit="step",
                    disable=not (ctx.is_main and ctx.show_progress))
    metrics: dict = {}
    for step in progress:
        metrics = grpo_step(run, step)
        run.step = step
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", zero_std=f"{metrics['share_zero_std']:.2f}")
        last = step == config.num_steps
        due = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and not last
        report(run, metrics, step if due else None)
    progress.close()
    final_step = max(config.num_steps, start_step)
    final = {**metrics, "step": final_step}
    if final_step > 0:
        run.cache.clear()
        rows = evaluate_pool(run, final_step)
        final.update(reward_by_initial_std(run, final_step, rows))
        final["eval_reward_mean"] = _mean_over_ranks(run, [r["reward_mean"] for r in rows])
    report(run, final, final_step)
    if run.engine is not None:
        run.engine.close()
    return final


def _mean_over_ranks(run: GRPORun, values: list[float]) -> float:
    total, count = run.sum_over_ranks(torch.tensor([sum(values), float(len(values))], dtype=torch.float64)).tolist()
    return total / count if count else math.nan
