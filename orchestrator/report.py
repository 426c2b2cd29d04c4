"""report.html: one self-contained page (plotly.js inlined) per sweep.

Sections, each skipped when the sweep has no data for it:
  1. per-stage summary table (every trial, its parameters, status, key numbers,
     and a failed trial's cause)
  2. reward mean vs reward std per input (the paper's Figure 1 view)
  3. reward std vs gradient norm, log-log, with a fitted c * std^(2/3) envelope
     (Theorem 1 bounds the expected gradient by C L gamma STD^(2/3); we fit c to
     the data as the smallest constant that bounds every point, per trial)
  4. distribution of reward std and the share of inputs under thresholds
  5. the per-input table: every input with its samples, sortable and filterable
  6. training curves from the metrics table
  7. controlled finetunes (modified vs unmodified inputs), when present
Hovering a point of the per-input plots shows that input's prompt, reward mean
and std, gradient norm and first samples; clicking it opens it in the table
(report_page.py draws both from the block report_inputs.py builds).
"""

from __future__ import annotations

import html
import json
import os

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from plotly.offline import get_plotlyjs

from workloads.core.config import REWARD_STD_THRESHOLDS
from workloads.core.storage import ResultsRoot

from .report_inputs import inputs_payload, load_samples, samples_per_input, within_text_budget
from .report_page import INPUTS_SECTION, figure_block, page_html
from .trial_errors import strip_ansi

# plotly marks the traces whose points are inputs (customdata = row of the per-input block)
INPUT_POINTS = {"rows": True}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def load_sweep_frames(results: str, sweep: str) -> dict[str, pd.DataFrame]:
    """The sweep's tables as DataFrames (empty frames where a table has no rows)."""
    root = ResultsRoot(results)
    frames: dict[str, pd.DataFrame] = {}
    for name in ("inputs", "trials", "metrics"):
        dataset = root.table_dataset(sweep, name)
        frames[name] = dataset.to_table().to_pandas() if dataset is not None else pd.DataFrame()
    return frames


def trial_labels(trials: pd.DataFrame) -> dict[str, str]:
    """A readable name per trial: its stage and searched params, after its parent's."""
    rows = {r["trial"]: r for r in trials.to_dict("records")}
    labels: dict[str, str] = {}

    def label(trial_id: str) -> str:
        if trial_id in labels:
            return labels[trial_id]
        row = rows.get(trial_id)
        if row is None:
            return trial_id
        params = json.loads(row["params"] or "{}")
        own = row["stage"] + ("(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")
        parent = row.get("parent_trial")
        labels[trial_id] = (label(parent) + " → " if isinstance(parent, str) and parent else "") + own
        return labels[trial_id]

    for trial_id in rows:
        label(trial_id)
    return labels


def fit_envelope(reward_std: np.ndarray, grad_norm: np.ndarray) -> float | None:
    """Smallest c with grad_norm <= c * reward_std^(2/3) for every input with std > 0."""
    mask = (reward_std > 0) & np.isfinite(grad_norm)
    if not mask.any():
        return None
    return float(np.max(grad_norm[mask] / reward_std[mask] ** (2.0 / 3.0)))


def summary_table(inputs: pd.DataFrame, trials: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    rows = []
    for t in trials.sort_values(["stage", "trial"]).to_dict("records"):
        metrics = json.loads(t["metrics"] or "{}")
        row = {"stage": t["stage"], "trial": t["trial"], "what": labels.get(t["trial"], t["trial"]),
               "status": t["status"]}
        sub = inputs[inputs["trial"] == t["trial"]] if len(inputs) else inputs
        if len(sub):
            sub = sub[sub["step"] == sub["step"].max()]  # the model as the trial left it
            row.update({
                "inputs": len(sub),
                "at step": int(sub["step"].iloc[0]),
                "reward mean": sub["reward_mean"].mean(),
                "reward std (mean)": sub["reward_std"].mean(),
                "reward std (median)": sub["reward_std"].median(),
                "share std<0.05": (sub["reward_std"] < 0.05).mean(),
                "grad norm (mean)": sub["grad_norm"].mean(),
            })
        for key in ("loss", "eval_reward_mean", "train/accuracy", "test/accuracy", "modified/accuracy", "kl"):
            if isinstance(metrics.get(key), (int, float)):
                row[key] = metrics[key]
        if metrics.get("error"):
            row["cause"] = strip_ansi(str(metrics["error"]))
        rows.append(row)
    return pd.DataFrame(rows)


MITIGATIONS_SQL = os.path.join(os.path.dirname(__file__), "queries", "grpo_mitigations.sql")
MITIGATION_COLUMNS = {  # the query's columns, as the report heads them
    "trial": "trial", "prompts": "prompts", "std0_at_start": "std 0 at start",
    "max_grad_std0": "their max grad norm", "min_grad_std_pos": "min grad norm, std > 0",
    "train_zero_std_share": "zero-std share, training", "rollouts": "completions sampled",
    "refills": "refilled", "saved": "saved by skipping", "precision": "prediction precision",
    "recall": "prediction recall", "reward_start": "reward start", "reward_end": "reward end",
    "std0_reward_start": "std-0 prompts: reward start", "std0_reward_end": "std-0 prompts: reward end",
    "std0_at_end": "std 0 at end"}


def mitigations_section(results: str, sweep: str, labels: dict[str, str]) -> str:
    """The GRPO trials side by side (orchestrator/queries/grpo_mitigations.sql): how many
    prompts start at reward std 0, that their gradient norm is 0, and what each condition
    did to the zero-std share and to the reward of the prompts that started at std 0."""
    from .query import run_query

    with open(MITIGATIONS_SQL, encoding="utf-8") as f:
        table = run_query(results, f.read(), [sweep]).to_pandas()
    table["trial"] = [labels.get(t, t) for t in table["trial"]]
    table = table.drop(columns=["stage", "params"]).rename(columns=MITIGATION_COLUMNS)  # the label names both
    return ('<h2 id="zero-std">Zero-std prompts and the mitigations (GRPO trials)</h2><p>Per trial, on its prompt '
            "pool: prompts whose K rewards were all equal before training and the largest gradient norm measured "
            "for them (0 means exactly zero), the share of zero-std groups among the prompts sampled for "
            "training, completions sampled for training (dropped groups included) / refilled by dynamic sampling / saved by skipping prompts "
            "predicted zero-std, and the mean reward before and after training, over all prompts and over "
            "those that started at std 0.</p>" + _table_html(table))


def _table_html(df: pd.DataFrame) -> str:
    """A plain table; a `status` column classes its row (status-ERROR is shaded) and
    a `cause` column (a failed trial's error) is set apart."""
    def fmt(v):
        if isinstance(v, float):  # a count in a column with gaps is a float: 10000.0 reads 10000, not 1e+04
            return "" if np.isnan(v) else f"{v:.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    cells = ['<td class="cause">{}</td>' if c == "cause" else "<td>{}</td>" for c in df.columns]
    status = list(df.columns).index("status") if "status" in df.columns else None
    body = "".join(
        (f'<tr class="status-{html.escape(str(row[status]))}">' if status is not None else "<tr>")
        + "".join(cell.format(fmt(v)) for cell, v in zip(cells, row)) + "</tr>"
        for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _improvement_figure(inputs: pd.DataFrame, labels: dict[str, str]):
    """Per-input reward change from a trial's first to its last measured step,
    against the reward std at the first step (PPO's monitor set): the paper's
    evidence that RFT barely moves inputs whose initial reward std is small."""
    fig = go.Figure()
    rows = []
    for t, sub in inputs.groupby("trial", sort=False):
        steps = sorted(sub["step"].unique())
        if len(steps) < 2:
            continue
        first = sub[sub["step"] == steps[0]].set_index("input_id")
        last = sub[sub["step"] == steps[-1]].set_index("input_id")
        both = first.merge(last, left_index=True, right_index=True, suffixes=("_first", "_last"))
        gain = both["reward_mean_last"] - both["reward_mean_first"]
        fig.add_trace(go.Scattergl(x=both["reward_std_first"], y=gain, mode="markers", marker={"size": 6, "opacity": 0.7},
                                   name=f"{labels.get(t, t)}: step {steps[0]} → {steps[-1]}",
                                   customdata=both["row_first"].tolist(), meta=INPUT_POINTS,
                                   hovertemplate="initial std %{x:.3f} · gain %{y:+.3f}<br>at step "
                                                 f"{steps[0]}: %{{text}}<extra></extra>"))
        for lo, hi in ((0, 0.05), (0.05, float("inf"))):
            group = (both["reward_std_first"] >= lo) & (both["reward_std_first"] < hi)
            rows.append({"trial": labels.get(t, t), "initial reward std": f"[{lo}, {hi})", "inputs": int(group.sum()),
                         "reward before": both["reward_mean_first"][group].mean(),
                         "reward after": both["reward_mean_last"][group].mean(), "gain": gain[group].mean()})
    if not rows:
        return None
    fig.add_hline(y=0, line={"color": "#999", "width": 1})
    fig.update_layout(title="Reward gain per input vs its initial reward std (first → last measured step)",
                      xaxis_title="initial reward std", yaxis_title="reward mean after − before")
    return ("improvement-vs-initial-std", fig,
            "Mean gain by initial reward std (small std: under 0.05):" + _table_html(pd.DataFrame(rows)))


def trajectory_figures(inputs: pd.DataFrame, labels: dict[str, str]) -> list:
    """Per-prompt trajectories of trials measured at 3 or more steps (GRPO records every
    rollout): one line per prompt, reward mean against step, red where the prompt started
    at reward std 0 (zero advantage, gradient exactly 0), blue otherwise; a prompt's line
    joins the steps at which it was sampled."""
    figs = []
    for t, sub in inputs.groupby("trial", sort=False):
        steps = sorted(sub["step"].unique())
        if len(steps) < 3:
            continue
        initial = sub[sub["step"] == steps[0]].set_index("input_id")["reward_std"]
        fig = go.Figure()
        for zero, colour, name in ((True, "#d62728", "initial std 0"), (False, "#1f77b4", "initial std > 0")):
            for n, (input_id, g) in enumerate(sub[sub["input_id"].map(initial).eq(0) == zero].groupby("input_id")):
                g = g.sort_values("step")
                fig.add_trace(go.Scatter(x=g["step"], y=g["reward_mean"], mode="lines+markers", marker={"size": 4},
                                         line={"color": colour, "width": 1}, opacity=0.5, legendgroup=name,
                                         name=name, showlegend=n == 0, text=g["prompt"],
                                         hovertemplate=f"input {input_id}<br>step %{{x}}<br>reward %{{y:.3f}}"
                                                       "<br>%{text}<extra></extra>"))
        fig.update_layout(title=f"Per-prompt reward trajectories: {labels.get(t, t)}", xaxis_title="step",
                          yaxis_title="reward mean over the K samples")
        zero_count = int((initial == 0).sum())
        figs.append((f"trajectories-{t}", fig, f"{zero_count} of {len(initial)} prompts started at reward std 0."))
    return figs


def _extract_figures(inputs: pd.DataFrame, labels: dict[str, str]) -> list:
    figs: list = []
    # a trial measured at many steps (GRPO at every rollout, PPO's monitor set) is drawn at
    # its first and last step; the steps between are in the per-prompt trajectory figures
    steps = inputs.groupby("trial")["step"]
    inputs = inputs[(inputs["step"] == steps.transform("min")) | (inputs["step"] == steps.transform("max"))]
    # ... as one trace per step
    if inputs.groupby("trial")["step"].nunique().max() > 1:
        inputs = inputs.assign(trial=inputs["trial"] + "@" + inputs["step"].astype(str))
        labels = {**labels, **{f"{t}@{s}": f"{labels.get(t, t)} @ step {s}"
                               for t, s in inputs["trial"].str.rsplit("@", n=1).map(tuple).unique()}}
    trials = list(dict.fromkeys(inputs["trial"]))

    fig = go.Figure()
    for i, t in enumerate(trials):
        sub = inputs[inputs["trial"] == t]
        fig.add_trace(go.Scattergl(x=sub["reward_std"], y=sub["reward_mean"], mode="markers", name=labels.get(t, t),
                                   marker={"size": 5, "opacity": 0.6, "color": PALETTE[i % len(PALETTE)]},
                                   customdata=sub["row"].tolist(), meta=INPUT_POINTS,
                                   hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(title="Reward mean vs reward std, one point per input (paper Fig. 1 view)",
                      xaxis_title="reward std under the model (1/K)", yaxis_title="reward mean")
    figs.append(("reward-mean-vs-std", fig, "Inputs near std = 0 get almost no expected gradient from RFT, whatever their mean reward."))

    has_grad = inputs["grad_norm"].notna().any()
    if has_grad:
        fig = go.Figure()
        notes = []
        for i, t in enumerate(trials):
            sub = inputs[(inputs["trial"] == t) & inputs["grad_norm"].notna()]
            pos = sub[(sub["reward_std"] > 0) & (sub["grad_norm"] > 0)]
            zero = int((sub["reward_std"] == 0).sum())
            group, colour = f"g{i}", PALETTE[i % len(PALETTE)]
            fig.add_trace(go.Scattergl(x=pos["reward_std"], y=pos["grad_norm"], mode="markers", name=labels.get(t, t),
                                       legendgroup=group, marker={"size": 5, "opacity": 0.6, "color": colour},
                                       customdata=pos["row"].tolist(), meta=INPUT_POINTS,
                                       hovertemplate="%{text}<extra></extra>"))
            c = fit_envelope(sub["reward_std"].to_numpy(), sub["grad_norm"].to_numpy())
            if c is not None and len(pos):
                xs = np.logspace(np.log10(pos["reward_std"].min()), np.log10(pos["reward_std"].max()), 50)
                fig.add_trace(go.Scatter(x=xs, y=c * xs ** (2 / 3), mode="lines", line={"dash": "dash", "color": colour},
                                         name=f"{c:.3g}·std^(2/3)", legendgroup=group, showlegend=True))
            notes.append(f"{labels.get(t, t)}: {zero} of {len(sub)} inputs have reward std 0 (gradient exactly 0, not drawn)")
        fig.update_layout(title="Per-input gradient norm vs reward std (log-log) with fitted c·std^(2/3) envelope",
                          xaxis_title="reward std", yaxis_title="‖policy-gradient estimate‖ (leave-one-out baseline)",
                          xaxis_type="log", yaxis_type="log")
        figs.append(("grad-norm-vs-std", fig, "<br>".join(html.escape(n) for n in notes)))

    fig = go.Figure()
    for i, t in enumerate(trials):
        sub = inputs[inputs["trial"] == t]
        fig.add_trace(go.Histogram(x=sub["reward_std"], name=labels.get(t, t), opacity=0.6, nbinsx=40,
                                   marker={"color": PALETTE[i % len(PALETTE)]}))
    fig.update_layout(barmode="overlay", title="Distribution of per-input reward std",
                      xaxis_title="reward std", yaxis_title="inputs")
    shares = pd.DataFrame([
        {"trial": labels.get(t, t), **{f"std < {th}": float((inputs[inputs['trial'] == t]["reward_std"] < th).mean())
                                      for th in REWARD_STD_THRESHOLDS}}
        for t in trials
    ])
    figs.append(("reward-std-distribution", fig, "Share of inputs under each reward-std threshold:" + _table_html(shares)))
    return figs


def _curve_figures(metrics: pd.DataFrame, labels: dict[str, str]) -> list:
    figs = []
    for metric in sorted(metrics["metric"].unique()):
        sub = metrics[metrics["metric"] == metric]
        if sub.groupby(["trial", "split"])["step"].nunique().max() < 2:
            continue  # logged once per trial (a final evaluation): it is in the trials table
        fig = go.Figure()
        for (trial, split), g in sub.groupby(["trial", "split"]):
            g = g.sort_values("step")
            fig.add_trace(go.Scatter(x=g["step"], y=g["value"], mode="lines+markers", marker={"size": 3},
                                     name=f"{labels.get(trial, trial)} [{split}]"))
        fig.update_layout(title=f"{metric} during training", xaxis_title="step", yaxis_title=metric)
        figs.append((f"curve-{metric}", fig, ""))
    return figs


def _input_rows(inputs: pd.DataFrame) -> pd.DataFrame:
    """The inputs in the page's order (trial, step, input), each numbered by `row`."""
    inputs = inputs.sort_values(["trial", "step", "input_id"], kind="stable").reset_index(drop=True)
    return inputs.assign(row=np.arange(len(inputs)))


def _inputs_block(results: str, sweep: str, inputs: pd.DataFrame, labels: dict[str, str]) -> dict:
    per_input = samples_per_input(len(inputs), int(inputs["num_samples"].max()))
    samples = load_samples(results, sweep, per_input)
    fits = within_text_budget(samples, per_input)
    if fits < per_input:  # long outputs: fewer of each input's samples
        samples, per_input = samples[samples["sample_idx"] < fits], fits
    return inputs_payload(inputs, samples, list(dict.fromkeys(inputs["trial"])), labels, per_input)


INTRO = """<p>Reward std is the population (1/K) std of the K sampled rewards per input; gradient norm is the norm of the
leave-one-out-baseline policy-gradient estimate over all trainable parameters.{drill} The tables behind every plot are in
<code>inputs.parquet</code>, <code>samples/</code>, <code>metrics/</code> and <code>trials/</code> beside this file
(query them with <code>rlgrad query</code>).</p>"""
DRILL = """ Hover a point to see its input's prompt and samples; click it to open the input in the
<a href="#inputs">per-input table</a>."""


def build_report(results: str, sweep: str) -> str:
    """Write <results>/<sweep>/report.html and return its path/URI."""
    frames = load_sweep_frames(results, sweep)
    inputs, trials, metrics = frames["inputs"], frames["trials"], frames["metrics"]
    labels = trial_labels(trials) if len(trials) else {}

    # blocks in page order: an HTML string, or (anchor, plotly figure, note)
    blocks: list = []
    if len(trials):
        blocks.append('<h2 id="trials">Trials</h2>' + _table_html(summary_table(inputs, trials, labels)))
    if len(trials) and len(inputs) and (trials["workload"] == "grpo").any():
        blocks.append(mitigations_section(results, sweep, labels))
    block = None
    if len(inputs):
        inputs = _input_rows(inputs)
        block = _inputs_block(results, sweep, inputs, labels)
        blocks.append("<h2>Per-input reward std and gradient norm</h2>")
        blocks += _extract_figures(inputs, labels)
        improvement = _improvement_figure(inputs, labels)
        if improvement is not None:
            blocks.append("<h2>Which inputs did finetuning improve?</h2>")
            blocks.append(improvement)
        trajectories = trajectory_figures(inputs, labels)
        if trajectories:
            blocks.append("<h2>Per-prompt trajectories</h2>")
            blocks += trajectories
        blocks.append(INPUTS_SECTION)
    controlled_trials = set(trials[trials["workload"] == "controlled"]["trial"]) if len(trials) else set()
    curves = metrics[~metrics["trial"].isin(controlled_trials)] if len(metrics) else metrics
    curve_figures = _curve_figures(curves, labels) if len(curves) else []
    if curve_figures:  # metrics logged once per trial are in the trials table, not curves
        blocks.append("<h2>Training curves</h2>")
        blocks += curve_figures
    if controlled_trials:
        from .controlled_report import controlled_section

        blocks.append("<h2>Controlled finetunes: modified (small reward std) vs unmodified inputs</h2>")
        for item in controlled_section(metrics[metrics["trial"].isin(controlled_trials)],
                                       trials[trials["trial"].isin(controlled_trials)]):
            blocks.append(item if isinstance(item, str) else ("controlled", item, ""))
    if not len(inputs) and not len(metrics):
        blocks.append("<p>This sweep has written no samples or metrics yet.</p>")

    body = []
    figures = 0
    for item in blocks:
        if isinstance(item, str):
            body.append(item)
            continue
        anchor, fig, note = item
        fig.update_layout(height=520, template="plotly_white", legend={"font": {"size": 10}})
        body.append(figure_block(anchor, fig, note, figures))
        figures += 1

    nav = ('<nav><a href="#trials">trials</a><a href="#reward-mean-vs-std">plots</a><a href="#inputs">inputs</a></nav>'
           if block is not None else "")
    intro = f"<h1>rlgrad sweep <code>{html.escape(sweep)}</code></h1>{nav}" + INTRO.format(drill=DRILL if block else "")
    page = page_html(f"rlgrad: {sweep}", intro, "".join(body), block, get_plotlyjs() if figures else None)
    root = ResultsRoot(results)
    root.write_text(sweep, "report.html", text=page)
    return root.uri(sweep, "report.html")
