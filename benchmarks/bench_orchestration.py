"""Orchestration overhead: N no-op trials through rlgrad vs the same through a
bare Ray Tune function trainable, on one Ray instance, runs interleaved.

rlgrad's side is a real sweep (spec validation, trial ids, config.json, the
trials table, metrics shards, per-trial summaries) of the `noop` workload with
inline trials (scaling.num_workers: 0, one CPU each; rlgrad reuses the trial
actors of inline stages). The bare side reports the same objective from a
function trainable holding one CPU, with Tune's defaults (a new actor per
trial) and with reuse_actors=True.

    python benchmarks/bench_orchestration.py              # 100 trials, 3 repeats
    python benchmarks/bench_orchestration.py --trials 20 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

SPEC = """
sweep: overhead{run}
stages:
  - name: noop
    workload: noop
    search: {{grid: {{x: [{xs}]}}}}
    scaling: {{num_workers: 0, cpus_per_worker: 1}}
"""


def bare_objective(config):
    return {"objective": -((config["x"] - 1.0) ** 2)}


def run_bare(num_trials: int, storage: str, run: int, reuse_actors: bool = False) -> float:
    from ray import tune

    start = time.perf_counter()
    tuner = tune.Tuner(tune.with_resources(bare_objective, {"cpu": 1}),
                       param_space={"x": tune.grid_search([float(i) for i in range(num_trials)])},
                       tune_config=tune.TuneConfig(reuse_actors=reuse_actors),
                       run_config=tune.RunConfig(storage_path=storage, name=f"bare{run}{reuse_actors}", verbose=0))
    grid = tuner.fit()
    assert len(grid) == num_trials and not grid.errors
    return time.perf_counter() - start


def run_rlgrad(num_trials: int, results: str, run: int) -> float:
    from orchestrator.driver import run_sweep
    from orchestrator.spec import parse_spec

    start = time.perf_counter()
    spec = parse_spec(SPEC.format(run=run, xs=", ".join(str(float(i)) for i in range(num_trials))))
    outcome = run_sweep(spec, results, show_progress=False)
    assert len(outcome.outcomes["noop"]) == num_trials and not outcome.failed
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    times: dict[str, list[float]] = {"bare": [], "bare_reuse": [], "rlgrad": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeats):
            times["bare"].append(run_bare(args.trials, os.path.join(tmp, "bare"), run))
            times["bare_reuse"].append(run_bare(args.trials, os.path.join(tmp, "bare"), run, reuse_actors=True))
            times["rlgrad"].append(run_rlgrad(args.trials, os.path.join(tmp, "rlgrad"), run))
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.trials} no-op trials, {args.repeats} runs each, {os.cpu_count()} cores, one CPU per trial")
    print(f"{'method':<48}{'median s':>10}{'min-max s':>14}{'per trial s':>13}")
    for key, label in (("bare", "bare Ray Tune function trainable (defaults)"),
                       ("bare_reuse", "bare Ray Tune function trainable, reuse_actors"),
                       ("rlgrad", "rlgrad sweep (noop, inline trials)")):
        v = times[key]
        print(f"{label:<48}{med[key]:>10.1f}{f'{min(v):.1f}-{max(v):.1f}':>14}{med[key] / args.trials:>13.3f}")
    print(f"ratio rlgrad / bare: {med['rlgrad'] / med['bare']:.2f}x; rlgrad / bare with reuse_actors: "
          f"{med['rlgrad'] / med['bare_reuse']:.2f}x   (driver peak RSS {peak_mb:.0f} MB)")


if __name__ == "__main__":
    main()
