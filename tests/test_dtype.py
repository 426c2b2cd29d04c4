"""The sampling model's dtype setting (float32 | bfloat16 | auto) and the batched
gradient norms of a bfloat16 model."""

import numpy as np
import pytest
import torch

from workloads.text import models
from workloads.text.gradnorm import per_input_grad_norms, per_input_grad_norms_loop
from workloads.text.models import load_model_and_tokenizer, resolve_dtype
from tests.test_gradnorm import random_groups


def test_resolve_dtype_names_and_auto(monkeypatch):
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float33")
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_load_model_with_auto_dtype(monkeypatch):
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    model, _ = load_model_and_tokenizer("builtin:tiny-gpt2", dtype="auto")
    assert model.dtype is torch.bfloat16


def test_batched_grad_norms_of_a_bfloat16_model():
    """Norms accumulate in float32 for a bf16 model: close to the float64 loop at bf16's precision."""
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2", dtype="bfloat16")
    model.eval()
    prompts, outputs, rewards = random_groups(tokenizer, num_inputs=4, K=4, seed=30)
    half = per_input_grad_norms(model, prompts, outputs, torch.tensor(rewards))
    assert half.dtype is torch.float64 and torch.isfinite(half).all()
    reference = per_input_grad_norms_loop(model.double(), prompts, outputs, torch.tensor(rewards))
    np.testing.assert_allclose(half.numpy(), reference.numpy(), rtol=0.05)


def test_sampling_model_is_a_refreshed_copy_in_the_sampling_dtype():
    """A float32 policy sampled in bf16: a bf16 copy that follows every update on refresh();
    in its own dtype the policy itself (nothing copied)."""
    from workloads.text.sampling import SamplingModel

    policy, _ = load_model_and_tokenizer("builtin:tiny-gpt2", dtype="float32")
    assert SamplingModel(policy, torch.float32).model is policy
    sampler = SamplingModel(policy, torch.bfloat16)
    assert sampler.model is not policy and sampler.model.dtype is torch.bfloat16
    assert not any(p.requires_grad for p in sampler.model.parameters())
    with torch.no_grad():  # an "update"
        for p in policy.parameters():
            p.add_(0.25)
    assert not torch.equal(next(sampler.model.parameters()).float(), next(policy.parameters()).to(torch.bfloat16).float())
    sampler.refresh()
    for mine, theirs in zip(sampler.model.state_dict().values(), policy.state_dict().values()):
        assert torch.equal(mine, theirs.to(mine.dtype))
