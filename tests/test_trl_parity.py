"""GRPO and RLOO exactly as TRL computes them, checked against TRL itself (trl==1.16.0, a
test dependency): TRL's own GRPOTrainer / RLOOTrainer, on a tiny random Llama in float64,
score a scripted rollout (only generation is replaced: GRPO's through TRL's `rollout_func`,
RLOO's -- which has none -- by replacing its tokenize and generate steps)
and take their loss and gradient with `_generate_and_score_completions` and `_compute_loss`,
optimiser step after optimiser step; rlgrad's `grpo_update` runs the same rollout on a copy of
the same weights. Compared: the advantages, and at every optimiser step the loss and the
gradient (relative 1e-5; TRL's fused log-prob kernel keeps float32 statistics, ~1e-7).

Cases: every loss_type x scale_rewards, beta 0 and 0.1, temperature 1 and 1.5, and three
schedules -- one optimiser step per rollout (ratio 1), two minibatches per rollout (TRL
steps_per_generation 2: the second minibatch's ratio moves and clips), two passes over it
(num_iterations 2); then RLOO, and each remaining TRL option (truncated completions
masked, sequence-level importance sampling, KL without bias correction, delta, epsilon_high)
on its own. Clipped cases check that clipping happened. A TRL release that changes a rule
fails the case that names it. The per-prompt gradient norm rlgrad records is compared with
the gradient of TRL's loss restricted to that prompt."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import trl
from transformers import LlamaConfig, LlamaForCausalLM

from workloads.text.gradnorm import per_input_grad_norms, per_input_grad_norms_loop
from workloads.text.grpo import Learner, grpo_update, rollout_batch
from workloads.text.grpo_config import GRPOConfig
from workloads.text.rewards import Reward
from workloads.text.rl_loop import Ranks
from workloads.text.sampling import Group, Prompts, ScoredSamples
from workloads.text.tokenizer import build_char_tokenizer

assert trl.__version__ == "1.16.0", f"the parity cases were read from trl 1.16.0's code, this is {trl.__version__}"

K, MAX_NEW_TOKENS, EOS = 4, 4, 2
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
# per prompt, K completions: EOS-terminated ones and ones cut at MAX_NEW_TOKENS without EOS (truncated)
COMPLETIONS = [[[20, 21, EOS], [22, EOS], [23, 24, 25, 26], [27, EOS]],
               [[30, 31, EOS], [32, EOS], [33, 34, 35, EOS], [36, 37, 38, 39]],
               [[40, EOS], [41, 42, EOS], [43, EOS], [44, 45, 46, EOS]],
               [[47, 48, 49, 50], [4, EOS], [9, EOS], [EOS]]]  # fewer tokens: minibatches differ in size
# a group of equal rewards (std 0) among them; dyadic values, exact in TRL's float32 reward tensor
REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.25, 0.0, 1.0], [0.75, 0.0, 1.0, 0.5]]
# normalised gradient steps of this length on both sides (whatever a loss type's scale): the policy
# moves out of the clip range between a rollout's optimiser steps (in some cases all of it: then both
# sides must have no gradient at all). A sequence-level ratio (the mean log-ratio) of a minibatch not
# trained on yet moves less: it takes a longer step.
STEP_LENGTHS = {"token": 1.5, "sequence": 3.0}
TOLERANCE = 1e-5

SCHEDULES = {  # (minibatches per rollout = TRL steps_per_generation, num_iterations)
    "one-step-ratio-1": (1, 1),
    "two-minibatches-clipped": (2, 1),
    "two-iterations-clipped": (1, 2),
}


@contextlib.contextmanager
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # TRL's reward and advantage tensors follow it
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (rotary positions: TRL's left-padded scoring, which counts positions
    from the padding, gives the same log-probs as ours) in float64, with the char tokenizer."""
    directory = str(tmp_path_factory.mktemp("llama"))
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.float64).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def scripted_rollout(prompts: list[str], trainer) -> dict:
    """TRL's rollout_func: prompt "i" (repeated K times in a row) -> prompt i's K completions."""
    seen: dict[int, int] = {}
    prompt_ids, completion_ids = [], []
    for prompt in prompts:
        i = int(prompt)
        k = seen[i] = seen.get(i, -1) + 1
        prompt_ids.append(PROMPTS[i])
        completion_ids.append(COMPLETIONS[i][k])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def scripted_reward(prompts, completions, **_):
    seen: dict[int, int] = {}
    rewards = []
    for prompt in prompts:
        i = int(prompt)
        seen[i] = seen.get(i, -1) + 1
        rewards.append(REWARDS[i][seen[i]])
    return rewards


def trl_gradients(model_dir: str, options: dict, prompt_ids: list[int], minibatches: int, iterations: int, tmp,
                  step_length: float = STEP_LENGTHS["token"]):
    """TRL's advantages, and its loss and gradient at every optimiser step of one rollout (its
    `_prepare_inputs` without the shuffle: the generation batch split into steps_per_generation
    minibatches, reused for every iteration), SGD between steps."""
    from datasets import Dataset

    rloo = options.pop("advantage_estimator", "grpo") == "rloo"
    config_cls, trainer_cls = (trl.RLOOConfig, trl.RLOOTrainer) if rloo else (trl.GRPOConfig, trl.GRPOTrainer)
    completions = K * len(prompt_ids)
    args = config_cls(output_dir=str(tmp), per_device_train_batch_size=completions // minibatches, num_generations=K,
                      max_completion_length=MAX_NEW_TOKENS, steps_per_generation=minibatches,
                      gradient_accumulation_steps=1, num_iterations=iterations, use_cpu=True, bf16=False,
                      report_to=[], logging_steps=1, model_init_kwargs={"dtype": torch.float64}, **options)
    generation = {} if rloo else {"rollout_func": scripted_rollout}
    trainer = trainer_cls(model=model_dir, reward_funcs=scripted_reward, args=args, **generation,
                          train_dataset=Dataset.from_dict({"prompt": [str(i) for i in prompt_ids]}),
                          processing_class=build_char_tokenizer())
    if rloo:  # RLOOTrainer has no rollout_func: its tokenizer and generate() step are replaced instead
        def tokenize(prompts):
            rollout = scripted_rollout(prompts, trainer)
            trainer.scripted_completions = rollout["completion_ids"]
            return rollout["prompt_ids"], None, {}

        trainer._tokenize_prompts = tokenize
        trainer._generate_single_turn = lambda prompt_ids, images, fields: trainer.scripted_completions
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()  # TRL's mode; the tiny Llama has no dropout
    batch = trainer._generate_and_score_completions([{"prompt": str(i)} for i in prompt_ids for _ in range(K)])
    chunks = trl.trainer.utils.split_tensor_dict(batch, minibatches)
    losses, grads = [], []
    for _ in range(iterations):
        for chunk in chunks:
            model.zero_grad(set_to_none=True)
            loss = trainer._compute_loss(model, chunk)
            loss.backward()
            losses.append(loss.item())
            grads.append(_flat_grad(model))
            _sgd(model, grads[-1], step_length)
    return batch["advantages"].double(), losses, grads


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def _sgd(model, flat: torch.Tensor, step_length: float) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p -= step_length / flat.norm() * flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


class RecordingSGD(torch.optim.Optimizer):
    """The same normalised gradient steps as `_sgd`, keeping every gradient (rlgrad's update
    calls step() once per minibatch)."""

    def __init__(self, params, step_length: float):
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []
        self.step_length = step_length

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        self.grads.append(flat.clone())
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= self.step_length / flat.norm() * p.grad


def groups_of(prompt_ids: list[int]) -> list[Group]:
    tokenizer = build_char_tokenizer()
    groups = []
    for i in prompt_ids:
        scored = ScoredSamples.of(K, COMPLETIONS[i], tokenizer.batch_decode(COMPLETIONS[i]),
                                  [Reward(r) for r in REWARDS[i]])
        groups.append(Group(i, None, Prompts([str(i)], [PROMPTS[i]], [[]], [{}], [i]), scored))
    return groups


def rlgrad_gradients(model_dir: str, options: dict, prompt_ids: list[int], minibatches: int, iterations: int,
                     step_length: float, update_path: str = "auto"):
    """rlgrad's advantages, and the loss and gradient of every optimiser step of `grpo_update`."""
    config = GRPOConfig.model_validate({
        "model": "builtin:tiny-gpt2", "task": "reverse", "num_samples_per_input": K, "inputs_per_step": 1,
        "num_train_inputs": 8, "minibatch_size": K * len(prompt_ids) // minibatches, "num_iterations": iterations,
        "max_grad_norm": None, "generation": {"max_new_tokens": MAX_NEW_TOKENS,
                                              "temperature": options.pop("temperature", 1.0)}, **options})
    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    reference = None
    if config.beta > 0:
        reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval().requires_grad_(False)
    optimizer = RecordingSGD(policy.parameters(), step_length)
    learner = Learner(config, policy, optimizer, Ranks(0, 1, torch.device("cpu")), reference, stop_ids={EOS, 0},
                      update_path=update_path)
    assert learner.per_prompt == (update_path == "auto")  # auto: the update's per-prompt backward (update_grads.py)
    groups = groups_of(prompt_ids)
    advantages = rollout_batch(learner, groups).advantages
    losses = []
    import workloads.text.grpo as grpo

    step = grpo.minibatch_step

    def recording_step(learner, batch, idx, *args, **kwargs):
        stats = step(learner, batch, idx, *args, **kwargs)
        losses.append(stats["loss"])
        return stats

    grpo.minibatch_step = recording_step
    try:
        stats = grpo_update(learner, groups, order=list(range(K * len(prompt_ids))))
    finally:
        grpo.minibatch_step = step
    return advantages, losses, optimizer.grads, stats


def assert_same_update(model_dir, tmp, options: dict, schedule: str, prompt_ids=(0, 1, 2, 3), clips: bool = True):
    options = dict(options)
    update_path = options.pop("update_path", "auto")
    minibatches, iterations = SCHEDULES[schedule]
    step = STEP_LENGTHS[options.get("importance_sampling_level", "token")]
    with float64_default():
        trl_advantages, trl_losses, trl_grads = trl_gradients(model_dir, dict(options), list(prompt_ids), minibatches,
                                                              iterations, tmp, step)
        advantages, losses, grads, stats = rlgrad_gradients(model_dir, dict(options), list(prompt_ids), minibatches,
                                                            iterations, step, update_path)
    torch.testing.assert_close(advantages, trl_advantages, rtol=TOLERANCE, atol=1e-7, msg="advantages")
    assert len(grads) == len(trl_grads) == minibatches * iterations
    for step, (ours, theirs, loss, trl_loss) in enumerate(zip(grads, trl_grads, losses, trl_losses)):
        if theirs.norm() == 0:  # every ratio clipped: no gradient, and none of ours either
            assert step > 0, "TRL's first gradient is 0: a case that tests nothing"
            assert ours.norm() == 0, f"step {step}: TRL clipped every ratio, rlgrad has a gradient"
            continue
        error = ((ours - theirs).norm() / theirs.norm()).item()
        assert error <= TOLERANCE, f"step {step}: gradient differs from TRL's by {error:.2e} (relative)"
        assert loss == pytest.approx(trl_loss, rel=TOLERANCE, abs=1e-8), f"step {step}: loss"
    if clips and schedule.endswith("clipped"):  # the policy moved out of the clip range: the clipped branch was compared
        assert stats["clip_fraction"] > 0, "no ratio was clipped"


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo"]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("temperature", [1.0, 1.5], ids=["T1", "T1.5"])
@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["beta0", "beta0.1"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_update_equals_trl(model_dir, tmp_path, loss_type, scale_rewards, beta, temperature, schedule):
    # (cispo at TRL's default epsilon_high = epsilon caps every importance weight at 0.2: clipped from the start)
    options = dict(loss_type=loss_type, scale_rewards=scale_rewards, beta=beta, temperature=temperature)
    assert_same_update(model_dir, tmp_path, options, schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("temperature", [1.0, 1.5], ids=["T1", "T1.5"])
@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["beta0", "beta0.1"])
@pytest.mark.parametrize("normalize_advantages", [False, True], ids=["raw", "normalized"])
def test_rloo_update_equals_trl(model_dir, tmp_path, normalize_advantages, beta, temperature, schedule):
    assert_same_update(model_dir, tmp_path, dict(advantage_estimator="rloo", normalize_advantages=normalize_advantages,
                                                 beta=beta, temperature=temperature), schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES + ["rloo"])
def test_ordinary_update_equals_trl(model_dir, tmp_path, loss_type, schedule):
    """The ordinary loss.backward() update -- what a policy under DDP, or a model outside update_grads.py's
    family, trains with -- against TRL as well (every other case here runs the per-prompt backward)."""
    options = dict(advantage_estimator="rloo") if loss_type == "rloo" else dict(loss_type=loss_type)
    assert_same_update(model_dir, tmp_path, dict(options, beta=0.1, temperature=1.5, update_path="autograd"), schedule)


OPTIONS = {
    "mask-truncated-grpo": dict(loss_type="grpo", mask_truncated_completions=True, beta=0.1),
    "mask-truncated-dapo": dict(loss_type="dapo", mask_truncated_completions=True, beta=0.1),
    "mask-truncated-dr_grpo": dict(loss_type="dr_grpo", mask_truncated_completions=True),
    "mask-truncated-rloo": dict(advantage_estimator="rloo", mask_truncated_completions=True, beta=0.1),
    "sequence-level-grpo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1),
    "sequence-level-luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "sequence-level-dapo": dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.1),
    "kl-without-bias-correction": dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=False),
    "kl-without-bias-correction-sequence": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False,
                                               importance_sampling_level="sequence"),
    "delta-two-sided-clip": dict(loss_type="dapo", delta=1.05),
    "epsilon-high-0.28": dict(loss_type="dapo", epsilon_high=0.28),
    "epsilon-0.1": dict(loss_type="grpo", epsilon=0.1, beta=0.1),
    "cispo-epsilon-high-5": dict(loss_type="cispo", epsilon_high=5.0, beta=0.1),  # ScaleRL's cap: rarely reached
}


@pytest.mark.parametrize("schedule", ["one-step-ratio-1", "two-iterations-clipped", "two-minibatches-clipped"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_trl_option_equals_trl(model_dir, tmp_path, option, schedule):
    assert_same_update(model_dir, tmp_path, dict(OPTIONS[option], temperature=1.5), schedule,
                       clips=option != "cispo-epsilon-high-5")


@pytest.mark.parametrize("temperature", [1.0, 1.5], ids=["T1", "T1.5"])
def test_per_prompt_gradient_norm_is_the_norm_of_trls_loss_on_that_prompt(model_dir, tmp_path, temperature):
    """rlgrad's per-prompt leave-one-out gradient norm ||ĝ(x)||, ĝ = (1/K) Σ_k (r_k - b_k) ∇ log π_T(y_k|x),
    against TRL's gradient of its Dr. GRPO loss (scale_rewards none, A_k = r_k - r̄, ratio 1) on
    that prompt's K completions alone: ∇L = -(1 / (K L)) Σ_k A_k ∇ log π_T(y_k|x), and since
    r_k - b_k = K/(K-1) (r_k - r̄), ||ĝ|| = K L / (K-1) ||∇L|| (L = max_new_tokens)."""
    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    batched = per_input_grad_norms(policy, PROMPTS, COMPLETIONS, rewards, temperature=temperature)
    loop = per_input_grad_norms_loop(policy, PROMPTS, COMPLETIONS, rewards, temperature=temperature)
    for i in range(len(PROMPTS)):
        with float64_default():
            _, _, grads = trl_gradients(model_dir, dict(loss_type="dr_grpo", scale_rewards="none",
                                                        temperature=temperature), [i], 1, 1, tmp_path / str(i))
        expected = K * MAX_NEW_TOKENS / (K - 1) * grads[0].norm().item()
        if REWARDS[i].count(REWARDS[i][0]) == K:  # all K rewards equal: no gradient on either side
            assert expected == 0 and batched[i] == 0 and loop[i] == 0
            continue
        assert batched[i].item() == pytest.approx(expected, rel=TOLERANCE), f"prompt {i} (batched)"
        assert loop[i].item() == pytest.approx(expected, rel=TOLERANCE), f"prompt {i} (loop)"
