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

import copy
import math
import time

import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..core.context import WorkloadContext
from .extract_config import ExtractConfig
from .gradnorm import per_input_grad_norms, reward_stats
from .models import encode_prompts, generate_outputs, load_model_and_tokenizer, sequence_log_probs
from .rewards import get_reward
from .tasks import choose_inputs, get_examples, prompt_text, references, resolve_reward


def shard_name(first: int, last: int) -> str:
    return f"inputs-{first:06d}-{last:06d}"


def run_extract(config: ExtractConfig, ctx: WorkloadContext) -> dict:
    model, tokenizer = load_model_and_tokenizer(config.model, ctx.device)
    model.eval()  # no dropout while sampling nor in the gradients
    encoder_decoder = model.config.is_encoder_decoder
    grad_dtype = getattr(torch, config.grad_norm_dtype)
    # gradients may need more precision than sampling: a copy in grad_norm_dtype
    grad_model = model if model.dtype == grad_dtype else copy.deepcopy(model).to(grad_dtype)
    reward_fn = get_reward(*resolve_reward(config.task, config.reward, config.reward_args))
    gen = config.generation
    K = config.num_samples_per_input
    dataset = f"{config.task}/{config.split}"

    # the paper's protocol: num_inputs random inputs of the split, fixed seed
    chosen = choose_inputs(config.task, config.split, config.num_inputs, config.seed, config.dataset_path)
    shards = [(first, min(first + config.shard_size, len(chosen)) - 1)
              for first in range(0, len(chosen), config.shard_size)]
    my_shards = ctx.my_items(shards)

    progress = tqdm(total=sum(last - first + 1 for first, last in my_shards), unit="input",
                    desc=f"extract {config.model}", disable=not (ctx.is_main and ctx.show_progress))
    input_rows_all: list[dict] = []  # this worker's `inputs` rows, for the summary
    num_samples = num_tokens = 0
    seconds = {"generate": 0.0, "score": 0.0, "grad_norm": 0.0}
    skipped = 0
    for first, last in my_shards:
        name = shard_name(first, last)
        if ctx.writer.exists("samples", name) and ctx.writer.exists("inputs", name):
            fs, path = ctx.writer._path("inputs", name)  # resumption: reuse it for the summary
            input_rows_all += pq.read_table(path, filesystem=fs, columns=["reward_mean", "reward_std",
                                                                            "grad_norm"]).to_pylist()
            skipped += 1
            progress.update(last - first + 1)
            continue
        # the same shard always draws the same samples, whichever worker runs it
        torch.manual_seed(config.seed * 1_000_003 + first)
        examples = get_examples(config.task, config.split, chosen[first : last + 1], config.dataset_path)
        prompts = [prompt_text(config.task, ex, encoder_decoder) for ex in examples]
        prompt_ids = encode_prompts(tokenizer, prompts, gen.max_prompt_length, encoder_decoder)
        # bucketing: batches of prompts of similar length pad less (generation and gradients);
        # results are stored per input and written in the shard's order
        by_length = sorted(range(len(examples)), key=lambda j: len(prompt_ids[j]))
        outputs_of, texts_of, rewards_of, log_probs_of = {}, {}, {}, {}
        for batch_start in range(0, len(by_length), config.batch_size):
            batch = by_length[batch_start : batch_start + config.batch_size]
            tic = time.perf_counter()
            outputs = sample_outputs(model, tokenizer, [prompt_ids[j] for j in batch], K, gen)
            seconds["generate"] += time.perf_counter() - tic

            tic = time.perf_counter()
            texts, rewards = score_outputs(tokenizer, reward_fn, [prompts[j] for j in batch],
                                           [references(config.task, examples[j]) for j in batch], outputs, K)
            repeated_prompt_ids = [prompt_ids[j] for j in batch for _ in range(K)]
            with torch.no_grad():  # log pi_theta(y|x) of the model itself: temperature 1, no top-k/p
                log_probs = sequence_log_probs(model, repeated_prompt_ids, outputs).tolist()
            seconds["score"] += time.perf_counter() - tic
            for i, j in enumerate(batch):
                rows = slice(i * K, (i + 1) * K)
                outputs_of[j], texts_of[j], rewards_of[j], log_probs_of[j] = \
                    outputs[rows], texts[rows], rewards[rows], log_probs[rows]
            progress.update(len(batch))

        reward_matrix = torch.tensor([[r.value for r in rewards_of[j]] for j in range(len(examples))],
                                     dtype=torch.float64).view(len(examples), K)
        reward_mean, reward_std, reward_std_unbiased = reward_stats(reward_matrix)
        tic = time.perf_counter()
        grad_norms = [None] * len(examples)
        if config.compute_grad_norm:
            # all the shard's inputs in one call: it runs one forward/backward per max_sequences
            # sequences, taking the inputs in length order (bucketed like the generation batches)
            in_length_order = per_input_grad_norms(grad_model, [prompt_ids[j] for j in by_length],
                                                   [outputs_of[j] for j in by_length], reward_matrix[by_length])
            for j, norm in zip(by_length, in_length_order.tolist()):
                grad_norms[j] = norm
        seconds["grad_norm"] += time.perf_counter() - tic

        sample_rows, input_rows = [], []
        for j, ex in enumerate(examples):
            for k in range(K):
                reward = rewards_of[j][k]
                sample_rows.append({
                    "step": 0, "input_id": ex.input_id, "sample_idx": k, "prompt": prompts[j], "output": texts_of[j][k],
                    "reward": reward.value, "reward_components": reward.components,
                    "log_prob": log_probs_of[j][k], "num_tokens": len(outputs_of[j][k]),
                    "model": config.model, "dataset": dataset,
                })
            input_rows.append({
                "step": 0, "input_id": ex.input_id, "prompt": prompts[j], "num_samples": K,
                "reward_mean": reward_mean[j].item(), "reward_std": reward_std[j].item(),
                "reward_std_unbiased": reward_std_unbiased[j].item(), "grad_norm": grad_norms[j],
                "model": config.model, "dataset": dataset,
            })
            num_samples += K
            num_tokens += sum(len(o) for o in outputs_of[j])
        # samples first: a shard counts as done only once its `inputs` file exists
        ctx.writer.write("samples", name, sample_rows)
        ctx.writer.write("inputs", name, input_rows)
        input_rows_all += input_rows
    progress.close()

    # one report per worker, at the end (Ray Train wants the same count on every rank)
    elapsed = sum(seconds.values())
    reward_stds = [r["reward_std"] for r in input_rows_all]
    grad_norms = [r["grad_norm"] for r in input_rows_all if r["grad_norm"] is not None]
    summary = {
        "num_inputs": len(input_rows_all),
        "num_shards_skipped": skipped,
        "reward_mean": _mean([r["reward_mean"] for r in input_rows_all]),
        "reward_std_mean": _mean(reward_stds),
        **{f"share_reward_std_below_{t}": _mean([float(s < t) for s in reward_stds])
           for t in config.reward_std_thresholds},
        "grad_norm_mean": _mean(grad_norms),
        "samples_per_s": num_samples / elapsed if elapsed else math.nan,
        "tokens_per_s": num_tokens / elapsed if elapsed else math.nan,
        **{f"{part}_seconds": s for part, s in seconds.items()},
    }
    ctx.report(summary)
    return summary


def sample_outputs(model, tokenizer, prompt_ids: list[list[int]], num_samples: int, gen) -> list[list[int]]:
    """K samples for each prompt from ONE generate() call (num_return_sequences=K),
    prompt-major: rows i*K .. i*K+K-1 are prompt i's."""
    return generate_outputs(
        model, tokenizer, prompt_ids, num_return_sequences=num_samples, do_sample=True,
        temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
        min_new_tokens=gen.min_new_tokens, max_new_tokens=gen.max_new_tokens,
    )


def score_outputs(tokenizer, reward_fn, prompts: list[str], input_references: list, outputs: list[list[int]],
                  num_samples: int):
    """(texts, rewards) of prompt-major samples: one batch_decode and ONE reward call for all of them."""
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    rewards = reward_fn([p for p in prompts for _ in range(num_samples)], texts,
                        [refs for refs in input_references for _ in range(num_samples)])
    return texts, rewards


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
