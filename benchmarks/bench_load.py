"""Load: a sweep of many tiny trials on the embedded cluster, with the driver's
resident memory sampled while it runs (bounded = it levels off instead of
growing with the number of trials).

    python benchmarks/bench_load.py                    # 240 noop trials, 4 at a time (0.5 CPU each)
    python benchmarks/bench_load.py --trials 500 --cpus-per-trial 0.25
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

SPEC = """
sweep: load
stages:
  - name: noop
    workload: noop
    config: {{num_reports: 3}}
    search: {{grid: {{x: [{xs}]}}}}
    scaling: {{num_workers: 0, cpus_per_worker: {cpus}}}
"""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=240)
    parser.add_argument("--cpus-per-trial", type=float, default=0.5)
    args = parser.parse_args()

    from orchestrator.aggregate import aggregate_sweep
    from orchestrator.driver import run_sweep
    from orchestrator.report import build_report
    from orchestrator.spec import parse_spec
    from workloads.core.storage import ResultsRoot

    samples: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - start, rss_mb()))
            time.sleep(1.0)

    threading.Thread(target=sample, daemon=True).start()
    spec = parse_spec(SPEC.format(xs=", ".join(str(float(i)) for i in range(args.trials)), cpus=args.cpus_per_trial))
    with tempfile.TemporaryDirectory() as results:
        outcome = run_sweep(spec, results, show_progress=False)
        sweep_s = time.perf_counter() - start
        aggregate_sweep(results, "load")
        build_report(results, "load")
        trials = ResultsRoot(results).read_table("load", "trials").num_rows
        metric_rows = ResultsRoot(results).read_table("load", "metrics").num_rows
    done.set()
    total_s = time.perf_counter() - start
    assert trials == args.trials and not outcome.failed, (trials, len(outcome.failed))
    peak = max(m for _, m in samples)
    quarter = [max((m for t, m in samples if t <= sweep_s * q / 4), default=float("nan")) for q in (1, 2, 3, 4)]
    print(f"\n{args.trials} noop trials, {args.cpus_per_trial} CPU each, {os.cpu_count()} cores: "
          f"sweep {sweep_s:.0f}s + aggregate/report {total_s - sweep_s:.0f}s; {trials} trials and {metric_rows} "
          f"metric rows recorded")
    print("driver RSS (MB) at 1/4, 1/2, 3/4 and the end of the sweep: "
          + ", ".join(f"{m:.0f}" for m in quarter) + f"; peak {peak:.0f}")


if __name__ == "__main__":
    main()
