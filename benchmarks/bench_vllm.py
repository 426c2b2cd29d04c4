"""Sampling throughput: the hf sampler (extract's path, float32 and bfloat16) against the vLLM
sampler (workloads/text/vllm_sampler.py), side by side on SmolLM2-135M-Instruct.

Runs in an environment that has vLLM (on a CPU: .venv-vllm, built by `bash tests/vllm_env.sh`):

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/bench_vllm.py                       # CPU
    PYTHONPATH=. python benchmarks/bench_vllm.py --device cuda --prompts 512 --batch-size 64   # a GPU with vllm

Same prompts (arithmetic_d1 through the chat template, as GRPO samples them), K, and exactly
--max-new-tokens new tokens per sample on every method (min_new_tokens = max_new_tokens, so
EOS cannot make one method's work smaller), temperature 1. hf = sampling.sample_outputs in
batches of --batch-size prompts with K sequences each (what extract and GRPO call); vllm =
VLLMSampler.sample on all prompts at once (the engine schedules them itself), engine dtype
--vllm-dtype. Each repeat runs every method in turn (a noisy neighbour slows all alike);
median and min-max over --repeats after one warm-up, generated tokens/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from workloads.text.config import GenerationConfig  # noqa: E402
from workloads.text.models import encode_prompts, load_model_and_tokenizer  # noqa: E402
from workloads.text.sampling import sample_outputs  # noqa: E402
from workloads.text.tasks import choose_inputs, get_examples, prompt_text  # noqa: E402
from workloads.text.vllm_sampler import VLLMSampler  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="K samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="hf: prompts per generate() call (extract's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hf-dtypes", default="float32,bfloat16")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # before vLLM's CPU worker makes set_num_threads a no-op
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    models = {f"hf {d}": load_model_and_tokenizer(MODEL, args.device, d) for d in args.hf_dtypes.split(",")}
    tokenizer = next(iter(models.values()))[1]
    examples = get_examples("arithmetic_d1", "train", choose_inputs("arithmetic_d1", "train", args.prompts, seed=0))
    prompt_ids = encode_prompts(tokenizer, [prompt_text("arithmetic_d1", ex, False) for ex in examples], 256, False)
    tic = time.perf_counter()
    model = next(iter(models.values()))[0]
    engine = VLLMSampler.build(MODEL, model, tokenizer, gen, seed=0, dtype=getattr(torch, args.vllm_dtype),
                               device=args.device)
    startup = time.perf_counter() - tic

    def hf(model):
        return [o for start in range(0, len(prompt_ids), args.batch_size)
                for o in sample_outputs(model, tokenizer, prompt_ids[start : start + args.batch_size], args.samples, gen)]

    methods = {name: (lambda m=m: hf(m.eval())) for name, (m, _) in models.items()}
    methods[f"vllm {args.vllm_dtype}"] = lambda: engine.sample(prompt_ids, args.samples, gen)
    seconds, tokens = {n: [] for n in methods}, {n: [] for n in methods}
    for repeat in range(args.repeats + 1):
        for name, fn in methods.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            tic = time.perf_counter()
            with torch.no_grad():
                outputs = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:  # the first round is the warm-up
                seconds[name].append(time.perf_counter() - tic)
                tokens[name].append(sum(len(o) for o in outputs))
            assert len(outputs) == args.prompts * args.samples
    report(args, methods, seconds, tokens, startup, model)


def report(args, methods, seconds, tokens, startup, model) -> None:
    import vllm

    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else \
        f"CPU, {os.cpu_count()} cores ({platform.machine()}), torch threads {args.threads}"
    print(f"device: {device}; torch {torch.__version__}, vllm {vllm.__version__}")
    print(f"model: {MODEL} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params); arithmetic_d1, "
          f"{args.prompts} prompts x K={args.samples}, exactly {args.max_new_tokens} new tokens each, temperature 1; "
          f"hf batch_size {args.batch_size}; {args.repeats} repeats after a warm-up; vLLM engine start {startup:.1f} s")
    print()
    print("| sampler | median s | min-max s | generated tokens/s (median) |")
    print("| --- | --- | --- | --- |")
    rates = {}
    for name in methods:
        rates[name] = statistics.median(t / s for t, s in zip(tokens[name], seconds[name]))
        print(f"| {name} | {statistics.median(seconds[name]):.2f} | {min(seconds[name]):.2f}-{max(seconds[name]):.2f} "
              f"| {rates[name]:,.0f} |")
    vllm_name = f"vllm {args.vllm_dtype}"
    print()
    print("   ".join(f"{vllm_name} / {name} = {rates[vllm_name] / rates[name]:.2f}x" for name in methods
                     if name != vllm_name))


if __name__ == "__main__":  # vLLM's engine may start processes that re-import the main module
    main()
