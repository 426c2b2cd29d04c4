"""run_extract on tiny data: table contents, statistics, sharding, resumption,
and that sampling is batched through num_return_sequences."""

import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import GPT2LMHeadModel, T5ForConditionalGeneration

from conftest import read_local_table
from workloads.core import tables
from workloads.text.extract_config import ExtractConfig
from workloads.core.context import local_context
from workloads.text.extract import run_extract

NUM_INPUTS, K, SHARD_SIZE, BATCH_SIZE = 10, 4, 4, 3
SHARDS = ["inputs-000000-000003", "inputs-000004-000007", "inputs-000008-000009"]


def tiny_config(model="builtin:tiny-gpt2", **overrides):
    values = dict(model=model, num_inputs=NUM_INPUTS, num_samples_per_input=K, shard_size=SHARD_SIZE,
                  batch_size=BATCH_SIZE, generation={"max_new_tokens": 8})
    return ExtractConfig.model_validate({**values, **overrides})


@pytest.fixture
def generate_calls(monkeypatch):
    """Records (number of prompts, generation settings) of every generate() call."""
    calls = []
    for model_cls in (GPT2LMHeadModel, T5ForConditionalGeneration):
        original = model_cls.generate

        def spy(self, *args, _original=original, **kwargs):
            calls.append((kwargs["input_ids"].shape[0], kwargs["generation_config"]))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(model_cls, "generate", spy)
    return calls


def read(results, table):
    return read_local_table(results, table)


def shard_file(results, table, shard):
    return os.path.join(results, "local", table, "stage", "trial", f"{shard}.parquet")


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_tables_and_statistics(tmp_path, model, generate_calls):
    ctx = local_context(str(tmp_path), show_progress=False)
    summary = run_extract(tiny_config(model), ctx)

    samples = read(tmp_path, "samples")
    inputs = read(tmp_path, "inputs")
    assert len(samples) == NUM_INPUTS * K and len(inputs) == NUM_INPUTS
    assert not samples.duplicated(["input_id", "sample_idx"]).any()
    assert sorted(samples.sample_idx.unique()) == list(range(K))
    for shard in SHARDS:
        for table, schema in (("samples", tables.SAMPLES), ("inputs", tables.INPUTS)):
            written = pq.read_schema(shard_file(tmp_path, table, shard))
            assert written.remove_metadata().equals(schema)
            tables.check_schema(table, written, shard)

    # per-input statistics recomputed with numpy from the stored sample rewards
    for row in inputs.itertuples():
        rewards = samples[samples.input_id == row.input_id].sort_values("sample_idx").reward.to_numpy()
        assert len(rewards) == row.num_samples == K
        assert row.reward_mean == pytest.approx(np.mean(rewards), abs=1e-12)
        assert row.reward_std == pytest.approx(np.std(rewards, ddof=0), abs=1e-12)
        assert row.reward_std_unbiased == pytest.approx(np.std(rewards, ddof=1), abs=1e-12)
        assert row.grad_norm >= 0 and (row.grad_norm > 0) == (row.reward_std > 0)
    assert ((samples.reward >= 0) & (samples.reward <= 1)).all()
    assert (samples.num_tokens >= 1).all() and (samples.num_tokens <= 8).all()  # max_new_tokens
    assert (samples.log_prob < 0).all()
    assert set(dict(samples.reward_components.iloc[0])) >= {"char_accuracy", "length_match"}

    # one generate() per batch of prompts, K samples each through num_return_sequences
    expected_calls = sum(math.ceil(n / BATCH_SIZE) for n in (4, 4, 2))
    assert len(generate_calls) == expected_calls
    assert all(cfg.num_return_sequences == K and cfg.do_sample for _, cfg in generate_calls)
    assert sum(n for n, _ in generate_calls) == NUM_INPUTS

    assert ctx.reported == [summary]
    assert summary["num_inputs"] == NUM_INPUTS
    assert summary["reward_std_mean"] == pytest.approx(inputs.reward_std.mean())
    assert summary["share_reward_std_below_0.05"] == pytest.approx((inputs.reward_std < 0.05).mean())
    assert summary["grad_norm_mean"] == pytest.approx(inputs.grad_norm.mean())
    assert summary["samples_per_s"] > 0 and summary["tokens_per_s"] > 0


def test_resumption_skips_done_shards_and_recomputes_a_deleted_one(tmp_path, generate_calls):
    config = tiny_config()
    run_extract(config, local_context(str(tmp_path), show_progress=False))
    files = [shard_file(tmp_path, t, s) for t in ("samples", "inputs") for s in SHARDS]
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    first_samples = read(tmp_path, "samples").sort_values(["input_id", "sample_idx"]).reset_index(drop=True)

    # everything done: nothing generated, no file rewritten, summary read back
    generate_calls.clear()
    summary = run_extract(config, local_context(str(tmp_path), show_progress=False))
    assert generate_calls == [] and summary["num_shards_skipped"] == 3 and summary["num_inputs"] == NUM_INPUTS
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps

    # a shard missing its `inputs` file is not done: exactly that shard is redone
    os.remove(shard_file(tmp_path, "inputs", SHARDS[1]))
    generate_calls.clear()
    summary = run_extract(config, local_context(str(tmp_path), show_progress=False))
    assert summary["num_shards_skipped"] == 2
    assert len(generate_calls) == math.ceil(SHARD_SIZE / BATCH_SIZE)
    redone = {shard_file(tmp_path, t, SHARDS[1]) for t in ("samples", "inputs")}
    for f in files:
        assert os.path.exists(f)
        assert (os.stat(f).st_mtime_ns == stamps.get(f)) == (f not in redone)
    again = read(tmp_path, "samples").sort_values(["input_id", "sample_idx"]).reset_index(drop=True)
    assert len(again) == NUM_INPUTS * K  # nothing duplicated
    # the shard's sampling seed depends on the shard only: the same samples come back
    assert again[["input_id", "output", "reward"]].equals(first_samples[["input_id", "output", "reward"]])


def test_workers_split_the_shards(tmp_path):
    config = tiny_config(compute_grad_norm=False)
    seen = []
    for rank in range(2):
        ctx = local_context(str(tmp_path), show_progress=False)
        ctx.rank, ctx.world_size = rank, 2
        seen.append(run_extract(config, ctx)["num_inputs"])
    assert seen == [4 + 2, 4]  # shards 0 and 2 on rank 0, shard 1 on rank 1
    inputs = read(tmp_path, "inputs")
    assert len(inputs) == NUM_INPUTS and inputs.input_id.is_unique and inputs.grad_norm.isna().all()


def test_registry_entry_point(tmp_path):
    from workloads import run_workload

    values = dict(num_inputs=3, num_samples_per_input=2, generation={"max_new_tokens": 4})
    summary = run_workload("extract", values, local_context(str(tmp_path), show_progress=False))
    assert summary["num_inputs"] == 3


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_every_statistic_recomputes_from_the_stored_token_ids(tmp_path, model):
    """The samples table alone rebuilds each input's log-probs and gradient norm:
    the stored token ids are exactly what was sampled (the texts drop special tokens)."""
    import torch

    from workloads.text.gradnorm import per_input_grad_norms_loop
    from workloads.text.models import load_model_and_tokenizer, sequence_log_probs

    run_extract(tiny_config(model, grad_norm_dtype="float64"), local_context(str(tmp_path), show_progress=False))
    samples = read(tmp_path, "samples").sort_values(["input_id", "sample_idx"])
    inputs = read(tmp_path, "inputs").set_index("input_id")
    policy, tokenizer = load_model_and_tokenizer(model)
    policy = policy.double().eval()
    for input_id, group in list(samples.groupby("input_id"))[:4]:
        prompt = [int(t) for t in group.prompt_token_ids.iloc[0]]
        outputs = [[int(t) for t in ids] for ids in group.output_token_ids]
        assert all(len(ids) == n for ids, n in zip(outputs, group.num_tokens))
        assert all(tokenizer.decode(ids, skip_special_tokens=True) == text for ids, text in zip(outputs, group.output))
        with torch.no_grad():
            log_probs = sequence_log_probs(policy, [prompt] * K, outputs)
        np.testing.assert_allclose(log_probs.numpy(), group.log_prob.to_numpy(), rtol=1e-4, atol=1e-4)
        rewards = torch.tensor(group.reward.to_numpy(), dtype=torch.float64).view(1, K)
        recomputed = per_input_grad_norms_loop(policy, [prompt], [outputs], rewards)
        assert recomputed.item() == pytest.approx(inputs.loc[input_id, "grad_norm"], rel=1e-6, abs=1e-9)
    assert samples.model.eq(model).all() and inputs.model.eq(model).all()


def test_grad_norm_of_names_the_distribution_differentiated(tmp_path):
    """At T = 2 the same samples give different norms for sampling_policy (softmax(logits / 2))
    and model (T = 1); each equals the loop at its own temperature."""
    import torch

    from workloads.text.gradnorm import per_input_grad_norms_loop
    from workloads.text.models import load_model_and_tokenizer

    norms = {}
    for of in ("sampling_policy", "model"):
        config = tiny_config(grad_norm_of=of, grad_norm_dtype="float64", generation={"max_new_tokens": 8, "temperature": 2.0})
        run_extract(config, local_context(str(tmp_path / of), show_progress=False))
        norms[of] = read(tmp_path / of, "inputs").sort_values("input_id").set_index("input_id")
        samples = read(tmp_path / of, "samples").sort_values(["input_id", "sample_idx"])
    moving = norms["model"].grad_norm > 0
    assert moving.any() and not np.allclose(norms["model"].grad_norm[moving], norms["sampling_policy"].grad_norm[moving])
    policy, _ = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=torch.float64)
    group = samples[samples.input_id == norms["model"].index[moving.to_numpy()][0]]
    prompt = [int(t) for t in group.prompt_token_ids.iloc[0]]
    outputs = [[int(t) for t in ids] for ids in group.output_token_ids]
    rewards = torch.tensor(group.reward.to_numpy(), dtype=torch.float64).view(1, K)
    for of, temperature in (("sampling_policy", 2.0), ("model", 1.0)):
        expected = per_input_grad_norms_loop(policy.eval(), [prompt], [outputs], rewards, temperature=temperature)
        assert expected.item() == pytest.approx(norms[of].loc[group.input_id.iloc[0], "grad_norm"], rel=1e-6)


def test_sampling_in_bfloat16_keeps_exact_float64_gradient_norms(tmp_path):
    """dtype: bfloat16 samples with a bf16 copy; the stored log-probs and the gradient norms
    come from the model as stored, in grad_norm_dtype (weights never rounded to bf16), and
    equal the float64 loop on the stored tokens."""
    import torch

    from workloads.text.gradnorm import per_input_grad_norms_loop
    from workloads.text.models import load_model_and_tokenizer, sequence_log_probs

    run_extract(tiny_config(dtype="bfloat16", grad_norm_dtype="float64"), local_context(str(tmp_path), show_progress=False))
    samples = read(tmp_path, "samples").sort_values(["input_id", "sample_idx"])
    inputs = read(tmp_path, "inputs").set_index("input_id")
    policy, _ = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=torch.float64)
    policy.eval()
    input_id, group = next(iter(samples.groupby("input_id")))
    prompt = [int(t) for t in group.prompt_token_ids.iloc[0]]
    outputs = [[int(t) for t in ids] for ids in group.output_token_ids]
    rewards = torch.tensor(group.reward.to_numpy(), dtype=torch.float64).view(1, K)
    expected = per_input_grad_norms_loop(policy, [prompt], [outputs], rewards)
    assert expected.item() == pytest.approx(inputs.loc[input_id, "grad_norm"], rel=1e-6, abs=1e-12)
    with torch.no_grad():
        log_probs = sequence_log_probs(policy, [prompt] * K, outputs)
    np.testing.assert_allclose(group.log_prob.to_numpy(), log_probs.numpy(), rtol=1e-9)
