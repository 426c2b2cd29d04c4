"""Sampling and rewards: the original project's way against rlgrad's extraction path.

    python benchmarks/bench_sampling.py                        # CPU: builtin:tiny-gpt2, reverse task, 64 prompts x K=8
    python benchmarks/bench_sampling.py --batch-size 64        # the issue's setting: all prompts in one batch
    python benchmarks/bench_sampling.py --device cuda --model gpt2-small --prompts 512 --batch-size 64   # on a GPU

Same model, prompts, K and max_new_tokens for both, timed in ONE process and
interleaved (each repeat runs both, so a noisy neighbour slows both alike):
  original    K sequential generation passes over the whole prompt set, each in
              batches of --batch-size prompts with num_return_sequences=1, then
              one decode and one reward call per sample
  extraction  what workloads/extract.py runs: prompts bucketed by length, per
              batch ONE generate() with num_return_sequences=K
              (sampling.sample_outputs), one batch_decode and ONE reward call
              (sampling.score_outputs)
Prints median and min-max over --repeats runs after a warm-up, the ratio, and
generated tokens/s. The model is random-init (no hub), so it rarely samples
EOS: nearly every sample runs to max_new_tokens on both paths.

--device cuda (bf16, SDPA, bucketed prompts) also prints the decode roofline:
a decode step at batch b and context length L reads every weight once plus the
KV cache, bytes = P*s + b * 2 * n_layer * L * d * s (P parameters, s bytes per
value, d model width); on a device of bandwidth W the step cannot take less
than bytes / W, so the roofline is b / (bytes / W) tokens/s (averaged over the
context lengths of the run). Bandwidth-bound means the step's FLOPs
(~2 P b) divided by its bytes stay below the device's FLOP/byte ratio
(H100 SXM: ~990 TFLOP/s bf16 / 3.35 TB/s ~ 295): b below ~300 for weights-dominated steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from workloads.text.sampling import sample_outputs, score_outputs  # noqa: E402
from workloads.text.models import encode_prompts, generate_outputs, load_model_and_tokenizer  # noqa: E402
from workloads.text.rewards import get_reward  # noqa: E402
from workloads.text.tasks import choose_inputs, get_examples, prompt_text, references, resolve_reward  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # SXM datasheet figures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="builtin:tiny-gpt2",
                        help="builtin:tiny-gpt2, or gpt2-small (GPT-2 124M built from config, char tokenizer ids)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="K samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call (extract's default: 16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    return parser.parse_args(argv)


def build(args):
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-gpt2", dtype=dtype)
    if args.model == "gpt2-small":  # GPT-2 124M shape, random init, the char tokenizer's ids
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).to(dtype)
    elif args.model != "builtin:tiny-gpt2":
        raise SystemExit(f"unknown --model {args.model!r}")
    model = model.to(args.device).eval()
    examples = get_examples("reverse", "train", choose_inputs("reverse", "train", args.prompts, seed=7))
    prompts = [prompt_text("reverse", ex, False) for ex in examples]
    prompt_ids = encode_prompts(tokenizer, prompts, 512, False)
    refs = [references("reverse", ex) for ex in examples]
    reward_fn = get_reward(*resolve_reward("reverse", "task", {}))
    return model, tokenizer, prompts, prompt_ids, refs, reward_fn


def original_way(model, tokenizer, prompts, prompt_ids, refs, reward_fn, args, gen):
    """K passes over the prompt set with one sample per prompt, then a reward call per sample."""
    samples = []  # (prompt index, output ids)
    for _ in range(args.samples):
        for start in range(0, len(prompt_ids), args.batch_size):
            outputs = generate_outputs(model, tokenizer, prompt_ids[start : start + args.batch_size],
                                       num_return_sequences=1, do_sample=True, temperature=gen.temperature,
                                       top_k=gen.top_k, top_p=gen.top_p, min_new_tokens=gen.min_new_tokens,
                                       max_new_tokens=gen.max_new_tokens)
            samples += [(start + i, o) for i, o in enumerate(outputs)]
    rewards = [reward_fn([prompts[i]], [tokenizer.decode(o, skip_special_tokens=True)], [refs[i]])[0]
               for i, o in samples]
    return [o for _, o in samples], rewards


def extraction_path(model, tokenizer, prompts, prompt_ids, refs, reward_fn, args, gen):
    """workloads/extract.py's per-shard loop: bucketed batches, K samples per generate(), one reward call per batch."""
    by_length = sorted(range(len(prompt_ids)), key=lambda j: len(prompt_ids[j]))
    all_outputs, all_rewards = [], []
    for start in range(0, len(by_length), args.batch_size):
        batch = by_length[start : start + args.batch_size]
        outputs = sample_outputs(model, tokenizer, [prompt_ids[j] for j in batch], args.samples, gen)
        _, rewards = score_outputs(tokenizer, reward_fn, [prompts[j] for j in batch], [refs[j] for j in batch],
                                   outputs, args.samples)
        all_outputs += outputs
        all_rewards += rewards
    return all_outputs, all_rewards


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def decode_roofline_tokens_per_s(model, args, prompt_ids, bandwidth) -> tuple[float, float]:
    """(tokens/s, bytes per step at the mean context) if every decode step only read its bytes at `bandwidth`."""
    config = model.config
    value_bytes = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() for p in model.parameters()) * value_bytes
    rows = args.batch_size * args.samples
    mean_prompt = sum(len(p) for p in prompt_ids) / len(prompt_ids)
    seconds = 0.0
    for step in range(args.max_new_tokens):
        context = mean_prompt + step
        kv_bytes = rows * 2 * config.n_layer * context * config.n_embd * value_bytes
        seconds += (weight_bytes + kv_bytes) / bandwidth
    mean_bytes = weight_bytes + rows * 2 * config.n_layer * (mean_prompt + args.max_new_tokens / 2) * config.n_embd * value_bytes
    return rows * args.max_new_tokens / seconds, mean_bytes


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, prompts, prompt_ids, refs, reward_fn = build(args)
    gen = SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0, max_new_tokens=args.max_new_tokens)
    methods = {"original": original_way, "extraction": extraction_path}

    torch.manual_seed(0)
    produced = {name: fn(model, tokenizer, prompts, prompt_ids, refs, reward_fn, args, gen)  # warm-up
                for name, fn in methods.items()}
    for outputs, rewards in produced.values():  # same amount of work: every prompt got K scored samples
        assert len(outputs) == len(rewards) == args.prompts * args.samples
    seconds = {name: [] for name in methods}
    tokens = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            synchronize(args.device)
            tic = time.perf_counter()
            outputs, _ = fn(model, tokenizer, prompts, prompt_ids, refs, reward_fn, args, gen)
            synchronize(args.device)
            seconds[name].append(time.perf_counter() - tic)
            tokens[name].append(sum(len(o) for o in outputs))

    cuda = str(args.device).startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else \
        f"CPU, {os.cpu_count()} cores ({platform.machine()}), torch threads {args.threads}"
    print(f"device: {device}; torch {torch.__version__}")
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{next(model.parameters()).dtype}); reverse task, {args.prompts} prompts x K={args.samples}, "
          f"max_new_tokens {args.max_new_tokens}, batch_size {args.batch_size}; {args.repeats} repeats after a warm-up")
    print()
    print("| method | median s | min-max s | generated tokens/s (median) |")
    print("| --- | --- | --- | --- |")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name in methods:
        rate = statistics.median(t / s for t, s in zip(tokens[name], seconds[name]))
        print(f"| {name} | {median[name]:.3f} | {min(seconds[name]):.3f}-{max(seconds[name]):.3f} | {rate:,.0f} |")
    print()
    print(f"original / extraction = {median['original'] / median['extraction']:.2f}x")
    if cuda:
        name = torch.cuda.get_device_name()
        bandwidth = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
        if bandwidth is None:
            print(f"no HBM bandwidth on record for {name!r}: roofline not computed")
            return
        roofline, step_bytes = decode_roofline_tokens_per_s(model, args, prompt_ids, bandwidth)
        rate = statistics.median(t / s for t, s in zip(tokens["extraction"], seconds["extraction"]))
        print(f"decode roofline at {args.batch_size * args.samples} rows: {roofline:,.0f} tokens/s "
              f"({step_bytes / 1e6:.0f} MB per step at {bandwidth / 1e12:.2f} TB/s); extraction reaches "
              f"{rate:,.0f} tokens/s = {100 * rate / roofline:.0f}% of it (includes prefill, sampling, decode, rewards)")


if __name__ == "__main__":
    main()
