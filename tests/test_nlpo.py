"""NLPO: the top-p action mask by hand, rollouts that never leave the mask, the
masked policy's log-probs, the mask policy's refresh, and a short run."""

import pydantic
import pytest
import torch

from conftest import read_local_table
from workloads import validate_config
from workloads.core.context import local_context
from workloads.text.models import load_model_and_tokenizer, output_logits
from workloads.text.nlpo import ActionMasker, top_p_allowed
from workloads.text.nlpo_config import NLPOConfig
from workloads.text.ppo import ActorCritic, run_ppo
from workloads.text.sampling import sample_outputs


def test_top_p_mask_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # cumulative mass 0.5, 0.8, 0.95, 1.0: the smallest set reaching 0.7 is {0, 1}
    assert top_p_allowed(logits, 0.7, 1).tolist() == [True, True, False, False]
    # min_tokens_to_keep 3 keeps the three most likely whatever their mass
    assert top_p_allowed(logits, 0.7, 3).tolist() == [True, True, True, False]
    # the order of the vocabulary does not matter
    assert top_p_allowed(logits[[2, 0, 3, 1]], 0.7, 1).tolist() == [False, True, False, True]


def _masker(model, tokenizer, top_mask=0.3):
    return ActionMasker(model, top_mask, min_tokens_to_keep=1, special_ids=tokenizer.all_special_ids, update_every=1)


@pytest.mark.parametrize("name", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_rollouts_sample_only_allowed_tokens(name):
    model, tokenizer = load_model_and_tokenizer(name)
    masker = _masker(model, tokenizer)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    gen = NLPOConfig(model=name).generation.model_copy(update={"max_new_tokens": 8})
    torch.manual_seed(0)
    outputs = sample_outputs(model, tokenizer, prompts, 4, gen, masker.logits_processor)
    repeated = [p for p in prompts for _ in range(4)]
    logits, ids, mask, _ = output_logits(masker.model, repeated, outputs)
    allowed = masker.allowed(logits).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert allowed[mask.bool()].all()
    # the mask is narrow: far fewer tokens than the vocabulary are allowed at each step
    assert masker.allowed(logits)[mask.bool()].sum(-1).float().mean() < 0.5 * logits.shape[-1]


def test_masked_policy_log_probs_by_hand():
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2")
    value_model, _ = load_model_and_tokenizer("builtin:tiny-gpt2")
    prompts, outputs = [[5, 6, 7]], [[10, 11, 2]]
    masks = torch.zeros(1, 3, len(tokenizer), dtype=torch.bool)
    masks[0, :, [2, 10, 11, 12]] = True
    log_probs, entropy, _, _ = ActorCritic(model, value_model, temperature=2.0).eval()(prompts, outputs, masks)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0] + outputs[0]])).logits[0, 2:5] / 2.0
    restricted = torch.log_softmax(logits[:, [2, 10, 11, 12]], dim=-1)  # renormalised over the allowed set
    torch.testing.assert_close(log_probs[0], restricted[[0, 1, 2], [1, 2, 0]])
    torch.testing.assert_close(entropy[0], -(restricted.exp() * restricted).sum(-1))


def test_config_rules():
    assert NLPOConfig().top_mask == 0.9 and NLPOConfig().min_tokens_to_keep == 100
    with pytest.raises(pydantic.ValidationError, match="top_mask"):
        NLPOConfig(top_mask=0.0)
    with pytest.raises(pydantic.ValidationError, match="mask_type"):
        NLPOConfig(mask_type="topk")
    assert type(validate_config("nlpo", {"target_update_iterations": 5})) is NLPOConfig


def test_short_nlpo_run_refreshes_its_mask_policy(tmp_path, monkeypatch):
    refreshed = []
    original = ActionMasker.refresh
    monkeypatch.setattr(ActionMasker, "refresh", lambda self, lm: (refreshed.append(1), original(self, lm))[1])
    ctx = local_context(str(tmp_path), show_progress=False)
    config = NLPOConfig(num_train_inputs=16, num_eval_inputs=4, inputs_per_rollout=4, num_samples_per_input=2,
                        rollout_tokens=None, minibatch_size=16, ppo_epochs=1, num_rollouts=4, learning_rate=3e-4,
                        top_mask=0.5, min_tokens_to_keep=1, target_update_iterations=2,
                        generation={"max_new_tokens": 6})
    metrics = run_ppo(config, ctx)
    assert len(refreshed) == 2  # after rollouts 2 and 4
    for key in ("policy_loss", "value_loss", "entropy", "kl", "approx_kl"):
        assert metrics[key] == metrics[key], key  # finite, not NaN
    assert set(read_local_table(tmp_path, "inputs").step) == {0, 4}
