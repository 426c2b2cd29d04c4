"""run_sft on the built-in task: it learns, checkpoints load back, max_steps=0
checkpoints the initial model, resumption and the metrics it reports."""

import os

import pyarrow.parquet as pq
import pytest
import torch

from conftest import read_local_table
from workloads.text.sft_config import SFTConfig
from workloads.core.context import local_context
from workloads.text.models import encode_prompts, generate_outputs, load_model_and_tokenizer
from workloads.text.rewards import get_reward
from workloads.text.sft import NUM_EVAL_INPUTS, run_sft
from workloads.text.builtin_task import get_examples, prompt_text

FAST = dict(learning_rate=2e-3, batch_size=32, log_every_steps=50, num_train_inputs=2000)


def sft(tmp_path, name, **overrides):
    ctx = local_context(str(tmp_path / name), show_progress=False)
    metrics = run_sft(SFTConfig.model_validate({**FAST, **overrides}), ctx)
    return metrics, ctx


@pytest.fixture(scope="module")
def baseline_and_trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    return sft(tmp, "baseline", max_steps=0), sft(tmp, "trained", max_steps=150), tmp


def greedy_eval_reward(model, tokenizer) -> float:
    """The held-out evaluation, recomputed from a loaded checkpoint."""
    encoder_decoder = model.config.is_encoder_decoder
    examples = get_examples("reverse", "validation", list(range(NUM_EVAL_INPUTS)))
    prompts = [prompt_text(ex.source, encoder_decoder) for ex in examples]
    outputs = generate_outputs(model, tokenizer, encode_prompts(tokenizer, prompts, 512, encoder_decoder),
                               do_sample=False, max_new_tokens=21)
    rewards = get_reward("reverse")(prompts, tokenizer.batch_decode(outputs, skip_special_tokens=True),
                                    [ex.target for ex in examples])
    return sum(r.value for r in rewards) / len(rewards)


def test_sft_improves_eval_reward(baseline_and_trained):
    (baseline, _), (trained, ctx), _ = baseline_and_trained
    assert baseline["eval_reward_mean"] < 0.1
    assert trained["eval_reward_mean"] > baseline["eval_reward_mean"] + 0.25
    # a report every log_every_steps steps, then the final one with the checkpoint
    assert [r["step"] for r in ctx.reported] == [50, 100, 150, 150]
    losses = [r["loss"] for r in ctx.reported[:3]]
    assert losses[0] > losses[-1]
    assert ctx.reported[-1] == trained


def test_checkpoint_loads_back_and_reproduces_eval(baseline_and_trained):
    _, (trained, ctx), _ = baseline_and_trained
    model, tokenizer = load_model_and_tokenizer(ctx.checkpoint_path)
    assert greedy_eval_reward(model.eval(), tokenizer) == pytest.approx(trained["eval_reward_mean"])


def test_zero_steps_checkpoints_the_initial_model(baseline_and_trained):
    (_, ctx), _, _ = baseline_and_trained
    saved, _ = load_model_and_tokenizer(ctx.checkpoint_path)
    initial, _ = load_model_and_tokenizer("builtin:tiny-gpt2")
    for (key, a), (_, b) in zip(saved.state_dict().items(), initial.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    assert ctx.reported[:-1] == []  # nothing trained, nothing logged before the final report


def test_metrics_table(baseline_and_trained):
    _, _, tmp = baseline_and_trained
    metrics = read_local_table(os.path.join(tmp, "trained"), "metrics")
    loss = metrics[metrics.metric == "loss"]
    assert list(loss.step) == [50, 100, 150] and (loss.split == "train").all()
    evaluation = metrics[(metrics.split == "validation") & (metrics.metric == "eval_reward_mean")]
    assert list(evaluation.step) == [150]


def test_resume_from_final_checkpoint_trains_nothing_more(baseline_and_trained, tmp_path):
    _, (trained, trained_ctx), _ = baseline_and_trained
    ctx = local_context(str(tmp_path), show_progress=False)
    ctx.resume_from = trained_ctx.checkpoint_path
    metrics = run_sft(SFTConfig.model_validate({**FAST, "max_steps": 150}), ctx)
    assert len(ctx.reported) == 1 and metrics["step"] == 150
    assert metrics["eval_reward_mean"] == pytest.approx(trained["eval_reward_mean"])


def test_seq2seq_and_fraction_of_train_inputs(tmp_path):
    metrics, ctx = sft(tmp_path, "t5", model="builtin:tiny-t5", max_steps=60, log_every_steps=20,
                       frac_train_samples=0.1)
    assert metrics["num_train_inputs_used"] == 200
    losses = [r["loss"] for r in ctx.reported[:-1]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, _ = load_model_and_tokenizer(ctx.checkpoint_path)
    assert model.config.is_encoder_decoder


def _ddp_worker(rank, tmp):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    ctx = local_context(str(tmp / "results"), show_progress=False)
    ctx.rank, ctx.world_size = rank, 2
    metrics = run_sft(SFTConfig.model_validate({**FAST, "max_steps": 10, "log_every_steps": 5, "batch_size": 8}), ctx)
    model, _ = load_model_and_tokenizer(ctx.checkpoint_path) if rank == 0 else (None, None)
    torch.save({"reported": ctx.reported, "metrics": metrics,
                "checkpoint": None if model is None else model.state_dict()}, tmp / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_distributed_data_parallel_two_ranks(tmp_path):
    """Two gloo ranks: each takes half of every batch, losses are averaged over
    ranks, and only rank 0 hands over a checkpoint."""
    torch.multiprocessing.spawn(_ddp_worker, args=(tmp_path,), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert [r["loss"] for r in rank0["reported"]] == [r["loss"] for r in rank1["reported"]]
    assert len(rank0["reported"]) == len(rank1["reported"]) == 3  # steps 5, 10, final
    assert rank1["checkpoint"] is None
    # DDP keeps the replicas equal: both ranks' greedy evaluations agree
    assert rank0["metrics"]["eval_reward_mean"] == rank1["metrics"]["eval_reward_mean"]
    initial, _ = load_model_and_tokenizer("builtin:tiny-gpt2")
    trained = rank0["checkpoint"]
    assert any(not torch.equal(trained[k], v) for k, v in initial.state_dict().items())
