"""The per-input gradient norm against a slow reference written independently:
one backward per SAMPLE, float64, log-probs of unpadded single sequences
computed by plain code (no shared helper from workloads.models)."""

import copy
import math
import random

import numpy as np
import pytest
import torch

from workloads.gradnorm import leave_one_out_advantages, per_input_grad_norms, reward_stats
from workloads.models import load_model_and_tokenizer, sequence_log_probs


def reference_log_prob(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log pi(output | prompt) of ONE unpadded sequence."""
    if model.config.is_encoder_decoder:
        # the model's own label path: decoder inputs are built by shift_right inside
        loss = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([output])).loss
        return -loss * len(output)  # loss is the mean token cross-entropy
    logits = model(input_ids=torch.tensor([prompt + output])).logits[0]
    total = torch.zeros((), dtype=logits.dtype)
    for t, token in enumerate(output):
        total = total + torch.log_softmax(logits[len(prompt) - 1 + t], dim=-1)[token]
    return total


def reference_grad_norm(model, prompt, outputs, rewards) -> float:
    K = len(outputs)
    model.zero_grad()
    for k in range(K):
        baseline = sum(rewards[j] for j in range(K) if j != k) / (K - 1)
        # one backward per sample: grads accumulate into .grad
        ((rewards[k] - baseline) / K * reference_log_prob(model, prompt, outputs[k])).backward()
    squares = [p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None]
    return math.sqrt(sum(squares))


def random_groups(tokenizer, num_inputs, K, seed):
    rng = random.Random(seed)
    low, high = 4, len(tokenizer) - 1  # ordinary character ids
    prompts, outputs, rewards = [], [], []
    for i in range(num_inputs):
        prompts.append([rng.randint(low, high) for _ in range(1 + 3 * i)])  # lengths 1, 4, 7, ... -> padding
        outputs.append([[rng.randint(low, high) for _ in range(rng.randint(0, 6))] + [tokenizer.eos_token_id]
                        for _ in range(K)])
        rewards.append([rng.random() for _ in range(K)])
    rewards[-1] = [0.5] * K  # equal rewards: the gradient is exactly zero
    return prompts, outputs, rewards


@pytest.mark.parametrize("name", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_grad_norm_matches_per_sample_reference(name):
    model, tokenizer = load_model_and_tokenizer(name, dtype=torch.float64)
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=5, K=4, seed=0)

    fast = per_input_grad_norms(model, prompts, outputs, torch.tensor(rewards))

    reference_model = copy.deepcopy(model)
    reference = [reference_grad_norm(reference_model, p, o, r) for p, o, r in zip(prompts, outputs, rewards)]
    assert fast.shape == (5,)
    assert all(r > 0 for r in reference[:-1]) and reference[-1] == 0.0
    np.testing.assert_allclose(fast.numpy(), np.array(reference), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_batched_log_probs_match_unpadded_reference(name):
    """All inputs' samples in ONE batch: prompts of lengths 1..13 are left-padded
    (causal) or right-padded (encoder), outputs right-padded -- none of it may
    change a log-prob."""
    model, tokenizer = load_model_and_tokenizer(name, dtype=torch.float64)
    model.eval()
    prompts, outputs, _ = random_groups(tokenizer, num_inputs=5, K=3, seed=2)
    flat_prompts = [p for p, group in zip(prompts, outputs) for _ in group]
    flat_outputs = [o for group in outputs for o in group]
    batched = sequence_log_probs(model, flat_prompts, flat_outputs)
    with torch.no_grad():
        reference = [reference_log_prob(model, p, o).item() for p, o in zip(flat_prompts, flat_outputs)]
    np.testing.assert_allclose(batched.detach().numpy(), reference, rtol=1e-9)


def test_grad_norm_float32_close_to_float64():
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=torch.float32)
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=3, K=3, seed=1)
    single = per_input_grad_norms(model, prompts, outputs, torch.tensor(rewards))
    double = per_input_grad_norms(model.double(), prompts, outputs, torch.tensor(rewards))
    np.testing.assert_allclose(single.numpy(), double.numpy(), rtol=1e-4)


def test_leave_one_out_baseline_and_reward_stats():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.25], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    advantages = leave_one_out_advantages(rewards)
    expected = [[r - (sum(row) - r) / 3 for r in row] for row in rewards.tolist()]
    np.testing.assert_allclose(advantages.numpy(), expected)
    mean, std, std_unbiased = reward_stats(rewards)
    np.testing.assert_allclose(mean.numpy(), rewards.numpy().mean(axis=1))
    np.testing.assert_allclose(std.numpy(), rewards.numpy().std(axis=1, ddof=0))
    np.testing.assert_allclose(std_unbiased.numpy(), rewards.numpy().std(axis=1, ddof=1))
