"""The report section of controlled finetunes: modified ("small reward std")
vs unmodified inputs, per optimisation method.

controlled_section(metrics, trials) -> [plotly figures and HTML strings]:
  * an epochs-to-fit table: per trial, the first logged epoch at which the
    train accuracy of each group reaches FIT_THRESHOLD ("not reached"
    otherwise), with the groups' gradient norms at the start and the end;
  * per opt_method, one figure of training curves -- accuracy, reward and
    gradient norm (log axis) -- modified inputs dashed, unmodified solid.
Trials without a modified group (pretraining) are listed in a note only.
"""

from __future__ import annotations

import html
import json

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FIT_THRESHOLD = 0.99
GROUPS = ("modified", "unmodified")
GROUP_TITLES = {"modified": "modified (small reward std)", "unmodified": "unmodified"}
CURVES = [("accuracy", "train accuracy", False), ("reward", "expected reward", False), ("grad_norm", "gradient norm", True)]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _trial_info(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: stage, opt_method and a short label from the searched params."""
    rows = []
    for row in trials.itertuples():
        config = json.loads(row.config) if isinstance(row.config, str) and row.config else {}
        params = json.loads(row.params) if isinstance(row.params, str) and row.params else {}
        label = ", ".join(f"{k}={v}" for k, v in params.items() if k != "init_checkpoint") or row.trial
        # configs written before the option existed measured the exact full-batch gradient
        measurement = config.get("grad_norm_measurement", "full_batch_exact")
        rows.append({"trial": row.trial, "stage": row.stage, "opt_method": config.get("opt_method", "?"),
                     "label": f"{row.stage}: {label}", "grad_norm_measurement": measurement})
    return pd.DataFrame(rows, columns=["trial", "stage", "opt_method", "label", "grad_norm_measurement"]
                        ).drop_duplicates("trial")


GRAD_NORM_MEASUREMENTS = {
    "train_batches": "per training minibatch before its step, train mode, mean over the epoch (the reference's)",
    "full_batch_exact": "exact gradient of the whole group's mean objective after the epoch, eval mode",
}


def epochs_to_fit(curve: pd.DataFrame, threshold: float = FIT_THRESHOLD):
    """First step where the accuracy curve reaches `threshold`, or None."""
    reached = curve[curve["value"] >= threshold].sort_values("step")
    return int(reached["step"].iloc[0]) if len(reached) else None


def _value_at(series: pd.DataFrame, first: bool):
    if not len(series):
        return None
    ordered = series.sort_values("step")
    return float(ordered["value"].iloc[0 if first else -1])


def fit_table(metrics: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for row in info.itertuples():
        trial_metrics = metrics[metrics["trial"] == row.trial]
        out = {"stage": row.stage, "trial": row.trial, "opt_method": row.opt_method, "run": row.label,
               "grad norm measured": row.grad_norm_measurement}
        for group in GROUPS:
            group_metrics = trial_metrics[trial_metrics["split"] == group]
            accuracy = group_metrics[group_metrics["metric"] == "accuracy"]
            grad = group_metrics[group_metrics["metric"] == "grad_norm"]
            fitted = epochs_to_fit(accuracy)
            out[f"{group}: epochs to accuracy >= {FIT_THRESHOLD}"] = "not reached" if fitted is None else fitted
            out[f"{group}: final accuracy"] = _value_at(accuracy, first=False)
            out[f"{group}: grad norm at start"] = _value_at(grad, first=True)
            out[f"{group}: grad norm at end"] = _value_at(grad, first=False)
        rows.append(out)
    return pd.DataFrame(rows)


def _table_html(table: pd.DataFrame) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in table.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _curves_figure(metrics: pd.DataFrame, info: pd.DataFrame, opt_method: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=len(CURVES), subplot_titles=[title for _, title, _ in CURVES])
    for i, row in enumerate(info.itertuples()):
        colour = COLOURS[i % len(COLOURS)]
        trial_metrics = metrics[metrics["trial"] == row.trial]
        for col, (metric, _, _) in enumerate(CURVES, start=1):
            for group in GROUPS:
                curve = trial_metrics[(trial_metrics["split"] == group) & (trial_metrics["metric"] == metric)].sort_values("step")
                if not len(curve):
                    continue
                values = curve["value"].clip(lower=1e-12) if metric == "grad_norm" else curve["value"]
                fig.add_trace(go.Scatter(
                    x=curve["step"], y=values, mode="lines", name=f"{row.label} -- {GROUP_TITLES[group]}",
                    legendgroup=f"{row.trial}-{group}", showlegend=col == 1,
                    line={"color": colour, "dash": "dash" if group == "modified" else "solid"}), row=1, col=col)
    for col, (_, _, log_y) in enumerate(CURVES, start=1):
        fig.update_xaxes(title_text="epoch", row=1, col=col)
        if log_y:
            fig.update_yaxes(type="log", row=1, col=col)
    measured = "; ".join(f"{m}: {GRAD_NORM_MEASUREMENTS.get(m, m)}" for m in sorted(set(info["grad_norm_measurement"])))
    fig.update_layout(title=f"opt_method = {opt_method}: modified inputs dashed, unmodified solid<br>"
                            f"<sup>gradient norm measured {measured}</sup>")
    return fig


def controlled_section(metrics: pd.DataFrame, trials: pd.DataFrame) -> list:
    """Plotly figures and HTML strings for the controlled trials of a sweep."""
    if not len(trials) or not len(metrics):
        return ["<p>No controlled metrics yet.</p>"]
    info = _trial_info(trials)
    with_groups = set(metrics.loc[metrics["split"] == "modified", "trial"])
    finetunes = info[info["trial"].isin(with_groups)]
    others = info[~info["trial"].isin(with_groups)]
    items: list = []
    if len(others):
        items.append("<p class=\"note\">Without modified inputs (pretraining): "
                     + ", ".join(html.escape(label) for label in others["label"]) + ".</p>")
    if not len(finetunes):
        return items or ["<p>No finetune with modified labels yet.</p>"]
    items.append(f"<h3>Epochs until the train accuracy of each group reaches {FIT_THRESHOLD}</h3>"
                 + _table_html(fit_table(metrics, finetunes)))
    for opt_method, group in finetunes.groupby("opt_method", sort=True):
        items.append(_curves_figure(metrics, group, opt_method))
    return items
