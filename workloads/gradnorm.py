"""Per-input reward statistics and policy-gradient norms (paper section 4).

For an input x with K samples y_1..y_K and rewards r_1..r_K:

    reward mean     r̄ = (1/K) Σ_k r_k
    reward std        = sqrt((1/K) Σ_k (r_k - r̄)^2)          (population, 1/K)
    unbiased std      = sqrt((1/(K-1)) Σ_k (r_k - r̄)^2)
    gradient        ĝ(x) = (1/K) Σ_k (r_k - b_k) ∇_θ log π_θ(y_k|x)
                    b_k  = (1/(K-1)) Σ_{j≠k} r_j              (leave-one-out baseline:
                           independent of y_k, so ĝ is unbiased for ∇_θ V(x; θ))
    gradient norm     = ||ĝ(x)||_2 over ALL trainable parameters

Theorem 1 of the paper bounds ||∇_θ V(x; θ)|| by a constant times STD(x; θ)^(2/3):
these two columns are what the report plots against each other.
"""

from __future__ import annotations

import torch

from .models import sequence_log_probs


def reward_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std with 1/K, std with 1/(K-1)) over the last dimension (the K samples)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    mean = rewards.mean(dim=-1)
    return mean, rewards.std(dim=-1, correction=0), rewards.std(dim=-1, correction=1)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r_k - b_k with b_k the mean of the other K-1 rewards (= K/(K-1) * (r_k - r̄))."""
    num_samples = rewards.shape[-1]
    baseline = (rewards.sum(dim=-1, keepdim=True) - rewards) / (num_samples - 1)
    return rewards - baseline


def per_input_grad_norms(model, prompt_ids: list[list[int]], output_ids: list[list[list[int]]],
                         rewards: torch.Tensor) -> torch.Tensor:
    """||ĝ(x)|| for each input, computed in the model's dtype: a tensor [num_inputs].

    prompt_ids[i]     token ids of input i's prompt (unpadded)
    output_ids[i][k]  token ids of its k-th sample, EOS included
    rewards[i, k]     that sample's reward

    One backward per input, its K samples batched in one forward: the gradient
    of the surrogate (1/K) Σ_k A_k log π(y_k|x) with the advantages A_k held
    constant is exactly ĝ(x). The caller puts the model in eval mode (no dropout).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    advantages = leave_one_out_advantages(torch.as_tensor(rewards, dtype=torch.float64))
    grad_norms = torch.zeros(len(prompt_ids), dtype=torch.float64)
    for i, (prompt, outputs) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        if not advantages[i].any():  # all K rewards equal: ĝ(x) = 0 exactly, skip the backward
            continue
        log_probs = sequence_log_probs(model, [prompt] * len(outputs), outputs)
        surrogate = (advantages[i].to(device=log_probs.device, dtype=log_probs.dtype) * log_probs).mean()
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        squared = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads if g is not None)
        grad_norms[i] = squared.sqrt().item()
    return grad_norms
