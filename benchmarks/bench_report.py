"""report.html for a big trial: its size, how long it takes to build, and how long
headless Chromium takes to load and draw it.

Writes a synthetic sweep with the real writers (ResultsRoot.trial_storage -> samples, inputs and
trials shards; aggregate_sweep -> inputs.parquet): one extraction trial of
--inputs inputs x --k samples (default 10,000 x 8) plus a failed trial, then
builds the report and opens it in headless Chromium, --repeats times. A probe
appended to a copy of the page records, in <html data-probe-ms>, the
milliseconds from navigation start until every plot is drawn and the per-input
table's rows are rendered; Chromium's --dump-dom prints the DOM after the load
event, from which we read it. --baseline-tree DIR also builds the report with
another checkout (its own orchestrator) for the same sweep and times both pages,
interleaved.

    python benchmarks/bench_report.py [--inputs 10000] [--k 8] [--prompt-chars 40] [--output-chars 24]
                                      [--repeats 3] [--baseline-tree /work/main] [--screenshot out.png]

--screenshot out.png writes out-page.png, out-hover.png (a point hovered) and out-click.png
(a point clicked: its input open in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.aggregate import aggregate_sweep  # noqa: E402
from orchestrator.report import build_report  # noqa: E402
from workloads.core.storage import ResultsRoot  # noqa: E402

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz "))
SHARD = 256


def _text(rng, mean_chars: int) -> str:
    n = max(1, int(rng.integers(mean_chars // 2, mean_chars * 3 // 2 + 1)))
    return "".join(rng.choice(LETTERS, n))


def write_sweep(results: str, sweep: str, num_inputs: int, k: int, prompt_chars: int, output_chars: int,
                seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = ResultsRoot(results).trial_storage(sweep, "extract", "extract-bench", "hash-bench")
    # per input: a success probability drawn so that reward stds cover 0 .. 0.5
    p_success = rng.beta(0.4, 0.4, num_inputs)
    for lo in range(0, num_inputs, SHARD):
        hi = min(num_inputs, lo + SHARD)
        samples, inputs = [], []
        for i in range(lo, hi):
            prompt = "reverse: " + _text(rng, prompt_chars)
            prompt_ids = rng.integers(0, 53, len(prompt)).astype(int).tolist()
            rewards = np.where(rng.random(k) < p_success[i], 1.0, rng.random(k) * 0.5).round(4)
            for j, r in enumerate(rewards):
                output = _text(rng, output_chars)
                samples.append({"step": 0, "input_id": i, "sample_idx": j, "prompt": prompt, "output": output,
                                "reward": float(r), "reward_components": {"char_accuracy": float(r)},
                                "log_prob": float(-rng.random() * 30), "num_tokens": len(output) + 1,
                                "prompt_token_ids": prompt_ids,
                                "output_token_ids": rng.integers(0, 53, len(output) + 1).astype(int).tolist(),
                                "model": "builtin:tiny-gpt2", "dataset": "builtin:reverse"})
            std = float(np.std(rewards))
            inputs.append({"step": 0, "input_id": i, "prompt": prompt, "num_samples": k,
                           "reward_mean": float(np.mean(rewards)), "reward_std": std,
                           "reward_std_unbiased": float(np.std(rewards, ddof=1)),
                           "grad_norm": float(3.0 * std ** (2 / 3) * rng.random()), "model": "builtin:tiny-gpt2",
                           "dataset": "builtin:reverse"})
        shard = f"inputs-{lo:06d}-{hi - 1:06d}"
        writer.write("samples", shard, samples)
        writer.write("inputs", shard, inputs)
    writer.write("trials", "trial", [{"workload": "extract", "params": json.dumps({"temperature": 1.0}),
                                      "config": "{}", "parent_trial": None, "status": "TERMINATED",
                                      "checkpoint": None, "metrics": json.dumps({"eval_reward_mean": 0.5})}])
    failed = ResultsRoot(results).trial_storage(sweep, "extract", "extract-failed", "hash-failed")
    failed.write("trials", "trial", [{"workload": "extract", "params": json.dumps({"temperature": 2.0}),
                                      "config": "{}", "parent_trial": None, "status": "ERROR", "checkpoint": None,
                                      "metrics": json.dumps({"error": "ValueError: boom: temperature=2.0 diverged"})}])


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install -y chromium")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu-sandbox", "--enable-unsafe-swiftshader",
                  "--use-angle=swiftshader", "--disable-dev-shm-usage", "--hide-scrollbars"]


# appended to a copy of the page: the milliseconds from navigation start until every plotly figure
# is drawn (and, on a page with the per-input table, its rows are rendered), in <html data-probe-ms>.
# The same probe times pages built by another tree (--baseline-tree), which do not time themselves.
PROBE = """<script>(function probe() {
  const plots = Array.from(document.querySelectorAll("div.js-plotly-plot, div.plotly-graph-div"));
  const table = document.getElementById("inputs");
  if (!plots.length || plots.some(d => !d._fullLayout) || (table && !table.querySelector("tbody tr"))) return setTimeout(probe, 10);
  document.documentElement.setAttribute("data-probe-ms", performance.now().toFixed(0));
})();</script>"""


def load_page(path: str, profile: str, timeout_ms: int = 120_000) -> tuple[float | None, float]:
    """(ms from navigation start until drawn, wall seconds of the whole Chromium run, start-up included)."""
    probed = path + ".probe.html"
    with open(path, encoding="utf-8") as f, open(probed, "w", encoding="utf-8") as out:
        out.write(f.read().replace("</body>", PROBE + "</body>"))
    start = time.perf_counter()
    proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--timeout={timeout_ms}",
                           "--dump-dom", "file://" + os.path.abspath(probed)],
                          capture_output=True, text=True, timeout=timeout_ms / 1000 + 60)
    wall = time.perf_counter() - start
    os.remove(probed)
    drawn = re.search(r'data-probe-ms="(\d+)"', proc.stdout[:3000])
    return (float(drawn.group(1)) if drawn else None, wall)


def baseline_report(tree: str, results: str, sweep: str) -> str:
    """The report another checkout (e.g. /work/main) builds for the same sweep, as report-baseline.html."""
    ours = os.path.join(results, sweep, "report.html")
    kept = ours + ".ours"
    os.replace(ours, kept)
    code = "import sys; from orchestrator.report import build_report; build_report(sys.argv[1], sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, results, sweep], cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                   check=True, capture_output=True, text=True)
    baseline = os.path.join(results, sweep, "report-baseline.html")
    os.replace(ours, baseline)
    os.replace(kept, ours)
    return baseline


# appended to a copy of the page for the screenshots: once drawn, the pointer over a point of the
# first plot (its hover label), or a click on that point (the table opens its input)
SHOW = """<script>
(function show() {
  const root = document.documentElement;
  if (!root.hasAttribute("data-rendered-ms")) return setTimeout(show, 20);
  const gd = document.querySelector("div.plot"), t = gd._fullData[0], n = POINT;
  if (ACTION === "none") return;
  if (ACTION === "hover") {
    Plotly.Fx.hover(gd, {xpx: gd._fullLayout.xaxis.d2p(t.x[n]), ypx: gd._fullLayout.yaxis.d2p(t.y[n])}, "xy");
  } else {
    gd.emit("plotly_click", {points: [{data: gd.data[0], customdata: gd.data[0].customdata[n]}]});
    const tr = document.querySelector("#inputs tr.focus");  // where the screenshot is cropped
    root.setAttribute("data-focus-top", String(Math.round(tr.getBoundingClientRect().top + window.scrollY)));
  }
})();
</script>"""


def screenshot(path: str, png: str, profile: str, action: str = "hover", point: int = 0, size: str = "1400,1000") -> None:
    """A PNG of the page with the pointer over point `point` of the first plot (action "hover"),
    or after a click on it (action "click": the table scrolled to that input, its samples open).
    Headless Chromium paints only the top of a scrolled page, so a click is shot in a window as
    tall as the page and cropped around the input's row."""
    shown = os.path.join(os.path.dirname(os.path.abspath(png)), "shown.html")
    text = open(path, encoding="utf-8").read()
    with open(shown, "w", encoding="utf-8") as f:
        f.write(text.replace("</body>", SHOW.replace("ACTION", json.dumps(action)).replace("POINT", str(point)) + "</body>"))
    common = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000"]
    top = None
    if action == "click":
        dom = subprocess.run([*common, "--window-size=1400,1000", "--dump-dom", "file://" + shown],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        top = int(re.search(r'data-focus-top="(\d+)"', dom[:3000]).group(1))
        size = f"1400,{top + 800}"
    subprocess.run([*common, f"--window-size={size}", f"--screenshot={os.path.abspath(png)}", "file://" + shown],
                   capture_output=True, text=True, timeout=300, check=True)
    os.remove(shown)
    if top is not None:
        from PIL import Image

        with Image.open(png) as image:
            image.crop((0, max(0, top - 250), image.width, top + 750)).save(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--prompt-chars", type=int, default=40, help="mean prompt length (uniform in 0.5x..1.5x)")
    parser.add_argument("--output-chars", type=int, default=24, help="mean output length")
    parser.add_argument("--repeats", type=int, default=3, help="Chromium loads of the page")
    parser.add_argument("--baseline-tree", help="also build the report with this checkout (e.g. /work/main) and time both")
    parser.add_argument("--keep", help="write the sweep here (default: a temporary directory, removed)")
    parser.add_argument("--screenshot", help="also save a PNG of the page here")
    args = parser.parse_args()

    results = args.keep or tempfile.mkdtemp(prefix="bench_report_")
    profile = tempfile.mkdtemp(prefix="bench_report_chromium_")
    try:
        t0 = time.perf_counter()
        write_sweep(results, "bench", args.inputs, args.k, args.prompt_chars, args.output_chars)
        t1 = time.perf_counter()
        aggregate_sweep(results, "bench")
        t2 = time.perf_counter()
        page = build_report(results, "bench")
        t3 = time.perf_counter()
        text = open(page, encoding="utf-8").read()
        block = re.search(r'<script type="application/json" id="rlgrad-inputs">(.*?)</script>', text, re.S)
        plotly_js = re.search(r"<script>(/\*\*\n\* plotly\.js.*?)</script>", text, re.S)
        print(f"sweep: 1 trial, {args.inputs} inputs x K={args.k}, prompts ~{args.prompt_chars} chars, "
              f"outputs ~{args.output_chars} chars (+ 1 failed trial)")
        print(f"write shards {t1 - t0:.1f} s, aggregate {t2 - t1:.1f} s, build_report {t3 - t2:.1f} s")
        print(f"report.html: {os.path.getsize(page) / 2**20:.2f} MiB"
              f" (per-input block {len(block.group(1).encode()) / 2**20:.2f} MiB,"
              f" plotly.js {len(plotly_js.group(1).encode()) / 2**20 if plotly_js else float('nan'):.2f} MiB)")
        samples_held = json.loads(block.group(1))["limits"]["samples_per_input"]
        print(f"samples per input held in the page: {samples_held}")
        pages = {"this tree": page}
        if args.baseline_tree:
            pages[args.baseline_tree] = baseline_report(args.baseline_tree, results, "bench")
            print(f"baseline report ({args.baseline_tree}): {os.path.getsize(pages[args.baseline_tree]) / 2**20:.2f} MiB")
        times: dict[str, list[float]] = {name: [] for name in pages}
        for i in range(args.repeats):  # interleaved: the machine is shared
            for name, path in pages.items():
                drawn, wall = load_page(path, profile)
                times[name].append(drawn if drawn is not None else float("nan"))
                print(f"load {i + 1} [{name}]: drawn {drawn} ms after navigation start (chromium run {wall:.1f} s)")
        for name, values in times.items():
            print(f"[{name}] drawn: median {np.median(values):.0f} ms, min-max {min(values):.0f}-{max(values):.0f} ms")
        if args.screenshot:
            full = args.screenshot.removesuffix(".png")
            screenshot(page, f"{full}-page.png", profile, action="none", size="1400,2400")
            screenshot(page, f"{full}-hover.png", profile, action="hover", point=args.inputs // 3, size="1400,1150")
            screenshot(page, f"{full}-click.png", profile, action="click", point=args.inputs // 3)
            print(f"screenshots: {full}-page.png (the page's top), -hover.png (a hover), -click.png (a point clicked)")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(results, ignore_errors=True)


if __name__ == "__main__":
    main()
