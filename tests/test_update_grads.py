"""The update's own backward (workloads/text/update_grads.py; grpo.py's UpdateMonitor): each
prompt's share of every optimiser step's gradient, the leave-one-out norms derived from it, and
the skipped zero-advantage completions -- all in float64 against loops that know nothing of it:
one prompt at a time through an ordinary autograd backward of the same loss (the other prompts'
log-probs detached), gradnorm's per-input loop at the policy that sampled, and the ordinary
update that runs every completion. (Llama's RMSNorm computes in float32 even in a float64 model:
two batchings of the same sequences then round apart at ~1e-9, hence 1e-6, the issue's bound.)"""

from __future__ import annotations

import copy

import pytest
import torch
from test_gradnorm import tiny_llama_family

from workloads.text import grpo
from workloads.text.gradnorm import per_input_grad_norms_loop
from workloads.text.grpo import Learner, UpdateMonitor, grpo_loss, grpo_update, rloo_loss
from workloads.text.grpo_config import GRPOConfig
from workloads.text.models import load_model_and_tokenizer, token_log_probs
from workloads.text.rewards import Reward
from workloads.text.rl_loop import Ranks
from workloads.text.sampling import Group, Prompts, ScoredSamples
from workloads.text.tokenizer import build_char_tokenizer

K, EOS, MAX_NEW_TOKENS = 4, 2, 4
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
COMPLETIONS = [[[20, 21, EOS], [22, EOS], [23, 24, 25, 26], [27, EOS]],
               [[30, 31, EOS], [32, EOS], [33, 34, 35, EOS], [36, 37, 38, 39]],
               [[40, EOS], [41, 42, EOS], [43, EOS], [44, 45, 46, EOS]],
               [[47, 48, 49, 50], [4, EOS], [9, EOS], [EOS]]]
# an equal-reward group (its completions are skipped when beta = 0) and one with a reward at its mean
# (advantage exactly 0 for that completion only: a partly skipped group)
REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.5, 0.25, 0.25], [0.75, 0.0, 1.0, 0.5]]
EQUAL_LENGTHS = [[[20, 21, EOS], [22, 3, EOS], [23, 24, 25], [27, 28, EOS]],
                 [[30, 31, EOS], [32, 3, EOS], [33, 34, EOS], [36, 37, 38]],
                 [[40, 3, EOS], [41, 42, EOS], [43, 3, EOS], [44, 45, 46]],
                 [[47, 48, 49], [4, 3, EOS], [9, 3, EOS], [6, 3, EOS]]]


def tiny_llama(tied: bool):
    """gradnorm's tiny float64 Llama (grouped KV heads, RMSNorm weights off 1), its own RNG state."""
    with torch.random.fork_rng(devices=[]):
        return tiny_llama_family(load_model_and_tokenizer("builtin:tiny-gpt2")[1], "llama", tied)


def groups_of(completions=COMPLETIONS, rewards=REWARDS) -> list[Group]:
    tokenizer = build_char_tokenizer()
    return [Group(i, None, Prompts([str(i)], [PROMPTS[i]], [[]], [{}], [i]),
                  ScoredSamples.of(K, completions[i], tokenizer.batch_decode(completions[i]),
                                   [Reward(r) for r in rewards[i]]))
            for i in range(len(PROMPTS))]


class SGD(torch.optim.Optimizer):
    """Plain normalised gradient steps (so later minibatches see moved ratios, clipped), keeping
    every gradient applied."""

    def __init__(self, params, step_length: float = 1.5):
        super().__init__(params, {})
        self.step_length, self.grads = step_length, []

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        flat = torch.cat([p.grad.flatten() for p in params])
        self.grads.append(flat.clone())
        with torch.no_grad():
            for p in params:
                p -= self.step_length * p.grad / flat.norm().clamp(min=1e-30)


def learner_for(options: dict, model, update_path="auto", minibatches=1, iterations=1) -> Learner:
    config = GRPOConfig.model_validate({
        "model": "builtin:tiny-gpt2", "task": "reverse", "num_samples_per_input": K, "inputs_per_step": 1,
        "num_train_inputs": 8, "minibatch_size": K * len(PROMPTS) // minibatches, "num_iterations": iterations,
        "max_grad_norm": None, "generation": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.5}, **options})
    reference = None
    if config.beta > 0:  # π_ref away from the policy, so that the KL term has a gradient from the first step
        reference = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            for p in reference.parameters():
                p += 0.05 * torch.randn_like(p)
    return Learner(config, model, SGD(model.parameters()), Ranks(0, 1, torch.device("cpu")), reference,
                   stop_ids={EOS, 0}, update_path=update_path)


def one_prompt_at_a_time(learner: Learner, batch, idx: list[int]) -> tuple[dict[int, float], torch.Tensor]:
    """The reference, at the current policy: for each group in minibatch `idx`, the norm of the gradient
    of the minibatch loss (every completion run, none skipped) through that group's log-probs only;
    and the whole minibatch's gradient."""
    config, policy = learner.config, learner.policy
    params = [p for p in policy.parameters() if p.requires_grad]

    def loss_through(through) -> torch.Tensor:
        log_probs, mask = token_log_probs(policy, [batch.prompts[i] for i in idx], [batch.outputs[i] for i in idx],
                                          config.generation.temperature)
        width = log_probs.shape[1]
        log_probs = torch.where(through[:, None], log_probs, log_probs.detach())
        mask = mask.to(log_probs) * batch.keep[idx].to(log_probs)[:, None]
        old = log_probs.detach() if batch.old_log_probs is None else batch.old_log_probs[idx, :width]
        ref = None if batch.ref_log_probs is None else batch.ref_log_probs[idx, :width]
        advantages = batch.advantages[idx].to(log_probs).unsqueeze(1)
        if config.advantage_estimator == "rloo":
            return rloo_loss(config, log_probs, old, ref, advantages, mask)[0]
        normaliser = batch.loss_tokens / batch.num_minibatches
        return grpo_loss(config, log_probs, old, ref, advantages, mask, normaliser)[0]

    group_of = torch.tensor([i // K for i in idx])
    norms = {}
    for g in group_of.unique().tolist():
        grads = torch.autograd.grad(loss_through(group_of == g), params, allow_unused=True)
        norms[g] = torch.sqrt(sum(x.square().sum() for x in grads if x is not None)).item()
    whole = torch.autograd.grad(loss_through(torch.ones(len(idx), dtype=torch.bool)), params)
    return norms, torch.cat([x.flatten() for x in whole])


def run_update(learner: Learner, groups, monkeypatch, order=None):
    """grpo_update with the monitor on; every first-pass minibatch step is checked against the
    reference before it runs. Returns the monitor, the reference norms and whole gradients."""
    real_step = grpo.minibatch_step
    expected_norms, expected_grads = {}, []

    def checked_step(learner, batch, idx, monitor=None, first=False):
        norms, whole = one_prompt_at_a_time(learner, batch, idx)
        expected_grads.append(whole)
        if monitor is not None:
            expected_norms.update(norms)
        return real_step(learner, batch, idx, monitor, first)

    monkeypatch.setattr(grpo, "minibatch_step", checked_step)
    monitor = UpdateMonitor()
    grpo_update(learner, groups, order=order, monitor=monitor)
    return monitor, expected_norms, expected_grads


CASES = {f"{loss_type}-beta{beta}": dict(loss_type=loss_type, beta=beta)
         for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo") for beta in (0.0, 0.1)}
CASES.update({
    "rloo-raw": dict(advantage_estimator="rloo"), "rloo-normalized-beta0.1": dict(
        advantage_estimator="rloo", normalize_advantages=True, beta=0.1),
    "sequence-level-grpo": dict(importance_sampling_level="sequence", loss_type="grpo"),
    "mask-truncated-dapo": dict(mask_truncated_completions=True), "delta-dapo": dict(delta=1.05),
})
SCHEDULES = {"one-step": (1, 1), "two-minibatches": (2, 1), "two-iterations": (1, 2)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_each_prompts_share_of_the_update_equals_one_prompt_at_a_time(case, schedule, monkeypatch):
    minibatches, iterations = SCHEDULES[schedule]
    learner = learner_for(CASES[case], tiny_llama(tied=True), minibatches=minibatches, iterations=iterations)
    assert learner.per_prompt  # the update's own backward is the path under test
    monitor, expected, expected_grads = run_update(learner, groups_of(), monkeypatch)
    assert sorted(monitor.update_norms) == sorted(expected) == [0, 1, 2, 3]
    for g, norm in expected.items():
        assert monitor.update_norms[g] == pytest.approx(norm, rel=1e-6, abs=1e-12), f"group {g}"
    # the gradient each step applied is the ordinary one of the whole minibatch, skipped completions and all
    assert len(learner.optimizer.grads) == len(expected_grads) == minibatches * iterations
    for step, (applied, whole) in enumerate(zip(learner.optimizer.grads, expected_grads)):
        assert (applied - whole).norm() <= 1e-10 * whole.norm().clamp(min=1e-30), f"step {step}"


def test_an_equal_reward_group_is_not_run_and_has_share_zero(monkeypatch):
    ran = []
    real = grpo.update_backward
    monkeypatch.setattr(grpo, "update_backward", lambda model, prompts, outputs, sizes, *a, **k: (
        ran.append((len(outputs), list(sizes))), real(model, prompts, outputs, sizes, *a, **k))[1])
    learner = learner_for({"loss_type": "dapo"}, tiny_llama(tied=False))
    monitor, expected, _ = run_update(learner, groups_of(), monkeypatch)
    # group 1 (rewards all 0.5) and group 2's completions at the mean (advantage 0) never reach the model
    assert ran == [(4 + 2 + 4, [4, 2, 4])]
    assert monitor.update_norms[1] == 0.0 == expected[1]
    # alone in its minibatch, nothing runs at all (a zero-loss step), and its share is still recorded as 0
    ran.clear()
    learner = learner_for({"loss_type": "dapo"}, tiny_llama(tied=False), minibatches=4)
    monitor, _, _ = run_update(learner, groups_of(), monkeypatch, order=list(range(len(PROMPTS) * K)))
    assert [sizes for _, sizes in ran] == [[4], [2], [4]]  # group 1's minibatch never reached the backward
    assert sorted(monitor.update_norms) == [0, 1, 2, 3] and monitor.update_norms[1] == 0.0


@pytest.mark.parametrize("case,derived", [
    ("dapo", [0, 1, 2, 3]), ("dr_grpo", [0, 1, 2, 3]), ("rloo-raw", [0, 1, 2, 3]),
    ("grpo-equal-lengths", [0, 1, 2, 3]),
    ("grpo", [1]),  # 1/|o_k| with lengths that differ: not proportional (only the std-0 group is known)
    ("dapo-beta0.1", [1]),  # the KL term's per-token weights differ within a completion
    ("rloo-normalized", [0, 1, 2, 3]),  # leave-one-out advantages have mean 0 per group: normalising scales them
    ("rloo-beta0.1", [1]),  # the KL penalty moves each reward: not the leave-one-out weights of the rewards
    ("mask-truncated-dapo", [1]),
])
def test_leave_one_out_norms_from_the_update_equal_the_loop_where_derived(case, derived, monkeypatch):
    options = {"dapo": {}, "dr_grpo": {"loss_type": "dr_grpo"}, "rloo-raw": {"advantage_estimator": "rloo"},
               "grpo-equal-lengths": {"loss_type": "grpo"}, "grpo": {"loss_type": "grpo"},
               "dapo-beta0.1": {"beta": 0.1},
               "rloo-normalized": {"advantage_estimator": "rloo", "normalize_advantages": True},
               "rloo-beta0.1": {"advantage_estimator": "rloo", "beta": 0.1},
               "mask-truncated-dapo": {"mask_truncated_completions": True}}[case]
    completions = EQUAL_LENGTHS if case == "grpo-equal-lengths" else COMPLETIONS
    model = tiny_llama(tied=True)
    sampled_by = copy.deepcopy(model)
    learner = learner_for({**options, "grad_norm_of": "sampling_policy"}, model, minibatches=2)
    monitor, _, _ = run_update(learner, groups_of(completions), monkeypatch,
                               order=list(range(len(PROMPTS) * K)))  # minibatch 1: groups 0, 1; 2: groups 2, 3
    # only the first optimiser step is at the policy that sampled: groups 2 and 3 take the separate pass
    assert sorted(monitor.loo_norms) == [g for g in derived if g < 2]
    expected = per_input_grad_norms_loop(sampled_by, PROMPTS, completions, torch.tensor(REWARDS), temperature=1.5)
    for g, norm in monitor.loo_norms.items():
        assert norm == pytest.approx(expected[g].item(), rel=1e-6, abs=1e-12), f"group {g}"
    # ... and the log-probs at T = 1 of the first step's completions that ran, at the policy that sampled
    for j, value in monitor.log_probs.items():
        reference = token_log_probs(sampled_by, [PROMPTS[j // K]], [completions[j // K][j % K]])[0].sum()
        assert value == pytest.approx(reference.item(), rel=1e-6)


def test_one_minibatch_derives_every_group_and_the_ordinary_path_derives_none(monkeypatch):
    model = tiny_llama(tied=True)
    sampled_by = copy.deepcopy(model)
    monitor, _, _ = run_update(learner_for({}, model), groups_of(), monkeypatch)
    expected = per_input_grad_norms_loop(sampled_by, PROMPTS, COMPLETIONS, torch.tensor(REWARDS), temperature=1.5)
    assert sorted(monitor.loo_norms) == [0, 1, 2, 3]
    torch.testing.assert_close(torch.tensor([monitor.loo_norms[g] for g in range(4)], dtype=torch.float64), expected,
                               rtol=1e-6, atol=0)
    ordinary = learner_for({}, tiny_llama(tied=True), update_path="autograd")
    assert not ordinary.per_prompt
    monitor, _, _ = run_update(ordinary, groups_of(), monkeypatch)
    assert monitor.loo_norms == {} and monitor.update_norms == {}  # the separate pass measures them


def test_groups_stay_whole_in_minibatches_unless_completions_are_shuffled():
    learner = learner_for({"minibatch_size": 8}, tiny_llama(tied=False))
    splits = []
    real = grpo.minibatch_step
    grpo.minibatch_step = lambda learner, batch, idx, *a, **k: (splits.append(sorted(idx)), real(learner, batch, idx,
                                                                                                 *a, **k))[1]
    try:
        torch.manual_seed(3)
        grpo_update(learner, groups_of())
        assert all(len({i // K for i in idx}) == 2 and len(idx) == 8 for idx in splits)
        splits.clear()
        learner.config = learner.config.model_copy(update={"minibatch_shuffle": "completions"})
        torch.manual_seed(3)
        grpo_update(learner, groups_of())
        assert any(len({i // K for i in idx}) > 2 for idx in splits)
    finally:
        grpo.minibatch_step = real


def test_a_grpo_run_records_what_the_separate_pass_would_at_the_policy_that_sampled(tmp_path, monkeypatch):
    """End to end (tiny GPT-2, float32): at the moment the update hands over (before its first optimiser
    step), the norms and log-probs it measured for the record equal the separate pass's and a no-grad
    forward's; the `inputs` table holds both norms, the update's share 0 exactly for equal rewards."""
    from conftest import read_local_table
    from test_grpo import TINY
    from workloads.core.context import local_context

    checked = []
    real = grpo.GRPORun.measure_rest

    def measure_rest(self, fresh, trained, monitor):
        measured = real(self, fresh, trained, monitor)
        if not fresh:  # step 1 trains on step 0's evaluation samples, recorded then
            return measured
        expected = self.grad_norms(fresh)
        prompts, scored = Group.joined(fresh)
        log_probs = [v for sums in self.sequence_log_probs(prompts, scored) for v in sums]
        assert measured["grad_norms"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert measured["log_probs"] == pytest.approx(log_probs, rel=1e-5, abs=1e-5)
        checked.append(len(monitor.loo_norms))
        return measured

    monkeypatch.setattr(grpo.GRPORun, "measure_rest", measure_rest)
    ctx = local_context(str(tmp_path / "run"), show_progress=False)
    grpo.run_grpo(GRPOConfig.model_validate({**TINY, "minibatch_size": 64}), ctx)
    assert len(checked) == TINY["num_steps"] - 1 and sum(checked) > 0  # some norms came from the update's backward
    inputs = read_local_table(str(tmp_path / "run"), "inputs")
    trained = inputs[inputs.update_grad_norm.notna()]
    assert len(trained) == TINY["inputs_per_step"] * (TINY["num_steps"] - 1)  # step 1's rows were written at step 0
    assert (trained[trained.reward_std_zero].update_grad_norm == 0).all()
    assert (trained[~trained.reward_std_zero].update_grad_norm > 0).all()
