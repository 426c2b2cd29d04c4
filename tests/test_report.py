"""report.html as a researcher drills into it: every plotted input carries its prompt,
reward statistics, gradient norm and samples; the per-input table lists every
input with its samples; a failed trial shows its cause. The page is read as a
browser reads it: the JSON blocks embedded in the HTML are decoded (and, where
Chromium is installed, the page is loaded and its drawn hovers and table read back).

The sweep is tiny and synthetic, written with the real table writers and
aggregated by aggregate_sweep, so the page is built from the same files a run writes."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from orchestrator import report_inputs
from orchestrator.aggregate import aggregate_sweep
from orchestrator.report import build_report
from orchestrator.trial_errors import error_cause
from workloads.core.config import REWARD_STD_THRESHOLDS
from workloads.core.storage import ResultsRoot

K = 6
# prompts a page must not choke on: markup, a script end tag, non-ASCII, a newline
PROMPTS = ["reverse: <b>abc</b> & co", "reverse: </script><script>alert(1)</script>", "reverse: héllo → wörld",
           "reverse: two\nlines"]


def _prompt(i: int) -> str:
    return PROMPTS[i] if i < len(PROMPTS) else f"reverse: input number {i}"


def _output(trial: str, step: int, i: int, k: int) -> str:
    return f'out<{trial}|s{step}|i{i}|k{k}>"&\''  # markup characters a browser must show as typed


def _write_trial(results, trial, rewards, steps=(0,), grad=True, parent=None):
    """rewards[step][input_id] = K rewards; returns what was written, keyed (step, input)."""
    writer = ResultsRoot(str(results)).trial_storage("s", "extract", trial, "hash-" + trial)
    samples, inputs, truth = [], [], {}
    for step in steps:
        for i, r in rewards[step].items():
            for k, value in enumerate(r):
                samples.append({"step": step, "input_id": i, "sample_idx": k, "prompt": _prompt(i),
                                "output": _output(trial, step, i, k), "reward": float(value), "num_tokens": 3,
                                "prompt_token_ids": [1, 2], "output_token_ids": [3, 4, 5], "model": "m", "dataset": "d"})
            g = float(2.0 * np.std(r) ** (2 / 3)) if grad else None
            inputs.append({"step": step, "input_id": i, "prompt": _prompt(i), "num_samples": len(r),
                           "reward_mean": float(np.mean(r)), "reward_std": float(np.std(r)),
                           "reward_std_unbiased": float(np.std(r, ddof=1)), "grad_norm": g, "model": "m", "dataset": "d"})
            truth[(step, i)] = {"rewards": [float(v) for v in r], "mean": float(np.mean(r)), "std": float(np.std(r)), "grad": g}
    writer.write("samples", "inputs-000000-000099", samples)
    writer.write("inputs", "inputs-000000-000099", inputs)
    writer.write("trials", "trial", [{"workload": "extract", "params": json.dumps({"name": trial}), "config": "{}",
                                      "parent_trial": parent, "status": "TERMINATED", "checkpoint": None,
                                      "metrics": json.dumps({"eval_reward_mean": 0.5})}])
    return truth


@pytest.fixture
def sweep(tmp_path):
    """Trial a: 12 inputs measured once; trial b: 8 inputs measured at steps 0 and 5 (as PPO's
    monitor does); trial c: failed. Every 3rd input of a has all-equal rewards (std 0)."""
    rng = np.random.default_rng(0)
    a = {0: {i: (np.full(K, 0.5) if i % 3 == 0 else rng.random(K).round(3)) for i in range(12)}}
    b = {s: {i: rng.random(K).round(3) for i in range(8)} for s in (0, 5)}
    truth = {"extract-a": _write_trial(tmp_path, "extract-a", a),
             "extract-b": _write_trial(tmp_path, "extract-b", b, steps=(0, 5))}
    ResultsRoot(str(tmp_path)).trial_storage("s", "extract", "extract-c", "hash-c").write("trials", "trial", [{
        "workload": "extract", "params": json.dumps({"name": "extract-c"}), "config": "{}", "parent_trial": None,
        "status": "ERROR", "checkpoint": None,
        # as a run before the cause was extracted recorded it: Ray's first line, in ANSI colours
        "metrics": json.dumps({"error": "\x1b[36mValueError: boom <bad> temperature\x1b[39m"})}])
    (tmp_path / "s" / "sweep.yaml").write_text("sweep: s\n")
    aggregate_sweep(str(tmp_path), "s")
    page = open(build_report(str(tmp_path), "s"), encoding="utf-8").read()
    return tmp_path, page, truth


def _script_json(page: str, pattern: str) -> list:
    """Every <script> body matching `pattern`, JSON-decoded as the page's script does (JSON.parse)."""
    return [json.loads(m) for m in re.findall(pattern, page, re.S)]


def _array(value) -> list:
    """A plotly array: a list, or (plotly >= 6) {"dtype", "bdata": base64}."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).tolist()
    return list(value)


def _input_traces(page: str):
    """(figure title, trace, x, y, customdata) for each trace whose points are inputs."""
    for fig in _script_json(page, r'<script type="application/json" class="rlgrad-figure"[^>]*>(.*?)</script>'):
        for trace in fig["data"]:
            if (trace.get("meta") or {}).get("rows"):
                yield fig["layout"]["title"]["text"], trace, _array(trace["x"]), _array(trace["y"]), _array(trace["customdata"])


def test_every_plotted_input_carries_its_prompt_stats_and_samples(sweep):
    _, page, truth = sweep
    [block] = _script_json(page, r'<script type="application/json" id="rlgrad-inputs">(.*?)</script>')
    rows, samples = block["rows"], block["samples"]
    assert block["thresholds"] == list(REWARD_STD_THRESHOLDS)
    assert len(rows["input"]) == 12 + 2 * 8  # one row per (trial, step, input)
    titles = set()
    points = 0
    for title, trace, xs, ys, cds in _input_traces(page):
        titles.add(title.split(",")[0].split(" (")[0])
        assert "%{text}" in trace["hovertemplate"]  # the hover shows the text built from the row
        for x, y, r in zip(xs, ys, cds):
            trial = block["trial_ids"][rows["trial"][r]]
            step, i = rows["step"][r], rows["input"][r]
            want = truth[trial][(step, i)]
            assert block["prompts"][rows["prompt"][r]] == _prompt(i)
            assert rows["mean"][r] == pytest.approx(want["mean"], rel=1e-5)
            assert rows["std"][r] == pytest.approx(want["std"], rel=1e-5, abs=1e-12)
            assert rows["grad"][r] == pytest.approx(want["grad"], rel=1e-5)
            got = range(samples["start"][r], samples["start"][r + 1])
            assert [samples["idx"][j] for j in got] == list(range(K))
            assert [samples["reward"][j] for j in got] == pytest.approx(want["rewards"])
            assert [block["outputs"][samples["output"][j]] for j in got] == [_output(trial, step, i, k) for k in range(K)]
            if title.startswith("Reward mean vs reward std"):  # the point is where its row says
                assert (x, y) == pytest.approx((want["std"], want["mean"]))
            elif title.startswith("Per-input gradient norm"):
                assert (x, y) == pytest.approx((want["std"], want["grad"]))
            points += 1
    assert titles == {"Reward mean vs reward std", "Per-input gradient norm vs reward std", "Reward gain per input vs its initial reward std"}
    # mean-vs-std: every row; grad-norm: rows with std > 0; gain: b's inputs at their first step
    nonzero = sum(1 for t in truth.values() for v in t.values() if v["std"] > 0)
    assert points == 28 + nonzero + 8
    # the strings are in the page once each, not once per plot
    assert len(block["prompts"]) == len(set(block["prompts"])) == 12
    assert page.count("input number 11") == 1
    # a prompt cannot break out of the page's script elements
    assert "</script><script>alert(1)" not in page and "\\u003c/script>" in page


def test_the_page_holds_fewer_samples_per_input_when_inputs_are_many(sweep, monkeypatch):
    results, _, truth = sweep
    assert report_inputs.samples_per_input(10_000, 8) == 8 and report_inputs.samples_per_input(1_000_000, 8) == 2
    monkeypatch.setattr(report_inputs, "SAMPLE_BUDGET", 60)  # 28 rows: 60 // 28 = 2 samples each
    page = open(build_report(str(results), "s"), encoding="utf-8").read()
    [block] = _script_json(page, r'<script type="application/json" id="rlgrad-inputs">(.*?)</script>')
    assert block["limits"]["samples_per_input"] == 2
    assert np.diff(block["samples"]["start"]).tolist() == [2] * 28
    assert set(block["rows"]["k"]) == {K}  # the table still says how many were drawn
    # long outputs: as many samples per input as fit the text budget, here exactly the first 3 of each
    keys = [(t, s, i) for t, by in truth.items() for s, i in by]
    monkeypatch.setattr(report_inputs, "SAMPLE_BUDGET", 10_000)
    monkeypatch.setattr(report_inputs, "OUTPUT_TEXT_BUDGET", sum(len(_output(*key, k)) for key in keys for k in range(3)))
    page = open(build_report(str(results), "s"), encoding="utf-8").read()
    [block] = _script_json(page, r'<script type="application/json" id="rlgrad-inputs">(.*?)</script>')
    assert block["limits"]["samples_per_input"] == 3
    assert np.diff(block["samples"]["start"]).tolist() == [3] * 28


def test_failed_trial_is_listed_with_its_cause(sweep):
    _, page, _ = sweep
    trials = page[page.index('<h2 id="trials">'):page.index("</table>")]
    head = re.findall(r"<th>(.*?)</th>", trials)
    rows = {r[1]: r for r in (re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r"<tr class[^>]*>(.*?)</tr>", trials))}
    assert set(rows) == {"extract-a", "extract-b", "extract-c"}
    failed = dict(zip(head, rows["extract-c"]))
    assert failed["status"] == "ERROR" and failed["cause"] == "ValueError: boom &lt;bad&gt; temperature"  # escaped, no ANSI
    assert '<tr class="status-ERROR">' in trials
    assert dict(zip(head, rows["extract-a"]))["cause"] == ""


def test_error_cause_is_the_last_exception_line_of_rays_text():
    # shaped like str(result.error) for a Train worker's failure (Ray 2.60), abridged
    text = ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=13282, ip=192.0.2.2, actor_id=5616, repr=_trial_fn)\n"
            '  File "/x/ray/train/v2/api/data_parallel_trainer.py", line 195, in fit\n    raise result.error\n'
            "ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
            "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=13282, ip=192.0.2.2)\n"
            '  File "/x/workloads/noop.py", line 36, in run_noop\n'
            "    raise ValueError(f'boom: x={config.x} is negative')\nValueError: boom: x=-1.0 is negative\n")
    assert error_cause(text) == "ValueError: boom: x=-1.0 is negative"
    assert error_cause(RuntimeError("no traceback here")) == "no traceback here"
    assert error_cause("first\nlast line\n") == "last line"
    assert len(error_cause("KeyError: " + "x" * 2000)) == 500


# ---- in a real browser


def _chromium():
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    return found


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
                  "--disable-dev-shm-usage"]

# appended to a copy of the page: once it is drawn, hover a point of the first plot, open the first
# table row, and write what the browser shows into <pre id="probe">
PROBE = """<script>
(function probe() {
  const root = document.documentElement;
  if (!root.hasAttribute("data-rendered-ms") && !root.hasAttribute("data-render-error")) return setTimeout(probe, 20);
  const out = {error: root.getAttribute("data-render-error")};
  const gd = document.querySelector("div.plot");
  // the mouse over the point's pixel, as a user's pointer would be
  const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
  Plotly.Fx.hover(gd, {xpx: xa.d2p(gd._fullData[0].x[HOVER_POINT]), ypx: ya.d2p(gd._fullData[0].y[HOVER_POINT])}, "xy");
  out.hoverLabel = Array.from(document.querySelectorAll(".hoverlayer .hovertext text.nums")).map(t => t.textContent);
  out.count = document.getElementById("inputs-count").textContent;
  out.rows = Array.from(document.querySelectorAll("#inputs tbody tr.row")).map(tr => Array.from(tr.cells).map(td => td.textContent));
  document.querySelector("#inputs tbody tr.row").click();
  out.detail = Array.from(document.querySelectorAll("#inputs tr.detail table.samples tr")).map(tr => Array.from(tr.cells).map(td => td.textContent));
  const bucket = document.getElementById("filter-bucket");
  bucket.value = "0"; bucket.dispatchEvent(new Event("change"));
  out.bucketStds = Array.from(document.querySelectorAll("#inputs tbody tr.row")).map(tr => tr.cells[5].textContent);
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def _probe(page_path: str, tmp_path, hover_point: int = 0) -> dict:
    probed = tmp_path / "probed.html"
    text = open(page_path, encoding="utf-8").read()
    probed.write_text(text.replace("</body>", PROBE.replace("HOVER_POINT", str(hover_point)) + "</body>"), encoding="utf-8")
    proc = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--timeout=60000",
                           "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    import html

    return json.loads(html.unescape(found.group(1)))


def test_in_chromium_the_hover_and_the_table_show_the_input(sweep):
    results, _, truth = sweep
    seen = _probe(os.path.join(results, "s", "report.html"), results, hover_point=1)
    assert seen["error"] is None
    # the pointer over the 2nd point of the first plot's first trace (trial a, step 0): its input's label
    label = "\n".join(seen["hoverLabel"])
    shown = re.search(r"input (\d+) · extract\(name=(extract-\w)\)", label)
    assert shown, label
    i, trial = int(shown.group(1)), shown.group(2)
    want = truth[trial][(0, i)]
    assert f"prompt: {_prompt(i)}" in label  # markup in a prompt is shown as text, not rendered
    numbers = re.search(r"reward mean ([\d.]+) · std ([\d.]+) · grad norm ([\d.e-]+)", label)
    mean, std, grad = (float(v) for v in numbers.groups())
    assert (mean, std) == pytest.approx((want["mean"], want["std"]), abs=1.1e-3)  # 3 decimals
    assert grad == pytest.approx(want["grad"], rel=6e-3)  # 3 significant digits
    assert f"samples (4 of {K}), reward: output" in label
    listed = re.findall(r"([\d.]+): (out<[^>]*>\S*)", label)
    assert [o for _, o in listed] == [_output(trial, 0, i, k) for k in range(4)]  # four in a hover; all K in the table
    assert [float(r) for r, _ in listed] == pytest.approx(want["rewards"][:4], abs=1.1e-3)
    # the table: 28 rows, sorted by reward std, the std-0 inputs first; a click opens all K samples
    assert seen["count"] == "1–28 of 28 inputs"
    stds = [float(r[5]) for r in seen["rows"]]
    assert stds == sorted(stds) and stds[0] == 0.0
    first = seen["rows"][0]
    trial = "extract-a" if "extract-a" in first[0] else "extract-b"
    step, i = int(first[1]), int(first[2])
    assert first[3] == _prompt(i).replace("\n", " ")
    detail = seen["detail"][1:]
    assert [(int(k), o) for k, _, o in detail] == [(k, _output(trial, step, i, k)) for k in range(K)]
    assert [float(r) for _, r, _ in detail] == pytest.approx(truth[trial][(step, i)]["rewards"], abs=1.1e-3)
    # the first reward-std bucket: [0, first threshold)
    assert seen["bucketStds"] and all(float(s) < REWARD_STD_THRESHOLDS[0] for s in seen["bucketStds"])
    assert len(seen["bucketStds"]) == sum(v["std"] < REWARD_STD_THRESHOLDS[0] for t in truth.values() for v in t.values())
