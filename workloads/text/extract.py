"""Sample extraction (paper section 4, Figure 1): for each chosen input draw K
samples from the model, score them, and store per-sample rows (`samples`) and
per-input reward mean / std and policy-gradient norm (`inputs`).

Work is split into shards of `shard_size` consecutive chosen inputs; a shard is
the unit of distribution (worker r takes every world_size-th shard) and of
resumption (a shard whose two files exist is skipped). Both tables name the
shard after the input range it holds, `inputs-{first:06d}-{last:06d}`, so a
retried worker overwrites instead of duplicating.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..core.context import WorkloadContext
from .config import grad_norm_temperature
from .extract_config import ExtractConfig
from .gradnorm import per_input_grad_norms
from .models import load_model_and_tokenizer, resolve_dtype, sequence_log_probs
from .sampling import (SamplingModel, ScoredSamples, engine_seed, prompts_of, sample_outputs, score_outputs, shard_seed,
                       table_rows)
from .tasks import reward_of, task_of
from .vllm_sampler import build_for

SUMMARY_COLUMNS = ["reward_mean", "reward_std", "grad_norm"]


def shard_name(first: int, last: int) -> str:
    return f"inputs-{first:06d}-{last:06d}"


def run_extract(config: ExtractConfig, ctx: WorkloadContext) -> dict:
    # the model as stored, in the precision of the log-probs and gradient norms; generate()
    # runs on a copy in the sampling dtype when that differs (bf16 where the hardware has it)
    grad_model, tokenizer = load_model_and_tokenizer(config.model, ctx.device, config.grad_norm_dtype)
    grad_model.eval()  # no dropout while sampling nor in the gradients
    sampling_dtype = resolve_dtype(config.dtype, ctx.device)
    # sampler: vllm -- an engine in this worker holding the model in the sampling dtype, seeded
    # once (its stream is not hf's); else generate() on the model or its sampling-dtype copy
    engine = build_for(config, grad_model, tokenizer, config.model, ctx.device,
                       seed=engine_seed(config.seed, ctx.rank), dtype=sampling_dtype)
    model = grad_model if engine is not None else SamplingModel(grad_model, sampling_dtype).model
    task = task_of(config)
    reward_fn = reward_of(config, task)

    # the paper's protocol: num_inputs random inputs of the split, fixed seed
    chosen = task.choose_inputs(config.split, config.num_inputs, config.seed)
    shards = [(first, min(first + config.shard_size, len(chosen)) - 1)
              for first in range(0, len(chosen), config.shard_size)]
    my_shards = ctx.my_items(shards)

    progress = tqdm(total=sum(last - first + 1 for first, last in my_shards), unit="input",
                    desc=f"extract {ctx.model_name(config.model)}", disable=not (ctx.is_main and ctx.show_progress))
    input_rows: list[dict] = []  # this worker's `inputs` rows, for the summary
    totals = {"samples": 0, "tokens": 0, "shards_skipped": 0}
    seconds = {"generate": 0.0, "score": 0.0, "grad_norm": 0.0}
    for first, last in my_shards:
        name = shard_name(first, last)
        written = ctx.writer.written_inputs(name, SUMMARY_COLUMNS)
        if written is not None:  # resumption: the shard is done; reuse its rows for the summary
            input_rows += written
            totals["shards_skipped"] += 1
            progress.update(last - first + 1)
            continue
        # the same shard always draws the same samples, whichever worker runs it
        torch.manual_seed(shard_seed(config.seed, first))
        samples, inputs = extract_shard(config, model, grad_model, tokenizer, reward_fn, chosen[first : last + 1],
                                        ctx.model_name(config.model), seconds, progress, engine)
        ctx.writer.write_samples_and_inputs(name, samples, inputs)
        input_rows += inputs
        totals["samples"] += len(samples)
        totals["tokens"] += sum(row["num_tokens"] for row in samples)
    progress.close()
    if engine is not None:
        engine.close()

    # one report per worker, at the end (Ray Train wants the same count on every rank)
    summary = extraction_summary(input_rows, totals, seconds, config.reward_std_thresholds)
    ctx.report(summary)
    return summary


def extract_shard(config: ExtractConfig, model, grad_model, tokenizer, reward_fn, input_indices: list[int],
                  model_name: str, seconds: dict, progress, engine=None) -> tuple[list[dict], list[dict]]:
    """(`samples` rows, `inputs` rows) of one shard of inputs, in the shard's order; the
    samples come from `engine` (sampler: vllm) when given, log-probs from `model` either way."""
    gen, K = config.generation, config.num_samples_per_input
    task = task_of(config)
    examples = task.examples(config.split, input_indices)
    prompts = prompts_of(config, task, examples, tokenizer, model.config.is_encoder_decoder, "extract")
    # bucketing: batches of prompts of similar length pad less (generation and gradients);
    # results are kept per input and written in the shard's order
    by_length = sorted(range(len(examples)), key=lambda j: len(prompts.ids[j]))
    outputs_of, texts_of, rewards_of, log_probs_of = {}, {}, {}, {}
    for batch_start in range(0, len(by_length), config.batch_size):
        batch = by_length[batch_start : batch_start + config.batch_size]
        batch_prompts = prompts.subset(batch)
        tic = time.perf_counter()
        outputs = sample_outputs(model, tokenizer, batch_prompts.ids, K, gen, engine=engine)
        seconds["generate"] += time.perf_counter() - tic

        tic = time.perf_counter()
        texts, rewards = score_outputs(tokenizer, reward_fn, batch_prompts, outputs, K)
        with torch.no_grad():  # log pi_theta(y|x) at temperature 1, no top-k/p, in grad_norm_dtype
            log_probs = sequence_log_probs(grad_model, [p for p in batch_prompts.ids for _ in range(K)], outputs).tolist()
        seconds["score"] += time.perf_counter() - tic
        for i, j in enumerate(batch):
            rows = slice(i * K, (i + 1) * K)
            outputs_of[j], texts_of[j], rewards_of[j], log_probs_of[j] = \
                outputs[rows], texts[rows], rewards[rows], log_probs[rows]
        progress.update(len(batch))

    in_order = range(len(examples))
    scored = ScoredSamples.of(K, [o for j in in_order for o in outputs_of[j]], [t for j in in_order for t in texts_of[j]],
                              [r for j in in_order for r in rewards_of[j]])
    tic = time.perf_counter()
    grad_norms = [None] * len(examples)
    if config.compute_grad_norm:
        # all the shard's inputs in one call: it runs one forward/backward per chunk of
        # sequences, taking the inputs in length order (bucketed like the generation batches)
        in_length_order = per_input_grad_norms(grad_model, [prompts.ids[j] for j in by_length],
                                               [outputs_of[j] for j in by_length], scored.reward_matrix[by_length],
                                               temperature=grad_norm_temperature(config.grad_norm_of, gen))
        for j, norm in zip(by_length, in_length_order.tolist()):
            grad_norms[j] = norm
    seconds["grad_norm"] += time.perf_counter() - tic
    return table_rows(0, examples, prompts, scored, [lp for j in in_order for lp in log_probs_of[j]], grad_norms,
                      model_name, f"{config.task}/{config.split}", config.zero_std_tolerance)


def extraction_summary(input_rows: list[dict], totals: dict, seconds: dict, thresholds) -> dict:
    """The worker's one report: reward and reward-std statistics of its inputs, throughput."""
    elapsed = sum(seconds.values())
    reward_stds = [r["reward_std"] for r in input_rows]
    grad_norms = [r["grad_norm"] for r in input_rows if r["grad_norm"] is not None]
    return {
        "num_inputs": len(input_rows),
        "num_shards_skipped": totals["shards_skipped"],
        "reward_mean": _mean([r["reward_mean"] for r in input_rows]),
        "reward_std_mean": _mean(reward_stds),
        **{f"share_reward_std_below_{t}": _mean([float(s < t) for s in reward_stds]) for t in thresholds},
        "grad_norm_mean": _mean(grad_norms),
        "samples_per_s": totals["samples"] / elapsed if elapsed else math.nan,
        "tokens_per_s": totals["tokens"] / elapsed if elapsed else math.nan,
        **{f"{part}_seconds": s for part, s in seconds.items()},
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
