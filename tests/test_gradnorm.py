"""The per-input gradient norm against a slow reference written independently:
one backward per SAMPLE, float64, log-probs of unpadded single sequences
computed by plain code (no shared helper from workloads.text.models); and the
batched production path (per_input_grad_norms) against its slow twin, the
per-input loop (per_input_grad_norms_loop), in every form it can take."""

import copy
import math
import random

import numpy as np
import pytest
import torch

from transformers import GPT2Config, GPT2LMHeadModel

from workloads.text import gradnorm
from workloads.text.gradnorm import (
    batched_grad_norms_unsupported,
    leave_one_out_advantages,
    per_input_grad_norms,
    per_input_grad_norms_loop,
    reward_stats,
)
from workloads.text.models import load_model_and_tokenizer, sequence_log_probs


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


@pytest.mark.parametrize("name,form", [("builtin:tiny-gpt2", "auto"), ("builtin:tiny-gpt2", "ghost"),
                                       ("builtin:tiny-gpt2", "explicit"), ("builtin:tiny-t5", "auto")])
def test_grad_norm_matches_per_sample_reference(name, form):
    model, tokenizer = load_model_and_tokenizer(name, dtype=torch.float64)
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=5, K=4, seed=0)

    fast = per_input_grad_norms(model, prompts, outputs, torch.tensor(rewards), norm_form=form)

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


# --------------------------------------------------------------------------
# the batched path against the per-input loop
# --------------------------------------------------------------------------

def tiny_gpt2(tokenizer, **overrides) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **overrides)
    torch.manual_seed(3)
    return GPT2LMHeadModel(config).double().eval()


def assert_batched_equals_loop(model, prompts, outputs, rewards, **kwargs):
    loop = per_input_grad_norms_loop(model, prompts, outputs, rewards)
    batched = per_input_grad_norms(model, prompts, outputs, rewards, **kwargs)
    zero = loop == 0
    assert (batched[zero] == 0).all()  # all-equal rewards: exactly 0 on both paths
    np.testing.assert_allclose(batched.numpy(), loop.numpy(), rtol=1e-6, atol=0)
    return batched


@pytest.mark.parametrize("form", ["auto", "ghost", "explicit"])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("max_sequences", [4096, 5])  # everything in one backward / chunks of 1-2 inputs
def test_batched_equals_loop_tied_gpt2(form, K, max_sequences):
    """builtin:tiny-gpt2 ties the LM head to the token embedding: the two
    contributions to that weight's gradient must be summed before the norm."""
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=torch.float64)
    model.eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert batched_grad_norms_unsupported(model) is None  # it takes the batched path
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=6, K=K, seed=10 + K)
    rewards[1] = [0.25] * K  # a second all-equal group, in the middle
    norms = assert_batched_equals_loop(model, prompts, outputs, torch.tensor(rewards), max_sequences=max_sequences,
                                       norm_form=form)
    assert norms[1] == 0 and norms[-1] == 0 and (norms[[0, 2, 3, 4]] > 0).all()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_batched_equals_loop_untied_gpt2_with_frozen_parameters(attention):
    """An untied LM head (a plain Linear) and frozen parameters (left out of the
    norm by both paths); both attention implementations."""
    _, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2")
    model = tiny_gpt2(tokenizer, tie_word_embeddings=False, attn_implementation=attention)
    assert model.lm_head.weight is not model.transformer.wte.weight
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=4, K=3, seed=4)
    assert_batched_equals_loop(model, prompts, outputs, torch.tensor(rewards))

    frozen = [model.transformer.wpe.weight, model.transformer.ln_f.bias, model.transformer.h[0].mlp.c_fc.weight]
    for p in frozen:
        p.requires_grad_(False)
    assert_batched_equals_loop(model, prompts, outputs, torch.tensor(rewards))
    # the batched path restores the flags it lowers and leaves no .grad behind
    assert [p.requires_grad for p in model.parameters()].count(False) == len(frozen)
    assert all(p.grad is None for p in model.parameters())


def test_padding_contributes_nothing():
    """An input's norm is the same alone (no padding beyond its own ragged
    samples) and batched with much longer prompts and outputs around it."""
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=torch.float64)
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=3, K=3, seed=6)
    long_prompt = list(range(4, 44))
    long_outputs = [list(range(5, 35)) + [tokenizer.eos_token_id], [7, tokenizer.eos_token_id],
                    list(range(9, 29)) + [tokenizer.eos_token_id]]
    alone = per_input_grad_norms(model, prompts[:1], outputs[:1], torch.tensor(rewards[:1]))
    padded = per_input_grad_norms(model, [long_prompt, prompts[0], long_prompt],
                                  [long_outputs, outputs[0], long_outputs],
                                  torch.tensor([[0.1, 0.9, 0.4], rewards[0], [0.3, 0.2, 0.8]]))
    np.testing.assert_allclose(padded[1].item(), alone[0].item(), rtol=1e-9)


def test_seq2seq_falls_back_to_the_loop(monkeypatch):
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-t5", dtype=torch.float64)
    model.eval()
    assert "seq2seq" in batched_grad_norms_unsupported(model)
    calls = []
    monkeypatch.setattr(gradnorm, "_batched_squared_grad_norms", lambda *a, **k: calls.append(a))
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=3, K=2, seed=7)
    assert_batched_equals_loop(model, prompts, outputs, torch.tensor(rewards))
    assert calls == []


def test_batched_float32_close_to_float64_loop():
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=torch.float32)
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=4, K=4, seed=8)
    single = per_input_grad_norms(model, prompts, outputs, torch.tensor(rewards))
    double = per_input_grad_norms_loop(model.double(), prompts, outputs, torch.tensor(rewards))
    np.testing.assert_allclose(single.numpy(), double.numpy(), rtol=1e-4)


# --------------------------------------------------------------------------
# Llama-family causal LMs (RMSNorm, SwiGLU gated MLP, rotary, grouped KV heads)
# --------------------------------------------------------------------------

def tiny_llama_family(tokenizer, family: str, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    model = model_cls(config).double().eval()
    with torch.no_grad():  # RMSNorm weights start at 1: move them off it, so a wrong â would show
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("form", ["auto", "ghost", "explicit"])
@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_batched_equals_loop_llama_family(family, tied, form):
    _, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2")
    model = tiny_llama_family(tokenizer, family, tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert batched_grad_norms_unsupported(model) is None  # it takes the batched path
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # biases covered too
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=5, K=3, seed=20)
    norms = assert_batched_equals_loop(model, prompts, outputs, torch.tensor(rewards), norm_form=form)
    assert (norms[:-1] > 0).all() and norms[-1] == 0


@pytest.mark.parametrize("name", ["builtin:tiny-gpt2", "llama"])
def test_tiny_memory_budget_is_still_exact(name):
    """A budget of one byte: one input per chunk and one token per LM-head block, so
    every input is a 'long' one whose head norm is accumulated block by block."""
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=torch.float64)
    if name == "llama":
        model = tiny_llama_family(tokenizer, "llama", tied=True)
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=4, K=3, seed=21)
    assert_batched_equals_loop(model, prompts, outputs, torch.tensor(rewards), memory_budget_bytes=1)


def test_unknown_norm_or_logit_step_falls_back_to_the_loop(monkeypatch):
    """Gemma's RMSNorm computes (1 + γ) ⊙ â: outside the family (the probe sees it), so
    the loop runs; a head followed by anything (here: scaled logits) is refused too."""
    from transformers import GemmaConfig, GemmaForCausalLM
    _, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2")
    config = GemmaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(6)
    gemma = GemmaForCausalLM(config).double().eval()
    assert "RMSNorm" in batched_grad_norms_unsupported(gemma)
    calls = []
    monkeypatch.setattr(gradnorm, "_batched_squared_grad_norms", lambda *a, **k: calls.append(a))
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=3, K=2, seed=22)
    assert_batched_equals_loop(gemma, prompts, outputs, torch.tensor(rewards))
    assert calls == []

    llama = tiny_llama_family(tokenizer, "llama", tied=False)
    forward = type(llama).forward

    def scaled_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(type(llama), "forward", scaled_forward)
    assert "lm_head" in batched_grad_norms_unsupported(llama)


@pytest.mark.parametrize("name", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_grad_norm_at_the_sampling_temperature(name):
    """grad_norm_of: sampling_policy takes ∇ log softmax(logits / T): checked against an
    unpadded per-sample computation at T = 2 written here, batched against the loop."""
    model, tokenizer = load_model_and_tokenizer(name, dtype=torch.float64)
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=4, K=3, seed=5)
    T = 2.0
    loop = per_input_grad_norms_loop(model, prompts, outputs, torch.tensor(rewards), temperature=T)
    for i in range(2):
        model.zero_grad()
        for k in range(3):
            baseline = sum(rewards[i][j] for j in range(3) if j != k) / 2
            if model.config.is_encoder_decoder:
                decoder = torch.tensor([[model.config.decoder_start_token_id] + outputs[i][k][:-1]])
                logits = model(input_ids=torch.tensor([prompts[i]]), decoder_input_ids=decoder).logits[0]
            else:
                logits = model(input_ids=torch.tensor([prompts[i] + outputs[i][k]])).logits[0, len(prompts[i]) - 1 : -1]
            log_prob = torch.log_softmax(logits / T, dim=-1).gather(-1, torch.tensor(outputs[i][k])[:, None]).sum()
            ((rewards[i][k] - baseline) / 3 * log_prob).backward()
        by_hand = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters() if p.grad is not None))
        assert loop[i].item() == pytest.approx(by_hand, rel=1e-6)
    at_one = per_input_grad_norms_loop(model, prompts, outputs, torch.tensor(rewards))
    assert not torch.allclose(loop[:3], at_one[:3])  # the temperature changes the norm
    batched = per_input_grad_norms(model, prompts, outputs, torch.tensor(rewards), temperature=T)
    np.testing.assert_allclose(batched.numpy(), loop.numpy(), rtol=1e-6, atol=0)
