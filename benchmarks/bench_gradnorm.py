"""Per-input gradient norms: the per-input loop against the batched path, and
the floor (one ordinary batched backward over the same sequences).

    python benchmarks/bench_gradnorm.py                       # CPU: 2-layer 128-wide GPT-2, 32 inputs x K=8 x 48 tokens
    python benchmarks/bench_gradnorm.py --model-size gpt2-small --inputs 8 --samples 8 --tokens 64 --repeats 3 --threads 2
    python benchmarks/bench_gradnorm.py --model-size smollm2-135m --inputs 8 --samples 8 --tokens 64 --repeats 3 --threads 2
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
import importlib
import importlib.util
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
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from workloads.text import gradnorm  # noqa: E402
from workloads.text.gradnorm import (  # noqa: E402
    leave_one_out_advantages,
    per_input_grad_norms,
    per_input_grad_norms_loop,
)
from workloads.text.models import token_log_probs  # noqa: E402

MODEL_SIZES = {  # built from config, random init (no hub, no weights)
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): Llama, tied embeddings
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
}
DEFAULT_VOCAB = {"tiny": 53, "gpt2-small": 50257, "smollm2-135m": 49152}
METHODS = ("loop", "batched", "floor")
BASELINE = "batched@baseline"  # --baseline-tree: the batched path of another checkout, timed beside this one


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="tiny")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: 53, the built-in char tokenizer's, for tiny; 50257 for "
                             "gpt2-small; 49152 for smollm2-135m)")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="K samples per input")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="longest prompt (prompts are 1/2 to all of it)")
    parser.add_argument("--tokens", type=int, default=48, help="padded width of a sequence: prompt + output")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-sequences", type=int, default=None,
                        help="batched path: at most this many sequences per forward/backward (default: the "
                             "production default)")
    parser.add_argument("--memory-budget-mib", type=int, default=None,
                        help="batched path: its memory budget (default: the production default, "
                             "workloads.text.gradnorm.default_memory_budget)")
    parser.add_argument("--baseline-tree", default=None,
                        help="also time the batched path of another checkout of this repository (e.g. "
                             "`git worktree add /tmp/before main`), interleaved with the others, as "
                             f"{BASELINE!r}: before/after in one run")
    parser.add_argument("--memory-of", choices=METHODS + (BASELINE,), help=argparse.SUPPRESS)  # the per-method subprocess
    return parser.parse_args(argv)


def build(args):
    torch.manual_seed(0)
    vocab = args.vocab or DEFAULT_VOCAB[args.model_size]
    if args.model_size.startswith("smollm2"):
        config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(2048, args.tokens), bos_token_id=0,
                             eos_token_id=1, **MODEL_SIZES[args.model_size])
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab, n_positions=max(128, args.tokens), resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, **MODEL_SIZES[args.model_size])
        model = GPT2LMHeadModel(config)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
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


def baseline_gradnorm(tree: str):
    """workloads.text.gradnorm of another checkout, imported as a separate package."""
    name = "baseline_workloads"
    if name not in sys.modules:
        package = os.path.join(os.path.abspath(tree), "workloads")
        spec = importlib.util.spec_from_file_location(name, os.path.join(package, "__init__.py"),
                                                      submodule_search_locations=[package])
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.text.gradnorm")


def runner(method, args):
    if method == BASELINE:
        baseline = baseline_gradnorm(args.baseline_tree).per_input_grad_norms
        return lambda m, p, o, r: baseline(m, p, o, r)
    if method == "loop":
        return lambda m, p, o, r: per_input_grad_norms_loop(m, p, o, r)
    if method == "batched":
        settings = {"max_sequences": args.max_sequences} if args.max_sequences else {}
        if args.memory_budget_mib:
            settings["memory_budget_bytes"] = args.memory_budget_mib << 20
        return lambda m, p, o, r: per_input_grad_norms(m, p, o, r, **settings)
    return run_floor


def baseline_settings(model, args) -> str:
    return batched_settings(model, args, baseline_gradnorm(args.baseline_tree))


def batched_settings(model, args, gradnorm=gradnorm) -> str:
    """How the batched path chunks (its tree's production defaults unless overridden)."""
    unsupported = gradnorm.batched_grad_norms_unsupported(model)
    if unsupported is not None:
        return f"falls back to the loop ({unsupported})"
    if hasattr(gradnorm, "DEFAULT_MAX_SEQUENCES"):  # the fixed chunk before the memory budget
        return f"{args.max_sequences or gradnorm.DEFAULT_MAX_SEQUENCES.get(torch.device(args.device).type)} " \
               "sequences per forward/backward"
    budget = (args.memory_budget_mib << 20) if args.memory_budget_mib else gradnorm.default_memory_budget(model)
    return f"memory budget {budget / 2**20:.0f} MiB" + \
        (f", at most {args.max_sequences} sequences per chunk" if args.max_sequences else "")


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
    load_before = os.getloadavg()
    model, prompts, outputs, rewards = build(args)
    methods = METHODS[:2] + ((BASELINE,) if args.baseline_tree else ()) + METHODS[2:]
    functions = {method: runner(method, args) for method in methods}

    loop_norms = functions["loop"](model, prompts, outputs, rewards)  # warm-up, and the exactness check
    batched_norms = functions["batched"](model, prompts, outputs, rewards)
    relative = ((batched_norms - loop_norms).abs() / loop_norms.abs().clamp(min=1e-30)).max().item()
    for method in methods[2:]:
        functions[method](model, prompts, outputs, rewards)

    seconds = {method: [] for method in methods}
    for _ in range(args.repeats):
        for method in methods:
            synchronize(args.device)
            tic = time.perf_counter()
            functions[method](model, prompts, outputs, rewards)
            synchronize(args.device)
            seconds[method].append(time.perf_counter() - tic)
    load_after = os.getloadavg()
    memory = {method: peak_memory_mib(method, args) for method in methods}

    device = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else \
        f"CPU, {os.cpu_count()} cores ({platform.machine()}), torch threads {args.threads}"
    params = sum(p.numel() for p in model.parameters())
    print(f"device: {device}; torch {torch.__version__}")
    family = "Llama" if args.model_size.startswith("smollm2") else "GPT-2"
    print(f"model: {family} {args.model_size} from config ({params / 1e6:.2f}M params, vocab {model.config.vocab_size}, "
          f"{args.dtype}); {args.inputs} inputs x K={args.samples} x {args.tokens} tokens (padded width); "
          f"{args.repeats} repeats after a warm-up")
    print(f"batched path: {batched_settings(model, args)}; max relative difference of its norms from the loop's "
          f"{relative:.1e}")
    if args.baseline_tree:
        print(f"{BASELINE}: {baseline_settings(model, args)} ({os.path.abspath(args.baseline_tree)})")
    print(f"load average (1 min) before / after the timed runs: {load_before[0]:.1f} / {load_after[0]:.1f}")
    print()
    median = {m: statistics.median(s) for m, s in seconds.items()}
    memory_kind = "peak CUDA MiB" if str(args.device).startswith("cuda") else "peak RSS MiB"
    print(f"| method | median s | min-max s | {memory_kind} |")
    print("| --- | --- | --- | --- |")
    for method in methods:
        print(f"| {method} | {median[method]:.3f} | {min(seconds[method]):.3f}-{max(seconds[method]):.3f} "
              f"| {memory[method]:.0f} |")
    print()
    print(f"batched / floor = {median['batched'] / median['floor']:.2f}x   "
          f"loop / batched = {median['loop'] / median['batched']:.2f}x   "
          f"batched / loop = {median['batched'] / median['loop']:.2f}x")
    print(f"peak memory batched / loop = {memory['batched'] / max(memory['loop'], 1e-9):.2f}x")
    if args.baseline_tree:
        print(f"{BASELINE} / floor = {median[BASELINE] / median['floor']:.2f}x   "
              f"{BASELINE} / loop = {median[BASELINE] / median['loop']:.2f}x   "
              f"peak memory {BASELINE} / loop = {memory[BASELINE] / max(memory['loop'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
