"""PPO reinforcement finetuning of a language model (paper sections 4-5), with a
live monitor of the vanishing-gradient signature.

One PPO iteration ("rollout", the `step` of every table) on prompts x_1..x_P
drawn from the train inputs, K completions each:

  1. rollout     y ~ π_old(·|x), K per prompt; task reward R(x, y) per completion
  2. KL penalty  per output token t:  kl_t = log π_old(y_t|s_t) - log π_ref(y_t|s_t)
                 r_t = -β kl_t,  plus R(x, y) at the last token      (β = kl_coef;
                 π_ref = the frozen initial policy; Ziegler et al. 2019, RL4LMs)
  3. GAE         δ_t = r_t + γ V(s_{t+1}) - V(s_t)    (V = 0 after the last token)
                 A_t = δ_t + γλ A_{t+1},   return G_t = A_t + V(s_t)
  4. updates     ppo_epochs passes over the rollout in minibatches, minimising
                   L = L_clip + vf_coef L_value - ent_coef H
                 L_clip  = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),  ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t)
                 L_value = ½ mean_t max((V_θ - G_t)^2, (V_old + clip(V_θ - V_old, -ε_v, ε_v) - G_t)^2)
                 H       = mean_t entropy of π_θ(·|s_t)
                 (means over the minibatch's output tokens: token-level PPO as in RL4LMs/TRL)
  5. controller  β <- β (1 + clip(KL / KL_target - 1, -0.2, 0.2) · n / horizon)
                 KL = mean over completions of Σ_t kl_t,  n = completions in the rollout
  6. monitor     per prompt: reward mean and std over its K completions (1/K) and the
                 norm of its policy gradient  ĝ(x) = (1/K) Σ_k (r_k - b_k) ∇ log π(y_k|x)
                 (leave-one-out baseline, workloads.gradnorm), bucketed by reward std.

The value V(s_t) is a linear head on the last hidden state at the position that
predicts y_t (the decoder's, for seq2seq), trained jointly with the policy in the
same optimiser steps; its loss does not flow back into the language model.
Dropout stays off throughout: π_old and π_θ must be the same function before the
first update, or ρ_t ≠ 1 from noise alone.

Before training and at the end (and every `eval_every` rollouts) a FIXED monitor
set -- the first `num_eval_inputs` inputs of the train pool -- gets K samples
each, written as `samples` and `inputs` rows at that step: per-input reward
improvement against initial reward std is the paper's evidence.

Under torch.distributed with world_size > 1 the policy and value head are one
DistributedDataParallel module, every rank takes its slice of each rollout's
prompts (and a contiguous chunk of the monitor set) and metrics are summed over
ranks with all_reduce. Every rank reports once per rollout plus once at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..core.context import WorkloadContext
from .ppo_config import PPOConfig
from .gradnorm import per_input_grad_norms, reward_stats
from .models import _pad as pad_rows  # the padding token_log_probs uses: the same alignment
from .models import (encode_prompts, generate_outputs, load_model_and_tokenizer, sequence_log_probs,
                     token_log_probs, unwrap)
from .rewards import get_reward
from .tasks import choose_inputs, get_examples, prompt_text, references, resolve_reward

VALUE_HEAD_FILE = "value_head.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "rlgrad_ppo_state.json"  # step done, kl_coef, initial monitor reward stds


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
                           gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over each completion's output tokens, backwards in t:

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   G_t = A_t + V_t

    with V_{t+1} = A_{t+1} = 0 after the last token (the episode ends at EOS or
    at max_new_tokens). Returns (advantages, returns), zero on padding."""
    num_tokens = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(num_tokens)):
        if t + 1 < num_tokens:  # padding after the end counts as terminal
            next_value = values[:, t + 1] * mask[:, t + 1]
            next_advantage = advantages[:, t + 1] * mask[:, t + 1]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * gae_lambda * next_advantage) * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, sum_over_ranks) -> torch.Tensor:
    """(x - mean) / std over the real tokens of the whole rollout (all ranks)."""
    total, total_squares, count = sum_over_ranks(
        torch.stack([(values * mask).sum(), (values.square() * mask).sum(), mask.sum()]).double())
    mean = total / count
    variance = (total_squares / count - mean.square()).clamp(min=0)
    return ((values - mean) / (variance.sqrt() + 1e-8)).to(values.dtype) * mask


def clipped_policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), to minimise:

        mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),   ρ_t = exp(log π_θ - log π_old)

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


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_range: float | None) -> torch.Tensor:
    """½ mean_t max((V_θ - G)^2, (V_old + clip(V_θ - V_old, -ε_v, ε_v) - G)^2); unclipped
    ½ mean_t (V_θ - G)^2 when clip_range is None. The ½ makes the gradient V_θ - G."""
    squared_error = (values - returns).square()
    if clip_range is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        squared_error = torch.maximum(squared_error, (clipped_values - returns).square())
    return 0.5 * masked_mean(squared_error, mask)


def update_kl_coef(kl_coef: float, kl: float, target_kl: float | None, num_completions: int, horizon: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (RL4LMs, TRL): a proportional
    controller whose error is clipped to ±20% and scaled by completions / horizon.

        β <- β · (1 + clip(KL / KL_target - 1, -0.2, 0.2) · n / horizon)"""
    if target_kl is None:
        return kl_coef
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_completions / horizon)


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
# The actor-critic: the language model and a value head in one module, so that
# DistributedDataParallel averages the gradients of both.
# ============================================================================


class PolicyWithValueHead(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        # zero init: V = 0 at first, so the first advantages are plain discounted rewards
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, prompt_ids: list[list[int]], output_ids: list[list[int]]):
        """For every output token t: log π(y_t|s_t), entropy of π(·|s_t) and V(s_t).

        Same alignment as workloads.models.token_log_probs (which only returns the
        log-probs): causal prompts left-padded with positions counting real tokens,
        the logit/hidden state at position i predicts token i+1; seq2seq decoder
        input = [start] + y[:-1]. Returns (log_probs, entropy, values, mask), [B, T]."""
        device = self.value_head.weight.device
        outputs, output_mask = pad_rows(output_ids, left=False, device=device)
        if self.lm.config.is_encoder_decoder:
            encoder_ids, encoder_mask = pad_rows(prompt_ids, left=False, device=device)
            start = torch.full_like(outputs[:, :1], self.lm.config.decoder_start_token_id)
            result = self.lm(input_ids=encoder_ids, attention_mask=encoder_mask,
                             decoder_input_ids=torch.cat([start, outputs[:, :-1]], dim=1),
                             decoder_attention_mask=output_mask, output_hidden_states=True)
            logits, hidden = result.logits, result.decoder_hidden_states[-1]
        else:
            prompts, prompt_mask = pad_rows(prompt_ids, left=True, device=device)
            attention_mask = torch.cat([prompt_mask, output_mask], dim=1)
            result = self.lm(input_ids=torch.cat([prompts, outputs], dim=1), attention_mask=attention_mask,
                             position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
                             output_hidden_states=True)
            window = slice(prompts.shape[1] - 1, prompts.shape[1] - 1 + outputs.shape[1])
            logits, hidden = result.logits[:, window], result.hidden_states[-1][:, window]
        mask = output_mask.to(torch.float32)
        all_log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs = all_log_probs.gather(-1, outputs.unsqueeze(-1)).squeeze(-1) * mask
        entropy = -(all_log_probs.exp() * all_log_probs).sum(dim=-1) * mask
        # the critic reads the policy's features but its loss does not move them, so the
        # policy's update is PPO's alone (RL4LMs gives the critic a separate network)
        values = self.value_head(hidden.float().detach()).squeeze(-1) * mask
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
# The workload.
# ============================================================================


def run_ppo(config: PPOConfig, ctx: WorkloadContext) -> dict:
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if config.inputs_per_rollout % ctx.world_size:
        raise ValueError(f"prompts_per_rollout ({config.inputs_per_rollout}) must be a multiple of the "
                         f"{ctx.world_size} workers (every rank takes the same number of prompts)")
    device = torch.device(ctx.device)
    K = config.num_samples_per_input
    gen = config.generation
    buckets = std_buckets(config.reward_std_thresholds)

    def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
        if distributed:
            tensor = tensor.to(device)  # NCCL reduces GPU tensors only
            dist.all_reduce(tensor)
        return tensor.cpu()

    # --- models: the policy (resumed or initial), its value head, the frozen reference
    resuming = bool(ctx.resume_from) and os.path.isdir(ctx.resume_from)
    lm, tokenizer = load_model_and_tokenizer(ctx.resume_from if resuming else config.model, device)
    reference, _ = load_model_and_tokenizer(config.model, device)  # π_ref = the initial policy, always
    reference.eval().requires_grad_(False)
    encoder_decoder = lm.config.is_encoder_decoder
    actor_critic = PolicyWithValueHead(lm).to(device)
    actor_critic.eval()  # dropout off: see the module docstring
    optimizer = torch.optim.AdamW(actor_critic.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    start_step, kl_coef, initial_monitor_std = 0, config.kl_coef, {}
    if resuming:
        def load(name):
            return torch.load(os.path.join(ctx.resume_from, name), map_location=device, weights_only=True)

        actor_critic.value_head.load_state_dict(load(VALUE_HEAD_FILE))
        optimizer.load_state_dict(load(OPTIMIZER_FILE))
        with open(os.path.join(ctx.resume_from, STATE_FILE)) as f:
            state = json.load(f)
        start_step, kl_coef = state["step"], state["kl_coef"]
        initial_monitor_std = {int(k): v for k, v in state["initial_monitor_std"].items()}
    train_model = DistributedDataParallel(actor_critic) if distributed else actor_critic

    # --- data: a pool of train inputs; the monitor set is its first num_eval_inputs
    pool = choose_inputs(config.task, "train", config.num_train_inputs, config.seed, config.dataset_path)
    monitor_ids = pool[: config.num_eval_inputs]
    reward_fn = get_reward(*resolve_reward(config.task, config.reward, config.reward_args))  # the task's default args too
    dataset = f"{config.task}/train"

    def prompts_and_references(examples):
        prompts = [prompt_text(config.task, ex, encoder_decoder) for ex in examples]
        prompt_ids = encode_prompts(tokenizer, prompts, gen.max_prompt_length, encoder_decoder)
        # one reference string per output; a list where an input has several (its reward takes the max)
        refs = [r[0] if len(r) == 1 else r for r in (references(config.task, ex) for ex in examples)]
        return prompts, prompt_ids, refs

    def sample_and_score(prompts, prompt_ids, refs):
        """K completions per prompt (prompt-major) and their task rewards, as a [P, K] matrix."""
        outputs = generate_outputs(unwrap(train_model).lm, tokenizer, prompt_ids, num_return_sequences=K,
                                   do_sample=True, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                                   min_new_tokens=gen.min_new_tokens, max_new_tokens=gen.max_new_tokens)
        texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
        rewards = reward_fn([p for p in prompts for _ in range(K)], texts, [r for r in refs for _ in range(K)])
        reward_matrix = torch.tensor([r.value for r in rewards], dtype=torch.float64).view(len(prompts), K)
        return outputs, texts, rewards, reward_matrix

    def grad_norms_of(prompt_ids, outputs, reward_matrix) -> list[float | None]:
        if not config.monitor_grad_norm:
            return [None] * len(prompt_ids)
        grouped = [outputs[i * K : (i + 1) * K] for i in range(len(prompt_ids))]
        return per_input_grad_norms(unwrap(train_model).lm, prompt_ids, grouped, reward_matrix).tolist()

    def evaluate_monitor_set(step: int) -> None:
        """K samples for each monitor input (this rank's contiguous chunk), written as
        `samples` and `inputs` rows at `step`; logs the set's reward by INITIAL reward std."""
        first = ctx.rank * len(monitor_ids) // ctx.world_size
        end = (ctx.rank + 1) * len(monitor_ids) // ctx.world_size
        shard = f"monitor-step-{step:09d}-inputs-{first:06d}-{end - 1:06d}"
        rows: list[dict] = []
        if end > first and ctx.writer.exists("inputs", shard):  # a retry: the rows are on disk already
            fs, path = ctx.writer._path("inputs", shard)
            rows = pq.read_table(path, filesystem=fs, columns=["input_id", "reward_mean", "reward_std"]).to_pylist()
        elif end > first:
            torch.manual_seed(config.seed * 1_000_003 + 7919 * step + first)  # the same samples on a retry
            sample_rows = []
            for batch_start in range(first, end, config.inputs_per_rollout):
                examples = get_examples(config.task, "train",
                                        monitor_ids[batch_start : min(end, batch_start + config.inputs_per_rollout)],
                                        config.dataset_path)
                prompts, prompt_ids, refs = prompts_and_references(examples)
                outputs, texts, rewards, reward_matrix = sample_and_score(prompts, prompt_ids, refs)
                with torch.no_grad():
                    log_probs = sequence_log_probs(unwrap(train_model).lm,
                                                   [p for p in prompt_ids for _ in range(K)], outputs).tolist()
                mean, std, std_unbiased = reward_stats(reward_matrix)
                grad_norms = grad_norms_of(prompt_ids, outputs, reward_matrix)
                for i, ex in enumerate(examples):
                    for k in range(K):
                        j = i * K + k
                        sample_rows.append({
                            "step": step, "input_id": ex.input_id, "sample_idx": k, "prompt": prompts[i],
                            "output": texts[j], "reward": rewards[j].value,
                            "reward_components": rewards[j].components, "log_prob": log_probs[j],
                            "num_tokens": len(outputs[j]), "model": config.model, "dataset": dataset})
                    rows.append({
                        "step": step, "input_id": ex.input_id, "prompt": prompts[i], "num_samples": K,
                        "reward_mean": mean[i].item(), "reward_std": std[i].item(),
                        "reward_std_unbiased": std_unbiased[i].item(), "grad_norm": grad_norms[i],
                        "model": config.model, "dataset": dataset})
            ctx.writer.write("samples", shard, sample_rows)  # samples first: `inputs` marks the shard done
            ctx.writer.write("inputs", shard, rows)
        if step == 0:  # every rank keeps every input's initial std (rank 0 checkpoints them)
            chunk = {row["input_id"]: row["reward_std"] for row in rows}
            chunks = [chunk]
            if distributed:
                chunks = [None] * ctx.world_size
                dist.all_gather_object(chunks, chunk)
            for part in chunks:
                initial_monitor_std.update(part)
        # the live version of the paper's plot: monitor reward grouped by initial reward std
        names = [name for name, _, _ in buckets]
        sums = torch.zeros(len(buckets), 2, dtype=torch.float64)  # inputs, reward sum
        for row in rows:
            b = names.index(bucket_of(initial_monitor_std[row["input_id"]], buckets))
            sums[b] += torch.tensor([1.0, row["reward_mean"]], dtype=torch.float64)
        sums = sum_over_ranks(sums)
        total_count, total_reward = sums.sum(dim=0).tolist()
        ctx.log_metrics(step, {"reward_mean": total_reward / total_count, "num_inputs": total_count},
                        split="monitor")
        for b, name in enumerate(names):
            count, reward_sum = sums[b].tolist()
            ctx.log_metrics(step, {"reward_mean": reward_sum / count if count else None, "num_inputs": count},
                            split=f"monitor_initial_{name}")

    def save_checkpoint(step: int) -> str:
        """Weights + tokenizer (loadable by every workload) + value head, optimizer and
        controller state; rank 0 fills the directory, the others hand over none."""
        directory = tempfile.mkdtemp(prefix="rlgrad-ppo-")
        if ctx.is_main:
            unwrap(train_model).lm.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            torch.save(unwrap(train_model).value_head.state_dict(), os.path.join(directory, VALUE_HEAD_FILE))
            torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
            with open(os.path.join(directory, STATE_FILE), "w") as f:
                json.dump({"step": step, "kl_coef": kl_coef,
                           "initial_monitor_std": {str(k): v for k, v in initial_monitor_std.items()}}, f)
        return directory

    if start_step == 0:
        evaluate_monitor_set(0)

    rollout_size = config.inputs_per_rollout * K  # completions, all ranks together
    num_minibatches = math.ceil(rollout_size / config.minibatch_size)
    progress = tqdm(range(start_step + 1, config.num_rollouts + 1), desc=f"ppo {config.model}", unit="rollout",
                    disable=not (ctx.is_main and ctx.show_progress))
    metrics: dict = {}
    for step in progress:
        # every (step, rank) has its own seed: a run resumed at step s draws what an
        # uninterrupted run would have drawn from s on
        torch.manual_seed(config.seed * 1_000_003 + step * 1009 + ctx.rank)
        seconds = {}

        # --- 1. rollout: this rank's slice of the step's prompts, K completions each
        tic = time.perf_counter()
        step_prompt_ids = random.Random(config.seed * 1_000_003 + step).sample(pool, config.inputs_per_rollout)
        examples = get_examples(config.task, "train", ctx.my_items(step_prompt_ids), config.dataset_path)
        prompts, prompt_ids, refs = prompts_and_references(examples)
        outputs, _, _, reward_matrix = sample_and_score(prompts, prompt_ids, refs)
        completion_prompt_ids = [p for p in prompt_ids for _ in range(K)]
        task_rewards = reward_matrix.flatten().float().to(device)
        seconds["rollout_seconds"] = time.perf_counter() - tic

        # --- monitor (before the update, at the policy that drew the samples)
        tic = time.perf_counter()
        reward_mean, reward_std, _ = reward_stats(reward_matrix)
        grad_norms = grad_norms_of(prompt_ids, outputs, reward_matrix)
        seconds["grad_norm_seconds"] = time.perf_counter() - tic

        # --- 2. KL penalty and 3. GAE, with π_old, π_ref and V_old fixed for the whole update
        tic = time.perf_counter()
        with torch.no_grad():
            old_log_probs, _, old_values, mask = actor_critic(completion_prompt_ids, outputs)
            ref_log_probs, _ = token_log_probs(reference, completion_prompt_ids, outputs)
            token_rewards, token_kl = kl_penalised_rewards(old_log_probs, ref_log_probs, mask, task_rewards,
                                                           kl_coef)
            advantages, returns = generalized_advantages(token_rewards, old_values, mask, config.gamma,
                                                         config.gae_lambda)
            if config.normalize_advantages:
                advantages = whiten(advantages, mask, sum_over_ranks)

        # --- 4. ppo_epochs passes of clipped-surrogate updates over the rollout
        num_local = len(outputs)
        update_sums = torch.zeros(5, dtype=torch.float64)  # policy, value, entropy, clip share, approx kl
        for _ in range(config.ppo_epochs):
            order = torch.randperm(num_local)
            # the same number of minibatches on every rank (each backward all-reduces)
            for batch in order.tensor_split(num_minibatches):
                idx = batch.tolist()
                new_log_probs, entropy, new_values, batch_mask = train_model(
                    [completion_prompt_ids[i] for i in idx], [outputs[i] for i in idx])
                width = batch_mask.shape[1]  # this minibatch's longest completion
                policy_loss, stats = clipped_policy_loss(new_log_probs, old_log_probs[idx, :width],
                                                         advantages[idx, :width], batch_mask, config.clip_range)
                value_loss = clipped_value_loss(new_values, old_values[idx, :width], returns[idx, :width],
                                                batch_mask, config.value_clip_range)
                mean_entropy = masked_mean(entropy, batch_mask)
                loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * mean_entropy
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(actor_critic.parameters(), config.max_grad_norm)
                optimizer.step()
                update_sums += torch.tensor([policy_loss.item(), value_loss.item(), mean_entropy.item(),
                                             stats["clip_fraction"].item(), stats["approx_kl"].item()],
                                            dtype=torch.float64)
        seconds["update_seconds"] = time.perf_counter() - tic

        # --- 5. the KL controller, fed the rollout's KL to π_ref (summed over tokens, mean over completions)
        sequence_kl = token_kl.sum(dim=1)
        global_sums = sum_over_ranks(torch.tensor(
            [sequence_kl.sum().item(), float(num_local), *update_sums.tolist()], dtype=torch.float64))
        kl = global_sums[0].item() / global_sums[1].item()
        update_means = (global_sums[2:] / (config.ppo_epochs * num_minibatches * ctx.world_size)).tolist()
        kl_coef_used = kl_coef
        kl_coef = update_kl_coef(kl_coef, kl, config.target_kl, rollout_size, config.kl_horizon)

        # --- 6. the monitor: reward and gradient norm by per-prompt reward std, summed over ranks
        std_sums = torch.zeros(2 + len(config.reward_std_thresholds), dtype=torch.float64)
        std_sums[0] = reward_std.sum()
        std_sums[1] = reward_mean.sum()
        for j, threshold in enumerate(config.reward_std_thresholds):
            std_sums[2 + j] = (reward_std < threshold).sum()
        bucket_sums = torch.zeros(len(buckets), 3, dtype=torch.float64)  # prompts, reward sum, grad-norm sum
        names = [name for name, _, _ in buckets]
        for i in range(len(prompt_ids)):
            b = names.index(bucket_of(reward_std[i].item(), buckets))
            bucket_sums[b] += torch.tensor([1.0, reward_mean[i].item(), grad_norms[i] or 0.0], dtype=torch.float64)
        std_sums, bucket_sums = sum_over_ranks(std_sums), sum_over_ranks(bucket_sums)
        P = config.inputs_per_rollout
        metrics = {
            "step": step,
            "reward_mean": std_sums[1].item() / P,
            "reward_std_mean": std_sums[0].item() / P,
            **{f"share_reward_std_below_{t}": std_sums[2 + j].item() / P
               for j, t in enumerate(config.reward_std_thresholds)},
            "kl": kl, "kl_coef": kl_coef_used, "next_kl_coef": kl_coef,
            "policy_loss": update_means[0], "value_loss": update_means[1], "entropy": update_means[2],
            "clip_fraction": update_means[3], "approx_kl": update_means[4],
            "explained_variance": explained_variance(old_values, returns, mask, sum_over_ranks),
            **seconds,
        }
        ctx.log_metrics(step, {k: v for k, v in metrics.items() if k != "step"})
        for b, name in enumerate(names):
            count, reward_sum, grad_sum = bucket_sums[b].tolist()
            bucket_metrics = {"num_prompts": count,
                              "reward_mean": reward_sum / count if count else None}
            if config.monitor_grad_norm:
                bucket_metrics["grad_norm"] = grad_sum / count if count else None
            ctx.log_metrics(step, bucket_metrics, split=name)
            metrics.update({f"{metric}_{name}": value for metric, value in bucket_metrics.items()
                            if value is not None})
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{kl:.3f}")

        if config.eval_every_rollouts and step % config.eval_every_rollouts == 0 and step != config.num_rollouts:
            evaluate_monitor_set(step)
        checkpoint_now = config.checkpoint_every_rollouts and step % config.checkpoint_every_rollouts == 0 \
            and step != config.num_rollouts  # the final checkpoint comes with the final report
        checkpoint_dir = save_checkpoint(step) if checkpoint_now else None
        ctx.report(metrics, checkpoint_dir=checkpoint_dir if ctx.is_main else None)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    progress.close()

    # --- the end: the monitor set at the final policy, and the final checkpoint
    final_step = max(config.num_rollouts, start_step)
    if final_step > 0:
        evaluate_monitor_set(final_step)
    final_metrics = {**metrics, "step": final_step, "kl_coef": kl_coef}
    final_metrics.pop("next_kl_coef", None)
    checkpoint_dir = save_checkpoint(final_step)
    ctx.report(final_metrics, checkpoint_dir=checkpoint_dir if ctx.is_main else None)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return final_metrics


