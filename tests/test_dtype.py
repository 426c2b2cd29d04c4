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
