"""The report's per-input data: one compact JSON block that the scatter plots'
hover labels and the per-input table both read (orchestrator/report_page.py
draws them in the browser).

Layout of the block (columns, not records, and every string once):

    trials   [label of trial 0, ...]          rows.trial indexes it
    prompts  [distinct prompt texts]          rows.prompt indexes it
    outputs  [distinct output texts]          samples.output indexes it
    rows     {trial, trial_id?, step, input, prompt, k, mean, std, grad}: one entry per
             (trial, step, input) of the inputs table; a plot's point carries its
             row number as customdata
    samples  {start, idx, reward, output}: row r's samples are
             start[r] .. start[r+1]-1, in sample_idx order
    thresholds  REWARD_STD_THRESHOLDS: the edges of the table's std buckets
    limits   the caps below, and how many samples per input the page holds

Sizes are capped so that a sweep of 10,000 inputs x K = 8 per trial stays a
page a browser opens in seconds (benchmarks/RESULTS.md): prompts and outputs
are cut to PROMPT_CHARS / OUTPUT_CHARS, and each input keeps its first
min(K, SAMPLE_BUDGET // inputs) samples, fewer if their outputs would exceed
OUTPUT_TEXT_BUDGET characters, never fewer than MIN_SAMPLES. The full texts and
every sample are in the Parquet tables beside the page.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from workloads.core.config import REWARD_STD_THRESHOLDS
from workloads.core.storage import ResultsRoot

PROMPT_CHARS = 600  # per prompt in the page (the table shows this much; hovers less)
OUTPUT_CHARS = 300  # per sampled output in the page
SAMPLE_BUDGET = 160_000  # samples held in the page across all inputs
OUTPUT_TEXT_BUDGET = 6_000_000  # characters of output text held in the page
MIN_SAMPLES = 2  # per input, whatever the budget
HOVER_SAMPLES = 4  # samples a hover label lists (the page's script reads it from `limits`)
ROW_KEYS = ["trial", "step", "input_id"]


def samples_per_input(num_rows: int, max_k: int) -> int:
    """How many samples of each input the page holds."""
    if num_rows == 0 or max_k <= 0:
        return 0
    return int(min(max_k, max(MIN_SAMPLES, SAMPLE_BUDGET // num_rows)))


def load_samples(results: str, sweep: str, per_input: int) -> pd.DataFrame:
    """The first `per_input` samples of every input: trial, step, input_id, sample_idx, reward, output."""
    columns = [*ROW_KEYS, "sample_idx", "reward", "output"]
    dataset = ResultsRoot(results).shard_dataset(sweep, "samples")
    if dataset is None or per_input <= 0:
        return pd.DataFrame(columns=columns)
    return dataset.to_table(columns=columns, filter=ds.field("sample_idx") < per_input).to_pandas()


def within_text_budget(samples: pd.DataFrame, per_input: int) -> int:
    """The most samples per input (at most `per_input`, at least MIN_SAMPLES) whose outputs,
    cut to OUTPUT_CHARS, total at most OUTPUT_TEXT_BUDGET characters."""
    if per_input <= MIN_SAMPLES or not len(samples):
        return per_input
    lengths = samples["output"].fillna("").astype(str).str.len().clip(upper=OUTPUT_CHARS)
    total = lengths.groupby(samples["sample_idx"].to_numpy()).sum().reindex(range(per_input), fill_value=0).cumsum()
    return max(MIN_SAMPLES, int((total.to_numpy() <= OUTPUT_TEXT_BUDGET).sum()))


def _numbers(values, digits: int = 6) -> list:
    """Floats at `digits` significant digits (enough for a hover, a third of the bytes), NaN as null."""
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in np.asarray(values, dtype=float)]


def _cut(texts: pd.Series, limit: int) -> pd.Series:
    texts = texts.fillna("").astype(str)
    long = texts.str.len() > limit
    return texts.where(~long, texts.str.slice(0, limit - 1) + "…")


def inputs_payload(inputs: pd.DataFrame, samples: pd.DataFrame, trial_order: list[str],
                   labels: dict[str, str], per_input: int) -> dict:
    """The block described in the module docstring. `inputs` rows must carry a
    `row` column numbering them 0..n-1 (the plots' customdata)."""
    inputs = inputs.sort_values("row")
    trial_index = {t: i for i, t in enumerate(trial_order)}
    prompt_codes, prompts = pd.factorize(_cut(inputs["prompt"], PROMPT_CHARS))
    rows = {
        "trial": inputs["trial"].map(trial_index).astype(int).tolist(),
        "step": inputs["step"].astype(int).tolist(),
        "input": inputs["input_id"].astype(int).tolist(),
        "prompt": prompt_codes.tolist(),
        "k": inputs["num_samples"].astype(int).tolist(),
        "mean": _numbers(inputs["reward_mean"]),
        "std": _numbers(inputs["reward_std"]),
        "grad": _numbers(inputs["grad_norm"].astype(float)),
    }

    if not len(samples):  # no sample rows (yet): the rows alone
        samples = pd.DataFrame({"trial": pd.Series(dtype=str), "step": pd.Series(dtype="int64"),
                                "input_id": pd.Series(dtype="int64"), "sample_idx": pd.Series(dtype="int32"),
                                "reward": pd.Series(dtype=float), "output": pd.Series(dtype=str)})
    joined = samples.merge(inputs[[*ROW_KEYS, "row"]], on=ROW_KEYS, how="inner")
    joined = joined.sort_values(["row", "sample_idx"], kind="stable")
    output_codes, outputs = pd.factorize(_cut(joined["output"], OUTPUT_CHARS))
    start = np.searchsorted(joined["row"].to_numpy(), np.arange(len(inputs) + 1))
    return {
        "trials": [labels.get(t, t) for t in trial_order],
        "trial_ids": list(trial_order),
        "prompts": list(prompts),
        "outputs": list(outputs),
        "rows": rows,
        "samples": {"start": start.tolist(), "idx": joined["sample_idx"].astype(int).tolist(),
                    "reward": _numbers(joined["reward"]), "output": output_codes.tolist()},
        "thresholds": list(REWARD_STD_THRESHOLDS),
        "limits": {"samples_per_input": per_input, "prompt_chars": PROMPT_CHARS, "output_chars": OUTPUT_CHARS,
                   "hover_samples": HOVER_SAMPLES},
    }


def script_json(value) -> str:
    """JSON to place inside a <script> element: every '<' written as \\u003c
    (valid JSON), so no text in a prompt can close the element or open a comment."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
