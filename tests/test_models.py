"""Model loading (builtin, local directory, hub id), the char tokenizer, the
built-in task and its reward."""

import huggingface_hub.constants
import pytest
import torch

from workloads.text.models import (
    ModelNotAvailableError,
    encode_prompts,
    encode_targets,
    generate_outputs,
    load_model_and_tokenizer,
    sequence_log_probs,
)
from workloads.text.rewards import get_reward
from workloads.text.builtin_task import MAX_LENGTH, prompt_text, reverse_example
from workloads.text.tasks import task_named
from workloads.text.tokenizer import build_char_tokenizer


@pytest.mark.parametrize("name, encoder_decoder", [("builtin:tiny-gpt2", False), ("builtin:tiny-t5", True)])
def test_save_and_load_by_path(tmp_path, name, encoder_decoder):
    model, tokenizer = load_model_and_tokenizer(name)
    assert model.config.is_encoder_decoder == encoder_decoder
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path), dtype="float64")
    assert loaded.config.is_encoder_decoder == encoder_decoder
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.double(), b), key
    prompts = [prompt_text(s, encoder_decoder) for s in ("abc", "hello")]
    assert loaded_tokenizer(prompts)["input_ids"] == tokenizer(prompts)["input_ids"]
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, prompts, 512, encoder_decoder)
    targets = encode_targets(tokenizer, ["cba", "olleh"])
    torch.testing.assert_close(sequence_log_probs(loaded, prompt_ids, targets).float(),
                               sequence_log_probs(model, prompt_ids, targets))


def test_builtin_init_is_fixed_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a, _ = load_model_and_tokenizer("builtin:tiny-gpt2")
    assert torch.equal(torch.rand(1), expected_next)
    b, _ = load_model_and_tokenizer("builtin:tiny-gpt2")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_unreachable_hub_id_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(ModelNotAvailableError) as error:
        load_model_and_tokenizer("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in str(error.value)
    assert "local directory" in str(error.value)


def test_unknown_builtin_model():
    with pytest.raises(ValueError, match="builtin:tiny-gpt2"):
        load_model_and_tokenizer("builtin:huge")


def test_generate_outputs_end_at_eos_and_group_by_prompt():
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2")
    prompt_ids = encode_prompts(tokenizer, ["ab=", "abcdef="], 512, False)
    torch.manual_seed(0)
    outputs = generate_outputs(model, tokenizer, prompt_ids, num_return_sequences=3, max_new_tokens=6)
    assert len(outputs) == 2 * 3
    for out in outputs:
        assert 1 <= len(out) <= 6
        assert tokenizer.eos_token_id not in out[:-1]  # cut right after the first EOS
        assert tokenizer.pad_token_id not in out or out[-1] == tokenizer.eos_token_id


def test_char_tokenizer_roundtrip():
    tokenizer = build_char_tokenizer()
    ids = tokenizer("hello world=")["input_ids"]
    assert len(ids) == len("hello world=")  # one token per character, nothing added
    assert tokenizer.decode(ids) == "hello world="
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) \
        == "hello world="
    assert tokenizer("A")["input_ids"] == [tokenizer.unk_token_id]


def test_reverse_task_is_deterministic_and_varied():
    examples = [reverse_example("train", i) for i in range(500)]
    assert examples == [reverse_example("train", i) for i in range(500)]
    assert all(ex.target == ex.source[::-1] for ex in examples)
    assert {len(ex.source) for ex in examples} == set(range(1, MAX_LENGTH + 1))
    assert reverse_example("validation", 0) != reverse_example("train", 0)
    chosen = task_named("reverse").choose_inputs("train", 100, seed=7)
    assert chosen == task_named("reverse").choose_inputs("train", 100, seed=7) and len(set(chosen)) == 100
    with pytest.raises(ValueError, match="asked for 60000 inputs but split 'train' of 'reverse' has 50000"):
        task_named("reverse").choose_inputs("train", 60_000, seed=7)


def test_reverse_reward():
    reward_fn = get_reward("reverse")
    perfect, shifted, half, too_long, empty = reward_fn(
        [""] * 5, ["cba", "xcba", "cxx", "cbaxxx", ""], ["cba", "cba", "cba", "cba", "cba"])
    assert perfect.value == 1.0 and perfect.components["exact_match"] == 1.0
    assert shifted.value == 0.0 and shifted.components["length_match"] == pytest.approx(0.75)
    assert half.value == pytest.approx(1 / 3)
    assert too_long.value == pytest.approx(0.5) and too_long.components["length_match"] == pytest.approx(0.5)
    assert empty.value == 0.0
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("bleurt")
