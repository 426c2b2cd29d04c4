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
from workloads.text.builtin_task import prompt_text, reverse_example

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
    examples = [reverse_example("validation", i) for i in range(NUM_EVAL_INPUTS)]
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


# ---------------------------------------------------------------- the reference's SFT semantics
# apple/ml-rlgrad rl4lms/envs/text_generation/utils_supervised.py (get_datasets_for_causal /
# _seq2seq, tokenize_causal / _seq2seq) and training_utils.py SupervisedTrainer (HF Trainer)

from workloads.text.sft import (build_scheduler, build_training_sequences, decay_parameter_names, model_positions,
                                parameter_groups)
from workloads.text.tokenizer import build_char_tokenizer


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_causal_sequences_are_prompt_plus_reference_cut_to_the_positions():
    tok = build_char_tokenizer()
    pairs = [("ab", "cd"), ("ab", "e")]  # one input, two references: two examples
    # LM loss over the whole text "abcd": context = its first token, scored = the 3 others
    assert build_training_sequences(tok, pairs, False, None, "left") == \
        [(_ids(tok, "a"), _ids(tok, "bcd")), (_ids(tok, "a"), _ids(tok, "be"))]
    # cut to 3 positions: left keeps the end ("bcd"), right the beginning ("abc")
    assert build_training_sequences(tok, pairs[:1], False, 3, "left") == [(_ids(tok, "b"), _ids(tok, "cd"))]
    assert build_training_sequences(tok, pairs[:1], False, 3, "right") == [(_ids(tok, "a"), _ids(tok, "bc"))]
    # reference-only loss with EOS: context = prompt, scored = reference + EOS; the prompt is cut first
    eos = tok.eos_token_id
    assert build_training_sequences(tok, pairs[:1], False, 4, "left", "reference", append_eos=True) == \
        [(_ids(tok, "b"), _ids(tok, "cd") + [eos])]


def test_seq2seq_sequences_keep_the_closing_eos_when_cut():
    from tokenizers import processors

    tok = build_char_tokenizer()  # given T5's post-processor: "$A </s>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 2)])
    [(prompt, target)] = build_training_sequences(tok, [("abcdef", "xyzw")], True, 4, "right")
    assert prompt == _ids(tok, "abc") + [2] and target == _ids(tok, "xyz") + [2]


def test_tiny_gpt2_positions_and_the_imdb_overflow(tmp_path):
    """A review of 141 tokens on the tiny GPT-2 (128 positions) -- the IndexError of the
    untruncated causal text -- trains; every reference of an input is an example."""
    import json

    model, tok = load_model_and_tokenizer("builtin:tiny-gpt2")
    assert model_positions(model, tok) == 128
    review = " ".join(["film"] * 28) + " a"  # 141 characters = 141 tokens
    assert len(_ids(tok, review)) == 141
    imdb = tmp_path / "imdb"
    imdb.mkdir()
    for split in ("train", "test"):
        with open(imdb / f"{split}.jsonl", "w") as f:
            for i in range(4):
                f.write(json.dumps({"text": review, "label": 1}) + "\n")
    metrics, _ = sft(tmp_path, "imdb", task="imdb", dataset_path=str(imdb), reward="reverse", max_steps=2,
                     batch_size=2, num_train_inputs=3)
    assert metrics["num_train_examples"] == 3 and metrics["step"] == 2 and metrics["loss"] == metrics["loss"]
    with pytest.raises(IndexError, match="index out of range"):  # uncut, the 141 tokens overflow the 128 positions
        sft(tmp_path, "imdb_uncut", task="imdb", dataset_path=str(imdb), reward="reverse", max_steps=1,
            batch_size=2, num_train_inputs=3, max_train_length=141)

    nqa = tmp_path / "nqa"
    nqa.mkdir()
    row = {"document": {"summary": {"text": "a story"}}, "question": {"text": "who?"},
           "answers": [{"text": "Ann"}, {"text": "Bob"}]}
    for split in ("train", "validation"):
        with open(nqa / f"{split}.jsonl", "w") as f:
            f.write((json.dumps(row) + "\n") * 3)
    metrics, _ = sft(tmp_path, "nqa", task="narrative_qa", dataset_path=str(nqa), reward="reverse", max_steps=1,
                     batch_size=2, num_train_inputs=3)
    assert metrics["num_train_examples"] == 6  # 3 inputs x 2 answers
    metrics, _ = sft(tmp_path, "nqa1", task="narrative_qa", dataset_path=str(nqa), reward="reverse", max_steps=1,
                     batch_size=2, num_train_inputs=3, references="first")
    assert metrics["num_train_examples"] == 3


def test_weight_decay_skips_biases_and_layer_norms():
    model, _ = load_model_and_tokenizer("builtin:tiny-gpt2")
    decayed = decay_parameter_names(model)
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert not {"transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight",
                "transformer.ln_f.bias"} & decayed
    # one AdamW step with zero gradients: the decoupled decay alone, p <- p (1 - lr wd) = 0.95 p
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (0.95 if name in decayed else 1.0)
        assert torch.allclose(p.detach(), expected, atol=1e-7), name
    t5, _ = load_model_and_tokenizer("builtin:tiny-t5")
    t5_decayed = decay_parameter_names(t5)
    assert "encoder.block.0.layer.0.layer_norm.weight" not in t5_decayed
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in t5_decayed


def test_lr_schedules_hand_computed():
    def lrs(name, total, **warmup):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler(optimizer, name, total, **warmup)
        values = []
        for _ in range(total):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    import math

    assert lrs("constant", 3) == [1.0, 1.0, 1.0]
    # cosine over 4 steps: 0.5 (1 + cos(pi k / 4))
    assert lrs("cosine", 4) == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    # constant_with_warmup, 2 warm-up steps: k / 2, then 1
    assert lrs("constant_with_warmup", 4, warmup_steps=2) == pytest.approx([0.0, 0.5, 1.0, 1.0])
    # warmup_ratio 0.5 of 4 steps = 2 steps
    assert lrs("constant_with_warmup", 4, warmup_ratio=0.5) == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_sft_config_names_bad_schedule_and_warmup():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="lr_scheduler"):
        SFTConfig.model_validate({"lr_scheduler": "polynomial_decay"})
    with pytest.raises(pydantic.ValidationError, match=r"give warmup_steps \(2\) or warmup_ratio \(0.1\)"):
        SFTConfig.model_validate({"warmup_steps": 2, "warmup_ratio": 0.1})
