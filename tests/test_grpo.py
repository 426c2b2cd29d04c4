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
from workloads.text import grpo, rl_loop
from workloads.text.grpo import (bessel_std, choose_prompts, group_advantages, grpo_loss, k3_kl, predicted_zero_std,
                                 rloo_advantages, rloo_loss, success_estimate, truncated, variance_order)
from workloads.text.grpo_config import GRPOConfig

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


# ---------------------------------------------------------------- the math, by hand (tests/test_trl_parity.py: against TRL)


def test_advantages_of_every_scaling_and_rloo_by_hand():
    s1 = math.sqrt((4 * 0.5**2) / 3)  # unbiased std of [1, 0, 0, 1] (TRL nanstd: Bessel)
    s3 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)  # of [0, 0, 0, 1] = 0.5
    centred = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]
    batch = math.sqrt(sum((r - 7 / 12) ** 2 for r in REWARDS.flatten().tolist()) / 11)  # all 12 rewards
    expected = {
        "group": [[a / (s1 + 1e-4) for a in centred[0]], [0.0] * 4, [a / (s3 + 1e-4) for a in centred[2]]],
        "batch": [[a / (batch + 1e-4) for a in row] for row in centred],
        "none": centred,
    }
    assert bessel_std(REWARDS) == pytest.approx(batch)
    for scale, values in expected.items():
        got = group_advantages(REWARDS, scale, bessel_std(REWARDS))
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert (got[1] == 0).all()  # an equal-reward group: advantage exactly 0 whatever the scaling
    # leave-one-out: 1 - (1 + 0 + 0)/3 = 2/3, 0 - 2/3; 0 - 1/3, 1 - 0
    loo = [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4, [-1 / 3, -1 / 3, -1 / 3, 1.0]]
    torch.testing.assert_close(rloo_advantages(REWARDS, normalize=False), torch.tensor(loo, dtype=torch.float64))
    flat = torch.tensor(loo).flatten()  # normalised over the batch: mean 0 already, std with Bessel
    torch.testing.assert_close(rloo_advantages(REWARDS, normalize=True).flatten(),
                               (flat / (flat.std(correction=1) + 1e-4)).double())


def config(**values) -> GRPOConfig:
    return GRPOConfig.model_validate({"generation": {"max_new_tokens": 4}, **values})


def test_loss_aggregations_by_hand():
    """Ratio 1 (π_old = π_θ), A = 1 on row 0 and -1 on row 1: per-token loss -A."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0], [-1.0]])
    expected = {"grpo": ((-1 - 1) / 2 + 1 / 1) / 2,  # mean of the rows' token means
                "bnpo": (-2 + 1) / 3,  # the minibatch's token mean
                "dr_grpo": (-2 + 1) / (2 * 4),  # / (completions x max_new_tokens)
                "dapo": (-2 + 1) / 10.0,  # / the normaliser given (the rollout's tokens per optimiser step)
                "luspo": (-2 + 1) / 2}  # mean of the rows' token sums
    for loss_type, value in expected.items():
        loss, stats = grpo_loss(config(loss_type=loss_type), logp, logp.detach(), None, adv, mask, 10.0)
        assert loss.item() == pytest.approx(value), loss_type
        assert stats["clip_fraction"].item() == 0 and stats["kl"].item() == 0
    # cispo at TRL's default cap (epsilon_high = epsilon = 0.2): -min(ρ, 0.2) A log π, the weight detached
    loss, stats = grpo_loss(config(loss_type="cispo"), logp, logp.detach(), None, adv, mask, 10.0)
    assert loss.item() == pytest.approx(-0.2 * ((-1 - 2) * 1 + (-0.5) * -1) / 10.0)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)  # row 0's tokens: ρ = 1 > 0.2 with A > 0


def test_decoupled_clip_two_sided_delta_and_k3_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[0.5, 1.1, 1.5]]))
    mask = torch.ones(1, 3)
    dapo = config(loss_type="bnpo", epsilon_high=0.28)
    # A > 0: ratio capped at 1 + eps_high = 1.28 -> -min(1.5, 1.28) = -1.28; 0.5 is kept (min with 0.8)
    loss, stats = grpo_loss(dapo, logp, old, None, torch.tensor([[1.0]]), mask, 0)
    assert loss.item() == pytest.approx((-0.5 - 1.1 - 1.28) / 3)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    # A < 0: ratio floored at 1 - eps = 0.8 -> -min(-0.5, -0.8) = 0.8; 1.5 kept
    loss, _ = grpo_loss(dapo, logp, old, None, torch.tensor([[-1.0]]), mask, 0)
    assert loss.item() == pytest.approx((0.8 + 1.1 + 1.5) / 3)
    # delta = 1.3 also caps the unclipped ratio with A < 0: -min(-min(1.5, 1.3), -1.28) = 1.3
    loss, _ = grpo_loss(dapo.model_copy(update={"delta": 1.3}), logp, old, None, torch.tensor([[-1.0]]), mask, 0)
    assert loss.item() == pytest.approx((0.8 + 1.1 + 1.3) / 3)
    logp, ref = torch.tensor([0.0, -1.0]), torch.tensor([0.0, -2.0])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.0, math.exp(-1) + 1 - 1]))


def test_kl_term_with_and_without_bias_correction_by_hand():
    """At ratio 1 both KL terms have the same value; TRL's bias correction multiplies k3 by the
    DIFFERENTIABLE ratio, so the gradients differ: d/dlogp [k3 ρ] = k3 + dk3/dlogp at ρ = 1."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = logp.detach() - 0.5  # ref - logp = -0.5 per token
    k3 = math.exp(-0.5) + 0.5 - 1
    mask, adv = torch.ones(1, 2), torch.zeros(1, 1)
    grads = {}
    for correction in (False, True):
        loss, stats = grpo_loss(config(loss_type="bnpo", beta=0.1, use_bias_correction_kl=correction),
                                logp, logp.detach(), ref, adv, mask, 0)
        assert loss.item() == pytest.approx(0.1 * k3) and stats["kl"].item() == pytest.approx(k3)
        grads[correction] = torch.autograd.grad(loss, logp)[0]
    dk3 = -math.exp(-0.5) + 1  # d/dlogp [exp(ref - logp) - (ref - logp) - 1]
    torch.testing.assert_close(grads[False], torch.full((1, 2), 0.1 * dk3 / 2))
    torch.testing.assert_close(grads[True], torch.full((1, 2), 0.1 * (dk3 + k3) / 2))


def test_sequence_level_ratio_and_rloo_loss_by_hand():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.2, 0.4], [0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0], [1.0]])
    # GSPO: ρ = exp(mean log-ratio) = e^0.3 (capped at 1.2) and e^0.1 -> grpo loss = mean(-1.2, -e^0.1)
    loss, _ = grpo_loss(config(loss_type="grpo", importance_sampling_level="sequence"), logp, old, None, adv, mask, 0)
    assert loss.item() == pytest.approx((-1.2 - math.exp(0.1)) / 2)
    # RLOO: ρ = exp(summed log-ratio) = e^0.6 (capped at 1.2) and e^0.1
    loss, stats = rloo_loss(config(advantage_estimator="rloo"), logp, old, None, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - math.exp(0.1)) / 2) and stats["clip_fraction"].item() == 0.5


def test_truncated_completions_are_those_ending_in_no_stop_token():
    assert truncated([[5, 2], [5, 6, 7], [2], [4, 0]], {2, 0}).tolist() == [False, True, False, False]


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
    ("{epsilon: 0.2, epsilon_high: 0.1}", "epsilon_high (0.1) < epsilon (0.2)"),
    ("{selection: variance, history_window: 0}", "selection: variance needs history"),
    ("{skip_predicted_zero_std: true, history_window: 0}", "skip_predicted_zero_std needs history"),
    ("{loss_type: sapo}", "config.loss_type = 'sapo': Input should be 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo' or 'luspo'"),
    ("{scale_rewards: batchwise}", "config.scale_rewards = 'batchwise'"),
    ("{advantage_estimator: rloo, scale_rewards: none}", "scale_rewards: TRL's GRPOTrainer options, which advantage_estimator rloo"),
    ("{normalize_advantages: true}", "normalize_advantages is TRL's RLOOTrainer option"),
    # TRL's name of a field rlgrad names otherwise: our name, not a near-miss of another concept
    ("{num_generations: 4}", "unknown key 'num_generations' (num_generations is TRL's name: rlgrad calls it "
                             "num_samples_per_input)"),
    ("{max_completion_length: 64}", "rlgrad calls it generation.max_new_tokens"),
    ("{variant: ppo}", "variant = 'ppo': allowed grpo, dr_grpo, dapo, rloo"),
    ("{variant: dr_grpo, scale_rewards: group}", "variant: dr_grpo means advantage_estimator: grpo, loss_type: dr_grpo, "
                                                 "scale_rewards: none, which contradicts scale_rewards: group"),
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


def test_variant_still_loads_with_a_deprecation_line(tmp_path):
    import subprocess
    import sys

    from workloads.core.config import RlgradDeprecation

    with pytest.warns(RlgradDeprecation, match="`variant: dapo` is now `advantage_estimator: grpo, loss_type: dapo"):
        config = GRPOConfig.model_validate({"variant": "dapo", "epsilon_low": 0.1})
    assert (config.advantage_estimator, config.loss_type, config.scale_rewards, config.epsilon,
            config.epsilon_high) == ("grpo", "dapo", "group", 0.1, 0.28)
    assert GRPOConfig.model_validate({"variant": "rloo"}).advantage_estimator == "rloo"
    assert GRPOConfig.model_validate({"scale_rewards": False}).scale_rewards == "none"  # TRL's boolean spelling
    # from the command line: the file validates, each old spelling is said once, on one line
    spec = tmp_path / "old.yaml"
    spec.write_text("sweep: old\nstages:\n  - name: g\n    workload: grpo\n    config: {variant: dr_grpo}\n"
                    "    search: {grid: {seed: [0, 1, 2]}}\n")
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", "--resolved", str(spec)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("rlgrad: deprecated: grpo config field `variant: dr_grpo` is now `advantage_estimator: "
                           "grpo, loss_type: dr_grpo, scale_rewards: none` (TRL's names)\n"), done.stderr
    assert done.stdout.count("loss_type: dr_grpo") == 3 and "variant:" not in done.stdout


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
    monkeypatch.setattr(grpo, "grpo_update", lambda learner, groups, **kw: (trained.append(list(groups)),
                                                                            real_update(learner, groups, **kw))[1])
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


OBJECTIVES = {"grpo": dict(loss_type="grpo"), "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none"),
              "dapo-batch": dict(loss_type="dapo", scale_rewards="batch"),
              "dapo-masked-truncated": dict(loss_type="dapo", mask_truncated_completions=True),
              "bnpo-sequence": dict(loss_type="bnpo", importance_sampling_level="sequence"),
              "cispo": dict(loss_type="cispo", epsilon_high=5.0), "luspo": dict(loss_type="luspo"),
              "rloo": dict(advantage_estimator="rloo", normalize_advantages=True)}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_runs_and_checkpoints(tmp_path, objective):
    from workloads.text.models import load_model_and_tokenizer

    metrics, ctx, _ = run(tmp_path, objective, **OBJECTIVES[objective], num_steps=2, beta=0.05, num_iterations=2,
                          minibatch_size=16, generation={"max_new_tokens": 12, "temperature": 1.5})
    assert all(math.isfinite(metrics[k]) for k in ("loss", "kl", "clip_fraction", "eval_reward_mean"))
    assert metrics["kl"] != 0  # beta > 0: the reference is loaded and compared with
    assert os.path.isfile(os.path.join(ctx.checkpoint_path, rl_loop.STATE_FILE))
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
    assert rl_loop.OPTIMIZER_FILE in os.listdir(checkpoints[2])
    assert rl_loop.OPTIMIZER_FILE not in os.listdir(checkpoints[4])

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


def _grpo_rank(rank, world_size, tmp, objective):
    import torch.distributed as dist

    torch.set_num_threads(1)
    rl_loop.sample_and_score = _scripted_sample_and_score
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
    grpo.run_grpo(GRPOConfig.model_validate({**DDP, **OBJECTIVES[objective]}), ctx)
    torch.save({"grads": grads, "reported": ctx.reported}, tmp / f"rank{rank}.pt")
    if world_size > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("objective", ["grpo", "dr_grpo", "dapo-batch", "rloo"])
def test_two_ranks_apply_the_one_process_gradient(tmp_path, objective):
    """DDP over two gloo ranks, each sampling half of every step's prompts, applies at
    every optimiser step the gradient ONE process computes on all of them (each loss's
    normalisation and the batch-wide reward std survive the split), and both ranks report the
    same monitor."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    torch.multiprocessing.spawn(_grpo_rank, args=(1, one, objective), nprocs=1, join=True)
    torch.multiprocessing.spawn(_grpo_rank, args=(2, two, objective), nprocs=2, join=True)
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
