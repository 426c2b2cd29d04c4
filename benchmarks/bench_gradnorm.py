"""Per-input gradient norms: the per-input loop against the batched path, and
the floor (one ordinary batched backward over the same sequences).

    python benchmarks/bench_gradnorm.py                       # CPU: 2-layer 128-wide GPT-2, 32 inputs x K=8 x 48 tokens
    python benchmarks/bench_gradnorm.py --device cuda --model-size gpt2-small --inputs 64   # on a GPU

Times, in ONE process and interleaved (repeat r runs loop, batched, floor in
turn, so a noisy neighbour slows all three alike):
  loop     workloads.text.gradnorm.per_input_grad_norms_loop  one backward per input
  batched  workloads.text.gradnorm.per_input_grad_norms       one forward + one backward per chunk
  floor    one forward and one ordinary backward (parameter .grad) of the summed
           surrogate over all sequences: what any exact method must at least pay
Each time includes the forward. Prints median and min-max over --repeats runs
after one warm-up, the ratios batched/floor and loop/batched, and the peak
memory of one call of each method: on CPU the growth of the peak resident set
over the loaded model and data (VmHWM after resetting it, else ru_maxrss),
measured in a fresh subprocess per method;
on CUDA torch.cuda.max_memory_allocated above the memory held before the call.
Also checks that the batched norms equal the loop's (relative difference printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from workloads.text.gradnorm import (  # noqa: E402
    DEFAULT_MAX_SEQUENCES,
    leave_one_out_advantages,
    per_input_grad_norms,
    per_input_grad_norms_loop,
)
from workloads.text.models import token_log_probs  # noqa: E402

MODEL_SIZES = {  # GPT-2 built from config, random init (no hub)
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12),
}
METHODS = ("loop", "batched", "floor")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="tiny")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: 53, the built-in char tokenizer's, for tiny; 50257 for gpt2-small)")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="K samples per input")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="longest prompt (prompts are 1/2 to all of it)")
    parser.add_argument("--tokens", type=int, default=48, help="padded width of a sequence: prompt + output")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-sequences", type=int, default=None,
                        help="batched path: sequences per forward/backward (default: the production default, "
                             "workloads.text.gradnorm.DEFAULT_MAX_SEQUENCES of the device)")
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)  # the per-method subprocess
    return parser.parse_args(argv)


def build(args):
    torch.manual_seed(0)
    vocab = args.vocab or (53 if args.model_size == "tiny" else 50257)
    config = GPT2Config(vocab_size=vocab, n_positions=max(128, args.tokens), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, **MODEL_SIZES[args.model_size])
    model = GPT2LMHeadModel(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    rng = random.Random(0)
    prompts, outputs = [], []
    output_tokens = args.tokens - args.prompt_tokens
    for _ in range(args.inputs):
        prompts.append([rng.randrange(2, vocab) for _ in range(rng.randint(args.prompt_tokens // 2, args.prompt_tokens))])
        # ragged outputs ending in EOS (id 1), the first of each input filling the width: padding on both
        # sides, as in extraction
        lengths = [output_tokens] + [rng.randint(output_tokens // 2, output_tokens) for _ in range(args.samples - 1)]
        outputs.append([[rng.randrange(2, vocab) for _ in range(n - 1)] + [1] for n in lengths])
    rewards = torch.rand(args.inputs, args.samples, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, prompts, outputs, rewards


def run_floor(model, prompts, outputs, rewards):
    """One forward and one ordinary backward of Σ_i (1/K) Σ_k A_ik log π(y_ik|x_i) over all sequences."""
    K = rewards.shape[1]
    weights = (leave_one_out_advantages(rewards) / K).reshape(-1)
    model.zero_grad(set_to_none=True)
    log_probs, _ = token_log_probs(model, [p for p, group in zip(prompts, outputs) for _ in group],
                                   [o for group in outputs for o in group])
    (log_probs.sum(dim=1) * weights.to(log_probs)).sum().backward()
    model.zero_grad(set_to_none=True)


def runner(method, args):
    if method == "loop":
        return lambda m, p, o, r: per_input_grad_norms_loop(m, p, o, r)
    if method == "batched":
        return lambda m, p, o, r: per_input_grad_norms(m, p, o, r, max_sequences=args.max_sequences)
    return run_floor


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mib(method, args) -> float:
    """Peak memory of one call of `method`, above what the loaded model and data hold."""
    if str(args.device).startswith("cuda"):
        model, prompts, outputs, rewards = build(args)
        synchronize(args.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner(method, args)(model, prompts, outputs, rewards)
        synchronize(args.device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # CPU: a fresh process per method, so one method's peak cannot hide another's
    command = [sys.executable, os.path.abspath(__file__), "--memory-of", method] + sys.argv[1:]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def memory_subprocess(args) -> None:
    """Prints the growth of the peak resident set during one call, in MiB.

    The imports peak higher than a small model's call, so ru_maxrss alone would
    read 0: on Linux the peak (VmHWM) is first reset to the current RSS by
    writing 5 to /proc/self/clear_refs; elsewhere ru_maxrss deltas are used."""
    torch.set_num_threads(args.threads)
    model, prompts, outputs, rewards = build(args)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, \
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner(args.memory_of, args)(model, prompts, outputs, rewards)
    print(json.dumps({"peak_mib": (peak() - before) / 1024}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_of:
        return memory_subprocess(args)
    torch.set_num_threads(args.threads)
    model, prompts, outputs, rewards = build(args)
    functions = {method: runner(method, args) for method in METHODS}

    loop_norms = functions["loop"](model, prompts, outputs, rewards)  # warm-up, and the exactness check
    batched_norms = functions["batched"](model, prompts, outputs, rewards)
    functions["floor"](model, prompts, outputs, rewards)
    relative = ((batched_norms - loop_norms).abs() / loop_norms.abs().clamp(min=1e-30)).max().item()

    seconds = {method: [] for method in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            synchronize(args.device)
            tic = time.perf_counter()
            functions[method](model, prompts, outputs, rewards)
            synchronize(args.device)
            seconds[method].append(time.perf_counter() - tic)
    memory = {method: peak_memory_mib(method, args) for method in METHODS}

    device = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else \
        f"CPU, {os.cpu_count()} cores ({platform.machine()}), torch threads {args.threads}"
    params = sum(p.numel() for p in model.parameters())
    print(f"device: {device}; torch {torch.__version__}")
    print(f"model: GPT-2 {args.model_size} from config ({params / 1e6:.2f}M params, vocab {model.config.vocab_size}, "
          f"{args.dtype}); {args.inputs} inputs x K={args.samples} x {args.tokens} tokens (padded width); "
          f"{args.repeats} repeats after a warm-up")
    print(f"batched path: {args.max_sequences or DEFAULT_MAX_SEQUENCES.get(torch.device(args.device).type)} "
          f"sequences per forward/backward; max relative difference of its norms from the loop's {relative:.1e}")
    print()
    median = {m: statistics.median(s) for m, s in seconds.items()}
    memory_kind = "peak CUDA MiB" if str(args.device).startswith("cuda") else "peak RSS MiB"
    print(f"| method | median s | min-max s | {memory_kind} |")
    print("| --- | --- | --- | --- |")
    for method in METHODS:
        print(f"| {method} | {median[method]:.3f} | {min(seconds[method]):.3f}-{max(seconds[method]):.3f} "
              f"| {memory[method]:.0f} |")
    print()
    print(f"batched / floor = {median['batched'] / median['floor']:.2f}x   "
          f"loop / batched = {median['loop'] / median['batched']:.2f}x")


if __name__ == "__main__":
    main()
