"""One GRPO step of the real model, phase by phase, with the gradient-norm monitor on and off.

    python benchmarks/bench_grpo_step.py                        # SmolLM2-135M, 8 prompts x K=8 x 32 new tokens, 1 thread
    python benchmarks/bench_grpo_step.py --threads 2 --repeats 5
    python benchmarks/bench_grpo_step.py --device cuda --prompts 64 --samples 8 --tokens 64

Each repeat (after one warm-up) samples ONE rollout -- timed with hf generate() in float32, in
bfloat16 (the sampling copy), and with vLLM where it is installed -- scores it, and then runs
every update variant on those same samples from the same weights (restored before each, fresh
AdamW), in turn, so a noisy neighbour slows all alike:

  before-off   an ordinary loss.backward() update running every completion; the stored
               log-probs by their own no-grad forward  (rlgrad before the per-prompt backward,
               monitor off)
  before-on    the same plus the separate monitor pass, gradnorm.per_input_grad_norms
               (rlgrad before, monitor on)
  off          the update's own per-prompt backward (update_grads.py) without norms, zero-advantage
               completions not run, the stored log-probs from its forward (monitor_grad_norm false)
  on           the same backward asked for each prompt's share, the leave-one-out norms derived from
               it, the separate pass only for what it cannot give (monitor_grad_norm true, the default)

Phases of a variant: old/ref log-probs (grpo.rollout_batch), update forward+backward, optimiser
(AdamW), monitor (the separate pass), stored log-probs (their own forward). A step is sampling
(the sampler the run uses: --sampling-dtype) + scoring + the variant. Prints the median and
min-max of each over --repeats, each phase's share of the step, the peak memory of the variant
(CPU: see below;
CUDA: max_memory_allocated over what was allocated before), and the ratios the issue asks for.
On CPU the peak is measured once per variant in a fresh process on the warm-up's samples (the
growth of VmHWM over the resident set with the model loaded): in one process glibc reuses
memory another variant freed, and the peak would read near 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from workloads.text import grpo  # noqa: E402
from workloads.text.grpo import GRPORun, Learner, UpdateMonitor, grpo_update  # noqa: E402
from workloads.text.grpo_config import GRPOConfig  # noqa: E402
from workloads.text.models import load_model_and_tokenizer  # noqa: E402
from workloads.text.rl_loop import Ranks, RLRun  # noqa: E402
from workloads.text.sampling import Group, SamplingModel, prompts_of, sample_outputs, score_outputs  # noqa: E402
from workloads.text.rewards import Reward  # noqa: E402
from workloads.text.sampling import Prompts, ScoredSamples  # noqa: E402
from workloads.text.tasks import reward_of, task_of  # noqa: E402

VARIANTS = {  # name: (update_path, skip zero-advantage completions, monitor on)
    "before-off": ("autograd", False, False),
    "before-on": ("autograd", False, True),
    "off": ("auto", True, False),
    "on": ("auto", True, True),
}
PHASES = ("old/ref log-probs", "update fwd+bwd", "optimiser", "monitor", "stored log-probs")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--task", default="arithmetic_d1")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="K")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one variant's peak, in a fresh process
    parser.add_argument("--groups-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class Harness:
    """What GRPORun.measure_rest needs of a run, on the benchmark's policy: the real code, not a copy."""

    grad_norms = RLRun.grad_norms
    sequence_log_probs = RLRun.sequence_log_probs
    measure_rest = GRPORun.measure_rest

    def __init__(self, config, policy, seconds):
        self.config, self.policy, self.seconds = config, policy, seconds


def timed(seconds: dict, name: str, fn, device):
    def wrapper(*args, **kwargs):
        synchronize(device)
        tic = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            synchronize(device)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - tic
    return wrapper


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


class PeakMemory:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if str(self.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if str(self.device).startswith("cuda"):
            self.mib = (torch.cuda.max_memory_allocated() - self.before) / 2**20
        else:
            self.mib = (_status_kib("VmHWM") * 1024 - self.before) / 2**20


OPTIMIZERS: dict[int, torch.optim.Optimizer] = {}


def fresh_optimizer(policy, learning_rate) -> torch.optim.Optimizer:
    """One AdamW for every variant, its moments zeroed and its step count reset before each: as new,
    without allocating new moments (page faults that made the first step's time vary 3x between runs)."""
    optimizer = OPTIMIZERS.setdefault(id(policy), torch.optim.AdamW(policy.parameters(), lr=learning_rate))
    for state in optimizer.state.values():
        for value in state.values():
            value.zero_()
    return optimizer


def run_variant(name, config, policy, weights, groups, device) -> tuple[dict, float]:
    """One update of `groups` from `weights`, as the variant does it: (phase seconds, peak MiB)."""
    update_path, skip, monitor_on = VARIANTS[name]
    config = config.model_copy(update={"monitor_grad_norm": monitor_on})
    with torch.no_grad():
        for p, w in zip(policy.parameters(), weights, strict=True):
            p.copy_(w)
    optimizer = fresh_optimizer(policy, config.learning_rate)
    seconds = {}
    learner = Learner(config, policy, optimizer, Ranks(0, 1, device), update_path=update_path,
                      skip_zero_advantage=skip, stop_ids={config_eos(policy), 0})
    harness = Harness(config, policy, seconds)
    harness.grad_norms = timed(seconds, "monitor", lambda groups: RLRun.grad_norms(harness, groups), device)
    harness.sequence_log_probs = timed(seconds, "stored log-probs",
                                       lambda *a: RLRun.sequence_log_probs(harness, *a), device)
    optimizer.step = timed(seconds, "optimiser", type(optimizer).step.__get__(optimizer), device)
    real_batch = grpo.rollout_batch
    grpo.rollout_batch = timed(seconds, "old/ref log-probs", real_batch, device)
    callback = {"seconds": 0.0}

    def at_rollout_policy(monitor):
        tic = time.perf_counter()
        if update_path == "autograd":
            monitor.log_probs.clear()  # rlgrad before: the stored log-probs by their own forward
        harness.measure_rest(groups, groups, monitor)
        callback["seconds"] += time.perf_counter() - tic

    try:
        with PeakMemory(device) as peak:
            synchronize(device)
            tic = time.perf_counter()
            grpo_update(learner, groups, monitor=UpdateMonitor(monitor_on, at_rollout_policy=at_rollout_policy))
            synchronize(device)
            total = time.perf_counter() - tic
    finally:
        grpo.rollout_batch = real_batch
    seconds["update fwd+bwd"] = total - callback["seconds"] - seconds.get("optimiser", 0) - \
        seconds.get("old/ref log-probs", 0)
    return {phase: seconds.get(phase, 0.0) for phase in PHASES}, peak.mib


def config_eos(policy) -> int:
    return policy.config.eos_token_id if isinstance(policy.config.eos_token_id, int) else 0


def cpu_peaks(groups, args) -> dict[str, float]:
    """Each variant's peak resident-set growth during its first update, in a fresh process (the
    model loaded, then VmHWM reset to VmRSS; glibc cannot reuse another variant's freed memory)."""
    import json
    import subprocess
    import tempfile
    peaks = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump([{"input_id": g.input_id, "prompt": g.prompts.ids[0], "outputs": g.scored.outputs,
                    "texts": g.scored.texts, "rewards": g.rewards.tolist()} for g in groups], f)
        f.flush()
        for variant in VARIANTS:
            command = [sys.executable, os.path.abspath(__file__), "--memory-of", variant, "--groups-file", f.name]
            command += sys.argv[1:] if sys.argv[0].endswith("bench_grpo_step.py") else []
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            peaks[variant] = float(result.stdout.strip().splitlines()[-1])
    return peaks


def memory_of(args, config, policy, device) -> None:
    import json
    with open(args.groups_file) as f:
        groups = [Group(g["input_id"], None, Prompts([""], [g["prompt"]], [[]], [{}], [g["input_id"]]),
                        ScoredSamples.of(len(g["outputs"]), g["outputs"], g["texts"], [Reward(r) for r in g["rewards"]]))
                  for g in json.load(f)]
    weights = [p.detach().clone() for p in policy.parameters()]
    _, peak = run_variant(args.memory_of, config, policy, weights, groups, device)
    print(f"{peak:.1f}")


def main(argv=None) -> None:
    args = parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = GRPOConfig.model_validate({
        "model": args.model, "task": args.task, "num_train_inputs": max(64, args.prompts),
        "inputs_per_step": args.prompts, "num_samples_per_input": args.samples, "loss_type": args.loss_type,
        "minibatch_size": args.prompts * args.samples, "generation": {"max_new_tokens": args.tokens},
        "seed": args.seed})
    policy, tokenizer = load_model_and_tokenizer(config.model, device, config.train_dtype)
    policy.eval()
    if args.memory_of:
        return memory_of(args, config, policy, device)
    weights = [p.detach().clone() for p in policy.parameters()]
    task = task_of(config)
    reward_fn = reward_of(config, task)
    input_ids = task.choose_inputs("train", config.num_train_inputs, config.seed)
    samplers = {"hf float32": SamplingModel(policy, torch.float32),
                "hf bfloat16": SamplingModel(policy, torch.bfloat16)}
    try:
        from workloads.text.vllm_sampler import build_for  # noqa: F401
        import vllm  # noqa: F401
        vllm_available = True
    except ImportError:
        vllm_available = False
    run_sampler = "hf float32" if device.type == "cpu" else "hf bfloat16"  # GRPORun's dtype auto
    print(f"# bench_grpo_step: {config.model} on {device} ({platform.processor() or platform.machine()}), "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}; {args.prompts} prompts x K = "
          f"{args.samples} x {args.tokens} new tokens, loss_type {args.loss_type}, one optimiser step; "
          f"steps sample with {run_sampler}; vLLM {'installed' if vllm_available else 'not installed'}")
    times = {v: {p: [] for p in PHASES} for v in VARIANTS}
    sampling = {s: [] for s in samplers}
    scoring, peaks, steps, active = [], {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}, []
    for repeat in range(args.repeats + 1):
        torch.manual_seed(args.seed + repeat)
        chosen = input_ids[repeat * args.prompts % len(input_ids):][: args.prompts]
        examples = task.examples("train", chosen)
        prompts = prompts_of(config, task, examples, tokenizer, False, "ppo")
        outputs = None
        sample_seconds = {}
        for name, sampler in samplers.items():
            sampler.refresh()
            synchronize(device)
            tic = time.perf_counter()
            drawn = sample_outputs(sampler.model, tokenizer, prompts.ids, args.samples, config.generation)
            synchronize(device)
            sample_seconds[name] = time.perf_counter() - tic
            if name == run_sampler:
                outputs = drawn
        tic = time.perf_counter()
        texts, rewards = score_outputs(tokenizer, reward_fn, prompts, outputs, args.samples)
        score_seconds = time.perf_counter() - tic
        groups = Group.split(examples, prompts, ScoredSamples.of(args.samples, outputs, texts, rewards))
        if repeat == 0 and device.type == "cpu":  # each variant's peak in a fresh process, on these samples
            memory = cpu_peaks(groups, args)
        results = {v: run_variant(v, config, policy, weights, groups, device) for v in VARIANTS}
        if repeat == 0:
            continue  # warm-up
        for name, value in sample_seconds.items():
            sampling[name].append(value)
        scoring.append(score_seconds)
        active.append(sum(1 for g in groups if g.std > 0))
        for v, (phases, peak) in results.items():
            for phase, value in phases.items():
                times[v][phase].append(value)
            peaks[v].append(memory[v] if device.type == "cpu" else peak)
            steps[v].append(sample_seconds[run_sampler] + score_seconds + sum(phases.values()))
        print(f"#   repeat {repeat}: {active[-1]} of {args.prompts} groups with a non-zero std; step seconds "
              + ", ".join(f"{v} {steps[v][-1]:.2f}" for v in VARIANTS), flush=True)

    def spread(values):
        return f"{statistics.median(values):8.3f} ({min(values):.3f}-{max(values):.3f})"

    print()
    print("| sampling | seconds, median (min-max) |")
    print("| --- | --- |")
    for name, values in sampling.items():
        print(f"| {name} | {spread(values)} |")
    print(f"| vLLM | {'(run with vLLM installed)' if not vllm_available else 'see bench_vllm.py'} |")
    print(f"| scoring | {spread(scoring)} |")
    print()
    header = "| phase | " + " | ".join(VARIANTS) + " |"
    print(header)
    print("| --- |" + " --- |" * len(VARIANTS))
    step_median = {v: statistics.median(steps[v]) for v in VARIANTS}
    rows = [("sampling (" + run_sampler + ")", {v: sampling[run_sampler] for v in VARIANTS}),
            ("scoring", {v: scoring for v in VARIANTS})]
    rows += [(phase, {v: times[v][phase] for v in VARIANTS}) for phase in PHASES]
    for phase, by_variant in rows:
        cells = []
        for v in VARIANTS:
            median = statistics.median(by_variant[v])
            cells.append(f"{median:.3f} s ({100 * median / step_median[v]:.0f}%)")
        print(f"| {phase} | " + " | ".join(cells) + " |")
    print("| **step** | " + " | ".join(f"**{spread(steps[v]).strip()}**" for v in VARIANTS) + " |")
    print("| peak memory of the update, MiB | " + " | ".join(f"{statistics.median(peaks[v]):.0f}" for v in VARIANTS)
          + " |")
    print()
    ratio = lambda a, b: statistics.median([x / y for x, y in zip(steps[a], steps[b])])  # noqa: E731
    update = lambda v: [sum(times[v][p][i] for p in PHASES) for i in range(args.repeats)]  # noqa: E731
    print(f"step with the monitor / without (this rlgrad: on / off):        {ratio('on', 'off'):.3f}x")
    print(f"step with the monitor / without (rlgrad before: before-on / before-off): {ratio('before-on', 'before-off'):.3f}x")
    print(f"step on / step before-off (the monitor on now, against no monitor before): {ratio('on', 'before-off'):.3f}x")
    monitor_before = statistics.median([m / u for m, u in zip(times["before-on"]["monitor"],
                                                               times["before-on"]["update fwd+bwd"])])
    print(f"separate monitor pass / the update's fwd+bwd (before-on): {monitor_before:.2f}x")
    print(f"update phases on / off: {statistics.median([a / b for a, b in zip(update('on'), update('off'))]):.3f}x; "
          f"groups with a non-zero std per repeat: {active}")


if __name__ == "__main__":
    main()
