"""The GRPO family (workloads/text/grpo.py): advantages and losses against hand
computation, the prompt choosers on hand examples, dynamic sampling, per-step
`inputs` rows, bad configs, and a tiny run whose reward rises."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from conftest import keep_every_checkpoint, read_local_table
from workloads.core.context import local_context
from workloads.text import grpo
from workloads.text.grpo import (aggregate_loss, choose_prompts, clipped_token_loss, group_advantages, k3_kl,
                                 policy_loss, predicted_zero_std, success_estimate, variance_order)
from workloads.text.grpo_config import GRPOConfig

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


# ---------------------------------------------------------------- the math


def test_advantages_of_every_variant_by_hand():
    s1 = math.sqrt((4 * 0.5**2) / 3)  # unbiased std of [1, 0, 0, 1] (TRL nanstd: Bessel)
    s3 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)  # of [0, 0, 0, 1] = 0.5
    expected = {
        "grpo": [[a / (s1 + 1e-4) for a in (0.5, -0.5, -0.5, 0.5)], [0.0] * 4,
                 [-0.25 / (s3 + 1e-4)] * 3 + [0.75 / (s3 + 1e-4)]],
        "dr_grpo": [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]],
        # leave-one-out: 1 - (1 + 0 + 0)/3 = 2/3, 0 - 2/3; 0 - 1/3, 1 - 0
        "rloo": [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4, [-1 / 3, -1 / 3, -1 / 3, 1.0]],
    }
    expected["dapo"] = expected["grpo"]
    for variant, values in expected.items():
        got = group_advantages(REWARDS, variant)
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert (got[1] == 0).all()  # an equal-reward group: advantage exactly 0 in every variant


def test_loss_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 5.0], [3.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "grpo", 4, 0).item() == pytest.approx((3 / 2 + 3 / 1) / 2)
    assert aggregate_loss(per_token, mask, "dr_grpo", 4, 0).item() == pytest.approx(6 / (2 * 4))
    assert aggregate_loss(per_token, mask, "dapo", 4, 3.0).item() == pytest.approx(6 / 3)


def test_decoupled_clip_and_k3_by_hand():
    log_ratio = torch.log(torch.tensor([[0.5, 1.1, 1.5]]))
    old = torch.zeros(1, 3)
    # A > 0: ratio capped at 1 + eps_high = 1.28 -> -min(1.5, 1.28) = -1.28; 0.5 is kept (min with 0.8)
    loss, clipped = clipped_token_loss(log_ratio, old, torch.tensor([[1.0]]), 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.1, -1.28]]))
    assert clipped.tolist() == [[False, False, True]]
    # A < 0: ratio floored at 1 - eps_low = 0.8 -> -min(-0.5, -0.8) = 0.8; 1.5 kept
    loss, clipped = clipped_token_loss(log_ratio, old, torch.tensor([[-1.0]]), 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[0.8, 1.1, 1.5]]))
    assert clipped.tolist() == [[True, False, False]]
    logp, ref = torch.tensor([0.0, -1.0]), torch.tensor([0.0, -2.0])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.0, math.exp(-1) + 1 - 1]))


def test_policy_loss_adds_beta_kl_and_rloo_is_sequence_level():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0], [-1.0]])
    config = GRPOConfig(variant="grpo", beta=0.1)
    ref = logp - 0.5  # k3 = e^-0.5 + 0.5 - 1 per token
    loss, stats = policy_loss(config, logp, logp, ref, adv, mask, 3.0)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = -0.5
    # ratio 1 everywhere: per-token loss -A + beta k3; grpo: mean over sequences of token means
    assert loss.item() == pytest.approx(((-1 + 0.1 * k3) + (1 + 0.1 * k3)) / 2, rel=1e-5)  # float32
    assert stats["kl"] == pytest.approx(k3)
    rloo, _ = policy_loss(GRPOConfig(variant="rloo"), logp, logp, None, adv, mask, 3.0)
    assert rloo.item() == pytest.approx((-1 + 1) / 2)


# ---------------------------------------------------------------- choosing prompts


def test_p_one_minus_p_choice_by_hand():
    history = {1: [(0.9, 0.3), (0.5, 0.5)],  # window 2: p = 0.7 -> 0.21
               2: [(1.0, 0.0), (1.0, 0.0)],  # p = 1 -> 0
               3: [(0.0, 0.0)],  # p = 0 -> 0
               4: [(0.0, 0.0), (0.5, 0.5), (0.5, 0.5)],  # last two: p = 0.5 -> 0.25
               # 5: never seen -> p = 0.5 -> 0.25
               }
    assert success_estimate(history[1], 2) == pytest.approx(0.7)
    assert success_estimate(history[4], 2) == pytest.approx(0.5)
    order = variance_order([1, 2, 3, 4, 5], history, 2, random.Random(0))
    assert set(order[:2]) == {4, 5} and order[2] == 1 and set(order[3:]) == {2, 3}
    config = GRPOConfig(selection="variance", num_train_inputs=5, inputs_per_step=3, history_window=2)
    assert set(choose_prompts(config, [1, 2, 3, 4, 5], history, step=1).order[:3]) == {4, 5, 1}


def test_zero_std_prediction_and_skipping():
    assert predicted_zero_std([(0.0, 0.0), (1.0, 0.0)], 2)
    assert not predicted_zero_std([(0.0, 0.0)], 2)  # not enough history
    assert not predicted_zero_std([(0.0, 0.0), (0.5, 0.5)], 2)
    history = {1: [(0.0, 0.0), (0.0, 0.0)], 2: [(0.5, 0.5), (0.0, 0.0)], 3: [(1.0, 0.0), (1.0, 0.0)]}
    always = GRPOConfig(skip_predicted_zero_std=True, skip_probability=1.0, num_train_inputs=3, inputs_per_step=1)
    choice = choose_prompts(always, [1, 2, 3], history, step=4)
    assert sorted(choice.skipped) == [1, 3] and choice.order == [2] and not choice.predicted
    never = always.model_copy(update={"skip_probability": 0.0})
    choice = choose_prompts(never, [1, 2, 3], history, step=4)
    assert not choice.skipped and sorted(choice.order) == [1, 2, 3] and choice.predicted == {1, 3}


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize("values, message", [
    ("num_samples_per_input: 1", "a group method needs K >= 2"),
    ("{epsilon_low: 0.2, epsilon_high: 0.1}", "epsilon_high (0.1) < epsilon_low (0.2)"),
    ("{selection: variance, history_window: 0}", "selection: variance needs history"),
    ("{skip_predicted_zero_std: true, history_window: 0}", "skip_predicted_zero_std needs history"),
])
def test_bad_configs_are_one_line(values, message, tmp_path, capsys):
    from orchestrator.cli import main

    config = values if values.startswith("{") else "{" + values + "}"
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"sweep: bad\nstages:\n  - name: g\n    workload: grpo\n    config: {config}\n")
    code = main(["validate", str(spec)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rlgrad: error: ") and err.count("\n") == 1, err
    assert message in err, err


# ---------------------------------------------------------------- runs on the tiny model

TINY = dict(model="builtin:tiny-gpt2", task="reverse", num_train_inputs=16, inputs_per_step=8, num_samples_per_input=4,
            num_steps=3, learning_rate=1e-3, generation={"max_new_tokens": 12})


def run(tmp_path, name, **overrides):
    ctx = local_context(str(tmp_path / name), show_progress=False)
    metrics = grpo.run_grpo(GRPOConfig.model_validate({**TINY, **overrides}), ctx)
    return metrics, ctx, read_local_table(str(tmp_path / name), "inputs")


def test_dynamic_sampling_never_trains_on_equal_rewards_and_counts_refills(tmp_path, monkeypatch):
    trained = []
    real_update = grpo.grpo_update
    monkeypatch.setattr(grpo, "grpo_update", lambda r, groups: (trained.append(list(groups)), real_update(r, groups))[1])
    metrics, ctx, inputs = run(tmp_path, "dyn", dynamic_sampling=True, max_refill_rounds=3)
    assert len(trained) == TINY["num_steps"]
    assert all(g.std > 0 for groups in trained for g in groups)  # never an equal-reward group
    reports = ctx.reported[:-1]
    K = TINY["num_samples_per_input"]
    for step, report in enumerate(reports, start=1):
        dropped = report["num_prompts_sampled"] - report["num_prompts_trained"]
        # every refill replaced a dropped group: sampled = P + refilled prompts
        assert report["refill_rollouts"] == (report["num_prompts_sampled"] - TINY["inputs_per_step"]) * K
        assert dropped == report["share_zero_std"] * report["num_prompts_sampled"]
    assert sum(r["refill_rollouts"] for r in reports) == reports[-1]["cumulative_refill_rollouts"] > 0
    # steps 2.. sampled fresh: their inputs rows (at step - 1) are exactly the sampled prompts
    for step, report in enumerate(reports[1:], start=2):
        assert (inputs.step == step - 1).sum() == report["num_prompts_sampled"]


def test_per_step_inputs_rows(tmp_path):
    metrics, ctx, inputs = run(tmp_path, "rows")
    P, N = TINY["num_train_inputs"], TINY["num_steps"]
    steps = sorted(inputs.step.unique())
    assert steps == list(range(N + 1))  # eval at 0 (= step 1's rollout), rollouts at 1..N-1, final eval at N
    assert (inputs.step == 0).sum() == P and (inputs.step == N).sum() == P
    for s in range(1, N):
        assert (inputs.step == s).sum() == TINY["inputs_per_step"]
    assert not inputs.duplicated(["step", "input_id"]).any()
    assert (inputs.num_samples == TINY["num_samples_per_input"]).all()
    zero = inputs[inputs.reward_std == 0]
    assert len(zero) > 0 and zero.reward_std_zero.all() and (zero.grad_norm == 0).all()
    assert (~inputs[inputs.reward_std > 0].reward_std_zero).all() and (inputs[inputs.reward_std > 0].grad_norm > 0).all()
    samples = read_local_table(str(tmp_path / "rows"), "samples")
    assert len(samples) == len(inputs) * TINY["num_samples_per_input"]
    names = set(read_local_table(str(tmp_path / "rows"), "metrics").metric)
    assert {"share_zero_std", "rollouts_on_zero_std", "share_tokens_on_zero_std", "reward_gain"} <= names
    # the final evaluation by initial reward std, recomputed from the per-step rows
    start = inputs[inputs.step == 0].set_index("input_id")
    end = inputs[inputs.step == N].set_index("input_id").loc[start.index]
    started_zero = start.reward_std == 0
    assert metrics["eval_num_inputs_initial_std_lt_0.01"] == started_zero.sum()
    assert metrics["eval_reward_mean_initial_std_lt_0.01"] == pytest.approx(end.reward_mean[started_zero].mean())
    assert metrics["eval_share_zero_std_initial_std_lt_0.01"] == pytest.approx((end.reward_std[started_zero] == 0).mean())
    assert metrics["eval_num_inputs_initial_std_ge_0.1"] == (start.reward_std >= 0.1).sum()

    from orchestrator.report import build_report

    page = open(build_report(str(tmp_path / "rows"), "local"), encoding="utf-8").read()
    started_zero = int((inputs[inputs.step == 0].reward_std == 0).sum())
    assert 'id="trajectories-trial"' in page and f"{started_zero} of {P} prompts started at reward std 0" in page
    # the scatter plots draw the trial before and after training; the steps between are the trajectories'
    assert "trial @ step 0" in page and f"trial @ step {N}" in page
    assert not any(f"trial @ step {s}" in page for s in range(1, N))


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "rloo", "dapo"])
def test_every_variant_runs_and_checkpoints(tmp_path, variant):
    from workloads.text.models import load_model_and_tokenizer

    metrics, ctx, _ = run(tmp_path, variant, variant=variant, num_steps=2, beta=0.05, num_iterations=2,
                          minibatch_size=16)
    assert all(math.isfinite(metrics[k]) for k in ("loss", "kl", "clip_fraction", "eval_reward_mean"))
    assert os.path.isfile(os.path.join(ctx.checkpoint_path, "rlgrad_grpo_state.json"))
    load_model_and_tokenizer(ctx.checkpoint_path)


def test_resume_from_mid_run_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    from workloads.text.models import load_model_and_tokenizer

    # p(1-p) selection and skipping read the prompts' history, so a resume that lost it would choose other prompts
    settings = dict(num_steps=4, checkpoint_every_steps=2, selection="variance", skip_predicted_zero_std=True)
    checkpoints = {}
    full = local_context(str(tmp_path / "full"), show_progress=False)
    keep_every_checkpoint(full, checkpoints, tmp_path)
    grpo.run_grpo(GRPOConfig.model_validate({**TINY, **settings}), full)
    assert sorted(checkpoints) == [2, 4]
    # the mid-run checkpoint carries the optimiser's moments; the final one, which nothing trains on from, does not
    assert grpo.OPTIMIZER_FILE in os.listdir(checkpoints[2]) and grpo.OPTIMIZER_FILE not in os.listdir(checkpoints[4])

    resumed = local_context(str(tmp_path / "resumed"), show_progress=False)
    resumed.resume_from = str(checkpoints[2])
    grpo.run_grpo(GRPOConfig.model_validate({**TINY, **settings}), resumed)
    # it goes on at step 3 (no step-0 evaluation again) and, with weights, moments, history and
    # per-step seeds restored, repeats the uninterrupted run's steps 3 and 4 exactly
    assert [r["step"] for r in resumed.reported] == [3, 4, 4]
    for key in ("reward_mean", "share_zero_std", "num_prompts_sampled", "skipped_prompts", "cumulative_rollouts_saved",
                "loss", "eval_reward_mean"):
        assert [r.get(key) for r in resumed.reported] == [r.get(key) for r in full.reported[2:]], key
    a, _ = load_model_and_tokenizer(resumed.checkpoint_path)
    b, _ = load_model_and_tokenizer(full.checkpoint_path)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=key)

    # a retry from the final checkpoint (no moments in it) only evaluates again
    again = local_context(str(tmp_path / "again"), show_progress=False)
    again.resume_from = str(checkpoints[4])
    metrics = grpo.run_grpo(GRPOConfig.model_validate({**TINY, **settings}), again)
    assert [r["step"] for r in again.reported] == [4] and metrics["eval_reward_mean"] == full.reported[-1]["eval_reward_mean"]


# reverse after a short SFT, GRPO on exactly the pool it evaluates (measured with this
# config after the SFT of the fidelity work: the sampled prompts' reward goes 0.340 -> 0.448,
# 0.278 -> 0.391 and 0.308 -> 0.389 over 16 steps at seeds 0, 1, 2)
LEARNS = dict(num_train_inputs=32, inputs_per_step=16, num_samples_per_input=8, num_steps=16, learning_rate=6e-4,
              minibatch_size=64, generation={"max_new_tokens": 14})


def test_tiny_grpo_raises_reward(tmp_path):
    from workloads.text.sft import run_sft
    from workloads.text.sft_config import SFTConfig

    sft_ctx = local_context(str(tmp_path / "sft"), show_progress=False)
    run_sft(SFTConfig(max_steps=150, batch_size=32, learning_rate=2e-3, num_train_inputs=2000, log_every_steps=150),
            sft_ctx)
    metrics, ctx, inputs = run(tmp_path, "learn", model=sft_ctx.checkpoint_path, **LEARNS)
    by_step = inputs.groupby("step").reward_mean.mean()
    assert by_step[LEARNS["num_steps"]] > by_step[0] + 0.03, by_step.to_dict()


# ---------------------------------------------------------------- two ranks (DDP)


def _scripted_sample_and_score(model, tokenizer, reward_fn, prompts, num_samples, gen, logits_processor_factory=None,
                               engine=None):
    """Completions and rewards fixed by the prompt's token ids (no RNG): the same groups
    whichever rank samples a prompt, so one process and two ranks train on the same data."""
    from workloads.text.rewards import Reward
    from workloads.text.sampling import ScoredSamples

    outputs, rewards = [], []
    for ids in prompts.ids:
        for k in range(num_samples):
            length = 2 + (sum(ids) + k) % 5
            outputs.append([(ids[(k + t) % len(ids)] + t) % 40 + 3 for t in range(length)])
            rewards.append(Reward(float((sum(ids) * (k + 1)) % 3 == 0)))
    return ScoredSamples.of(num_samples, outputs, tokenizer.batch_decode(outputs), rewards)


DDP = dict(TINY, num_train_inputs=8, inputs_per_step=4, num_steps=2, minibatch_size=64)


def _grpo_rank(rank, world_size, tmp, variant):
    import torch.distributed as dist

    torch.set_num_threads(1)
    grpo.sample_and_score = _scripted_sample_and_score
    clip = torch.nn.utils.clip_grad_norm_
    grads = []

    def recording_clip(parameters, *args, **kwargs):  # the gradient each optimiser step applies
        parameters = list(parameters)
        grads.append(torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]).clone())
        return clip(parameters, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    ctx = local_context(str(tmp / "results"), show_progress=False)
    ctx.rank, ctx.world_size = rank, world_size
    grpo.run_grpo(GRPOConfig.model_validate({**DDP, "variant": variant}), ctx)
    torch.save({"grads": grads, "reported": ctx.reported}, tmp / f"rank{rank}.pt")
    if world_size > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "rloo", "dapo"])
def test_two_ranks_apply_the_one_process_gradient(tmp_path, variant):
    """DDP over two gloo ranks, each sampling half of every step's prompts, applies at
    every optimiser step the gradient ONE process computes on all of them (each variant's
    normalisation survives the split), and both ranks report the same monitor."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    torch.multiprocessing.spawn(_grpo_rank, args=(1, one, variant), nprocs=1, join=True)
    torch.multiprocessing.spawn(_grpo_rank, args=(2, two, variant), nprocs=2, join=True)
    single = torch.load(one / "rank0.pt", weights_only=False)
    rank0, rank1 = (torch.load(two / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert len(single["grads"]) == len(rank0["grads"]) == len(rank1["grads"]) == DDP["num_steps"]
    for g1, g_a, g_b in zip(single["grads"], rank0["grads"], rank1["grads"]):
        assert g1.abs().max() > 0
        torch.testing.assert_close(g_a, g_b, rtol=0, atol=0)  # DDP: the same all-reduced gradient on both
        # float32 sums in another order: equal to ~1e-7 of the gradient's norm (a wrong
        # normalisation, e.g. a missing / world_size, is off by a factor of 2)
        assert (g_a - g1).norm() <= 1e-5 * g1.norm()
    for a, b in zip(rank0["reported"], rank1["reported"]):  # the same monitor on both ranks
        assert a.keys() == b.keys()
        for key in a:
            if not key.endswith("_seconds"):  # wall-clock times are each rank's own
                assert a[key] == pytest.approx(b[key], nan_ok=True), key
    for key in ("share_zero_std", "rollouts_on_zero_std", "reward_mean", "loss", "grad_norm_total",
                "eval_reward_mean"):
        assert [key in r for r in rank0["reported"]] == [key in r for r in single["reported"]], key
        expected = [r[key] for r in single["reported"] if key in r]  # eval_reward_mean: the final report only
        assert expected and [r[key] for r in rank0["reported"] if key in r] == pytest.approx(
            expected, rel=1e-4, abs=1e-6, nan_ok=True), key
