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

from .configs import ExtractConfig
from .context import WorkloadContext
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
        sample_rows, input_rows = [], []
        for batch_start in range(0, len(examples), config.batch_size):
            batch = examples[batch_start : batch_start + config.batch_size]
            prompts = [prompt_text(config.task, ex, encoder_decoder) for ex in batch]
            prompt_ids = encode_prompts(tokenizer, prompts, gen.max_prompt_length, encoder_decoder)

            # one generate() call: K samples per prompt via num_return_sequences
            tic = time.perf_counter()
            outputs = generate_outputs(
                model, tokenizer, prompt_ids, num_return_sequences=K, do_sample=True,
                temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                min_new_tokens=gen.min_new_tokens, max_new_tokens=gen.max_new_tokens,
            )  # prompt-major: rows i*K .. i*K+K-1 are input i's samples
            seconds["generate"] += time.perf_counter() - tic

            tic = time.perf_counter()
            texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
            rewards = reward_fn([p for p in prompts for _ in range(K)], texts,
                                [references(config.task, ex) for ex in batch for _ in range(K)])
            repeated_prompt_ids = [p for p in prompt_ids for _ in range(K)]
            with torch.no_grad():  # log pi_theta(y|x) of the model itself: temperature 1, no top-k/p
                log_probs = sequence_log_probs(model, repeated_prompt_ids, outputs).tolist()
            reward_matrix = torch.tensor([r.value for r in rewards], dtype=torch.float64).view(len(batch), K)
            reward_mean, reward_std, reward_std_unbiased = reward_stats(reward_matrix)
            seconds["score"] += time.perf_counter() - tic

            tic = time.perf_counter()
            if config.compute_grad_norm:
                grouped = [outputs[i * K : (i + 1) * K] for i in range(len(batch))]
                grad_norms = per_input_grad_norms(grad_model, prompt_ids, grouped, reward_matrix).tolist()
            else:
                grad_norms = [None] * len(batch)
            seconds["grad_norm"] += time.perf_counter() - tic

            for i, ex in enumerate(batch):
                for k in range(K):
                    row = i * K + k
                    sample_rows.append({
                        "step": 0, "input_id": ex.input_id, "sample_idx": k, "prompt": prompts[i], "output": texts[row],
                        "reward": rewards[row].value, "reward_components": rewards[row].components,
                        "log_prob": log_probs[row], "num_tokens": len(outputs[row]),
                        "model": config.model, "dataset": dataset,
                    })
                input_rows.append({
                    "step": 0, "input_id": ex.input_id, "prompt": prompts[i], "num_samples": K,
                    "reward_mean": reward_mean[i].item(), "reward_std": reward_std[i].item(),
                    "reward_std_unbiased": reward_std_unbiased[i].item(), "grad_norm": grad_norms[i],
                    "model": config.model, "dataset": dataset,
                })
            num_samples += len(outputs)
            num_tokens += sum(len(o) for o in outputs)
            progress.update(len(batch))
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
