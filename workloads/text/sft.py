"""Supervised finetuning (paper section 5.2): teacher-forced cross-entropy, as
the reference's supervised trainer computes it (apple/ml-rlgrad
rl4lms/envs/text_generation/training_utils.py SupervisedTrainer on the Hugging
Face Trainer; data from utils_supervised.py):

  * one training example per (input, reference): get_datasets_for_causal /
    get_datasets_for_seq2seq loop over `sample.references`;
  * causal models: a plain LM loss over the text prompt + reference (string
    concatenation, tokenised together; DataCollatorForLanguageModeling with
    mlm=False), no EOS appended (GPT-2's tokenizer adds none);
    seq2seq: encoder = prompt (+ </s>), labels = reference + </s>;
  * every sequence cut to the model's positions on the task's truncation side
    (`tokenizer(..., truncation=True)` cuts at tokenizer.model_max_length): the
    IMDB causal text is a whole review, up to ~1,200 words;
  * loss = - (1 / #scored tokens in the batch) Σ log π_θ(token | preceding);
  * AdamW with the HF Trainer's weight-decay exclusions (biases, LayerNorm
    weights), its lr schedules (transformers.get_scheduler) and its gradient
    clipping at global norm 1.0.

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
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..core.context import WorkloadContext
from .sft_config import SFTConfig
from .models import encode_prompts, encode_targets, generate_outputs, load_model_and_tokenizer, token_log_probs, unwrap
from .sampling import Prompts, score_outputs
from .tasks import reward_of, task_of

NUM_EVAL_INPUTS = 64  # held-out validation inputs scored with greedy outputs at the end
TRAINER_STATE = "rlgrad_trainer_state.json"  # steps done, saved next to the weights


def run_sft(config: SFTConfig, ctx: WorkloadContext) -> dict:
    torch.manual_seed(config.seed)
    # resumption: a retried worker continues from its last checkpoint
    resume_from = ctx.resume_directory
    model, tokenizer = load_model_and_tokenizer(resume_from or config.model, ctx.device)
    start_step = 0
    if resume_from and os.path.exists(os.path.join(resume_from, TRAINER_STATE)):
        with open(os.path.join(resume_from, TRAINER_STATE)) as f:
            start_step = json.load(f)["step"]
    encoder_decoder = model.config.is_encoder_decoder

    side = task_of(config).truncation_side(config.truncation_side, encoder_decoder, stage="sft")
    num_used, sequences = training_data(config, model, tokenizer, encoder_decoder, side)
    num_examples = len(sequences)

    steps_per_epoch = math.ceil(num_examples / config.batch_size)
    # max_steps overrides num_epochs (and may cycle through the data more than once)
    total_steps = config.max_steps if config.max_steps >= 0 else config.num_epochs * steps_per_epoch

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and config.batch_size < ctx.world_size:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {ctx.world_size} workers")
    model.train()
    train_model = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay, config.weight_decay_exclusions),
                                  lr=config.learning_rate)
    scheduler = build_scheduler(optimizer, config.lr_scheduler, total_steps, config.warmup_steps, config.warmup_ratio)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": deliberate here
        warnings.simplefilter("ignore")
        for _ in range(start_step):  # a resumed run continues the schedule where it stopped
            scheduler.step()

    def global_batch(step: int) -> list[int]:
        # the order of an epoch depends on (seed, epoch) only: every rank and
        # every resumed run agrees on which examples step `step` sees
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        return order[position * config.batch_size : (position + 1) * config.batch_size].tolist()

    loss_sum, loss_count, last_loss = 0.0, 0, math.nan
    started = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        my_batch = global_batch(step - 1)[ctx.rank :: ctx.world_size]  # this rank's slice
        log_probs, mask = token_log_probs(train_model, [sequences[i][0] for i in my_batch],
                                          [sequences[i][1] for i in my_batch])
        # mean over this rank's scored tokens; DDP averages the gradients over ranks
        loss = -log_probs.sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1

        if step % config.log_every_steps == 0 or step == total_steps:
            last_loss = _mean_over_ranks(loss_sum / loss_count, distributed, loss.device)
            loss_sum, loss_count = 0.0, 0
            ctx.log_metrics(step, {"loss": last_loss, "learning_rate": scheduler.get_last_lr()[0]})
            if step % config.log_every_steps == 0:  # same number of reports on every rank
                ctx.report({"step": step, "loss": last_loss})
    train_seconds = time.perf_counter() - started

    eval_metrics = held_out_evaluation(config, model, tokenizer, encoder_decoder, side)
    ctx.log_metrics(total_steps, eval_metrics, split="validation")

    final_metrics = {
        "step": total_steps, "loss": last_loss, **eval_metrics,
        "num_train_inputs_used": num_used,
        "num_train_examples": num_examples,
        "train_seconds": train_seconds,
        "train_samples_per_s": (total_steps - start_step) * config.batch_size / train_seconds if train_seconds else 0.0,
    }
    # weights + tokenizer + steps done, so the next stage (or a retry) loads this directory
    def save(directory: str) -> None:
        unwrap(model).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, TRAINER_STATE), "w") as f:
            json.dump({"step": total_steps}, f)

    ctx.report_checkpoint(final_metrics, save)
    return final_metrics


# --------------------------------------------------------------------------
# the reference's data and optimiser semantics, one function each (tested alone)
# --------------------------------------------------------------------------

def held_out_evaluation(config: SFTConfig, model, tokenizer, encoder_decoder: bool, side: str) -> dict:
    """Reward of greedy outputs on the first NUM_EVAL_INPUTS validation inputs ({} when the
    task has no validation split: a dataset file without one)."""
    model.eval()
    task = task_of(config)
    if not task.has_split("validation"):
        return {}
    num_eval = min(NUM_EVAL_INPUTS, task.split_size("validation"))
    eval_examples = task.examples("validation", list(range(num_eval)))
    eval_prompts = [task.prompt_text(ex, encoder_decoder) for ex in eval_examples]
    eval_targets = [ex.target for ex in eval_examples]
    new_tokens = max(len(t) for t in encode_targets(tokenizer, eval_targets)) + 8
    prompt_limit = config.max_prompt_length
    positions = model_positions(model, tokenizer)
    if positions is not None and not encoder_decoder:
        # a causal prompt and its continuation share the positions: the reference's
        # SupervisedTrainer shortens the prompt by max_new_tokens when they would not fit
        new_tokens = min(new_tokens, positions // 2)
        prompt_limit = min(prompt_limit, positions - new_tokens)
    ids = encode_prompts(tokenizer, eval_prompts, prompt_limit, encoder_decoder, truncation_side=side,
                         chat_template=config.chat_template, system_prompt=config.system_prompt)
    outputs = generate_outputs(model, tokenizer, ids, do_sample=False, max_new_tokens=new_tokens)
    prompts = Prompts(eval_prompts, ids, [task.references(ex) for ex in eval_examples],
                      [task.columns(ex) for ex in eval_examples], [ex.input_id for ex in eval_examples])
    _, rewards = score_outputs(tokenizer, reward_of(config, task), prompts, outputs, 1)
    eval_metrics = {"eval_reward_mean": sum(r.value for r in rewards) / len(rewards)}
    for name in rewards[0].components:
        eval_metrics[f"eval_{name}_mean"] = sum(r.components[name] for r in rewards) / len(rewards)
    return eval_metrics


def training_data(config: SFTConfig, model, tokenizer, encoder_decoder: bool,
                  side: str) -> tuple[int, list[tuple[list[int], list[int]]]]:
    """(train inputs used, (context ids, scored ids) per training example): the first
    num_train_inputs train inputs, a seeded fraction of them labelled, one example
    per reference; the loss is log pi(scored | context) over the scored ids."""
    task = task_of(config)
    num_inputs = min(config.num_train_inputs, task.split_size("train"))
    num_used = max(1, round(config.frac_train_samples * num_inputs))
    train_ids = sorted(random.Random(config.seed).sample(range(num_inputs), num_used))
    examples = task.examples("train", train_ids)
    limit = config.max_train_length or model_positions(model, tokenizer)
    pairs = [(task.prompt_text(ex, encoder_decoder), reference) for ex in examples
             for reference in (task.train_references(ex) if config.references == "all" else [ex.target])]
    builtin = task.sft_loss_on_reference_only()  # not in the reference: EOS, and no loss on its random prompts
    append_eos = config.causal_append_eos if config.causal_append_eos is not None else builtin
    loss_tokens = config.causal_loss_tokens or ("reference" if builtin else "prompt_and_reference")
    return num_used, build_training_sequences(tokenizer, pairs, encoder_decoder, limit, side, loss_tokens, append_eos)


def model_positions(model, tokenizer) -> int | None:
    """How many tokens one sequence may hold: the model's position table (GPT-2
    n_positions) and the tokenizer's model_max_length (T5: 512), whichever is
    smaller -- where the reference's tokenizer(truncation=True) cuts. None when
    neither is bounded (the built-in T5, whose relative positions have no table)."""
    config = unwrap(model).config
    bounds = [getattr(config, name, None) for name in ("n_positions", "max_position_embeddings")]
    bounds.append(getattr(tokenizer, "model_max_length", None))
    bounds = [b for b in bounds if isinstance(b, int) and 0 < b < 1_000_000]
    return min(bounds) if bounds else None


def _cut(ids: list[int], limit: int | None, side: str, keep_last: bool = False) -> list[int]:
    """ids cut to `limit` on `side`; keep_last keeps a final special token (T5's </s>,
    as HF truncation keeps the tokens its post-processor adds)."""
    if limit is None or len(ids) <= limit:
        return list(ids)
    if keep_last:
        return _cut(ids[:-1], limit - 1, side) + ids[-1:]
    return list(ids[:limit]) if side == "right" else list(ids[-limit:])


def build_training_sequences(tokenizer, pairs: list[tuple[str, str]], encoder_decoder: bool, limit: int | None,
                             side: str, causal_loss_tokens: str = "prompt_and_reference",
                             append_eos: bool = False) -> list[tuple[list[int], list[int]]]:
    """(context ids, scored ids) per (prompt, reference) pair; the loss is
    -log pi(scored | context).

    seq2seq (tokenize_seq2seq): context = the prompt with its special tokens, scored
    = the reference + EOS, each cut to `limit` keeping the final </s>.
    causal, prompt_and_reference (tokenize_causal): the string prompt + reference
    tokenised as one text (+ EOS if append_eos), cut to `limit` on `side`;
    context = its first token, scored = the rest (an LM loss on every token the
    model predicts). causal, reference: context = the prompt's tokens, scored =
    the reference's (+ EOS), the prompt cut first so at least one scored token fits."""
    eos = tokenizer.eos_token_id
    sequences = []
    if encoder_decoder:
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
        targets = tokenizer([r for _, r in pairs], add_special_tokens=True)["input_ids"]
        for prompt, target in zip(prompts, targets):
            ends_with_special = bool(prompt) and prompt[-1] in tokenizer.all_special_ids
            target = target if target[-1:] == [eos] else target + [eos]  # the built-in tokenizer adds no </s>
            sequences.append((_cut(prompt, limit, side, keep_last=ends_with_special),
                              _cut(target, limit, "right", keep_last=True)))
        return sequences
    if causal_loss_tokens == "prompt_and_reference":
        texts = tokenizer([p + r for p, r in pairs], add_special_tokens=True)["input_ids"]
        for ids in texts:
            ids = _cut(ids + ([eos] if append_eos else []), limit, side, keep_last=append_eos)
            if len(ids) < 2:
                raise ValueError(f"a training text of {len(ids)} token(s) has nothing to predict")
            sequences.append((ids[:1], ids[1:]))
        return sequences
    if causal_loss_tokens != "reference":
        raise ValueError(f"causal_loss_tokens={causal_loss_tokens!r}; allowed: 'prompt_and_reference', 'reference'")
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    targets = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    for prompt, target in zip(prompts, targets):
        target = target + ([eos] if append_eos else [])
        if limit is not None:
            prompt = _cut(prompt, max(limit - len(target), 1), side) if prompt else prompt
            target = _cut(target, limit - len(prompt), "right", keep_last=append_eos)
        sequences.append((prompt or [eos], target))  # an empty prompt is conditioned on EOS (GPT-2's BOS)
    return sequences


# HF Trainer.get_decay_parameter_names (transformers 5.x): parameters inside nn.LayerNorm
# modules or whose names match these patterns get no weight decay (biases, layer norms,
# T5's layer_norm / final_layer_norm)
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model) -> set[str]:
    import re

    no_decay_modules = {name for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    names = set()
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner in no_decay_modules or any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS):
            continue
        names.add(name)
    return names


def parameter_groups(model, weight_decay: float, exclusions: str = "hf_trainer") -> list[dict]:
    """AdamW parameter groups: weight decay on the decayed parameters only."""
    model = unwrap(model)
    decayed = decay_parameter_names(model) if exclusions == "hf_trainer" else {n for n, _ in model.named_parameters()}
    parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in parameters if n in decayed], "weight_decay": weight_decay},
            {"params": [p for n, p in parameters if n not in decayed], "weight_decay": 0.0}]


def build_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0):
    """The lr schedule the HF Trainer builds: transformers.get_scheduler(name, warm-up
    steps = warmup_steps, or ceil(warmup_ratio * total_steps) when that is 0)."""
    from transformers import get_scheduler

    warmup = warmup_steps or math.ceil(warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


def _mean_over_ranks(value: float, distributed: bool, device) -> float:
    if not distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL wants it on the GPU
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()
