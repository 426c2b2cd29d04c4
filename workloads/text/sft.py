"""Supervised finetuning (paper section 5.2): teacher-forced cross-entropy on
(prompt, target) pairs, for causal and seq2seq models alike.

  loss = - (1 / #output tokens) Σ_t log π_θ(y_t | x, y_<t)    over target tokens + EOS only

Section 5.2 caps SFT by optimisation steps (`max_steps`) and by the labelled
fraction of train inputs (`frac_train_samples`); `max_steps: 0` trains nothing
and checkpoints the initial model -- the "no SFT" baseline of a sweep.

Under torch.distributed (Ray Train) with world_size > 1 the model is wrapped in
DistributedDataParallel and every rank takes its slice of each global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..core.context import WorkloadContext
from .sft_config import SFTConfig
from .models import encode_prompts, encode_targets, generate_outputs, load_model_and_tokenizer, token_log_probs, unwrap
from .rewards import get_reward
from .tasks import get_examples, prompt_text, references, resolve_reward, split_size

NUM_EVAL_INPUTS = 64  # held-out validation inputs scored with greedy outputs at the end
TRAINER_STATE = "rlgrad_trainer_state.json"  # steps done, saved next to the weights


def run_sft(config: SFTConfig, ctx: WorkloadContext) -> dict:
    torch.manual_seed(config.seed)
    # resumption: a retried worker continues from its last checkpoint
    resuming = bool(ctx.resume_from) and os.path.isdir(ctx.resume_from)
    model, tokenizer = load_model_and_tokenizer(ctx.resume_from if resuming else config.model, ctx.device)
    start_step = 0
    if resuming and os.path.exists(os.path.join(ctx.resume_from, TRAINER_STATE)):
        with open(os.path.join(ctx.resume_from, TRAINER_STATE)) as f:
            start_step = json.load(f)["step"]
    encoder_decoder = model.config.is_encoder_decoder

    # data: the first num_train_inputs train inputs, of which a seeded fraction is labelled
    num_inputs = min(config.num_train_inputs, split_size(config.task, "train", config.dataset_path))
    num_used = max(1, round(config.frac_train_samples * num_inputs))
    train_ids = sorted(random.Random(config.seed).sample(range(num_inputs), num_used))
    examples = get_examples(config.task, "train", train_ids, config.dataset_path)
    prompt_ids = encode_prompts(tokenizer, [prompt_text(config.task, ex, encoder_decoder) for ex in examples],
                                config.max_prompt_length, encoder_decoder)
    target_ids = encode_targets(tokenizer, [ex.target for ex in examples])

    steps_per_epoch = math.ceil(num_used / config.batch_size)
    # max_steps overrides num_epochs (and may cycle through the data more than once)
    total_steps = config.max_steps if config.max_steps >= 0 else config.num_epochs * steps_per_epoch

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and config.batch_size < ctx.world_size:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {ctx.world_size} workers")
    model.train()
    train_model = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def global_batch(step: int) -> list[int]:
        # the order of an epoch depends on (seed, epoch) only: every rank and
        # every resumed run agrees on which examples step `step` sees
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(num_used, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        return order[position * config.batch_size : (position + 1) * config.batch_size].tolist()

    loss_sum, loss_count, last_loss = 0.0, 0, math.nan
    started = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        my_batch = global_batch(step - 1)[ctx.rank :: ctx.world_size]  # this rank's slice
        log_probs, mask = token_log_probs(train_model, [prompt_ids[i] for i in my_batch],
                                          [target_ids[i] for i in my_batch])
        # mean over this rank's target tokens; DDP averages the gradients over ranks
        loss = -log_probs.sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1

        if step % config.log_every_steps == 0 or step == total_steps:
            last_loss = _mean_over_ranks(loss_sum / loss_count, distributed, loss.device)
            loss_sum, loss_count = 0.0, 0
            ctx.log_metrics(step, {"loss": last_loss})
            if step % config.log_every_steps == 0:  # same number of reports on every rank
                ctx.report({"step": step, "loss": last_loss})
    train_seconds = time.perf_counter() - started

    # held-out evaluation: reward of greedy outputs on validation inputs
    model.eval()
    num_eval = min(NUM_EVAL_INPUTS, split_size(config.task, "validation", config.dataset_path))
    eval_examples = get_examples(config.task, "validation", list(range(num_eval)), config.dataset_path)
    eval_prompts = [prompt_text(config.task, ex, encoder_decoder) for ex in eval_examples]
    eval_targets = [ex.target for ex in eval_examples]
    longest_target = max(len(t) for t in encode_targets(tokenizer, eval_targets))
    outputs = generate_outputs(model, tokenizer,
                               encode_prompts(tokenizer, eval_prompts, config.max_prompt_length, encoder_decoder),
                               do_sample=False, max_new_tokens=longest_target + 8)
    reward_fn = get_reward(*resolve_reward(config.task, config.reward, config.reward_args))
    rewards = reward_fn(eval_prompts, tokenizer.batch_decode(outputs, skip_special_tokens=True),
                        [references(config.task, ex) for ex in eval_examples])
    eval_metrics = {"eval_reward_mean": sum(r.value for r in rewards) / len(rewards)}
    for name in rewards[0].components:
        eval_metrics[f"eval_{name}_mean"] = sum(r.components[name] for r in rewards) / len(rewards)
    ctx.log_metrics(total_steps, eval_metrics, split="validation")

    final_metrics = {
        "step": total_steps, "loss": last_loss, **eval_metrics,
        "num_train_inputs_used": num_used,
        "train_seconds": train_seconds,
        "train_samples_per_s": (total_steps - start_step) * config.batch_size / train_seconds if train_seconds else 0.0,
    }
    # weights + tokenizer + steps done, so the next stage (or a retry) loads this directory
    checkpoint_dir = tempfile.mkdtemp(prefix="rlgrad-sft-")
    if ctx.is_main:
        unwrap(model).save_pretrained(checkpoint_dir)
        tokenizer.save_pretrained(checkpoint_dir)
        with open(os.path.join(checkpoint_dir, TRAINER_STATE), "w") as f:
            json.dump({"step": total_steps}, f)
    ctx.report(final_metrics, checkpoint_dir=checkpoint_dir if ctx.is_main else None)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return final_metrics


def _mean_over_ranks(value: float, distributed: bool, device) -> float:
    if not distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL wants it on the GPU
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()
