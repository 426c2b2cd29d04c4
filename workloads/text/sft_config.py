"""The config of supervised finetuning (workloads/text/sft.py). Torch-free.

Defaults follow the reference's supervised trainer (apple/ml-rlgrad
rl4lms/envs/text_generation/training_utils.py SupervisedTrainer, a wrapper on
the Hugging Face Trainer; data from utils_supervised.py) -- see docs/fidelity.md.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from .config import TextTaskConfig

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


class SFTConfig(TextTaskConfig):
    """Supervised finetuning: teacher-forced cross-entropy on the task's references.

    For causal and seq2seq models (RL4LMs supervised trainer). The paper gives no SFT hyperparameters; these
    defaults are the usual Hugging Face Trainer ones, small enough for the
    built-in task. The held-out evaluation is scored with `reward`."""

    produces_checkpoint: ClassVar[bool] = True

    num_train_inputs: int = Field(5000, ge=1, description="train inputs in the pool")
    frac_train_samples: float = Field(1.0, gt=0, le=1, description="fraction of labelled train inputs (section 5.2; datapool.frac_train_samples)")
    max_steps: int = Field(-1, ge=-1, description="optimiser-step cap (section 5.2; training_args.max_steps); -1 = run num_epochs")
    num_epochs: int = Field(1, ge=1, description="passes over the train examples")
    batch_size: int = Field(16, ge=1, description="examples per optimiser step, summed over workers (training_args.per_device_train_batch_size)")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW peak learning rate (RL4LMs supervised configs: 1e-5 to 1e-4)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay, applied to the parameters named by weight_decay_exclusions")
    weight_decay_exclusions: Literal["hf_trainer", "none"] = Field("hf_trainer", description=(
        "hf_trainer: biases and LayerNorm/T5LayerNorm weights get no weight decay, as the Hugging Face Trainer "
        "the reference uses does; none: decay every parameter"))
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field("constant", description=(
        "learning-rate schedule over the run's optimiser steps (training_args.lr_scheduler_type; "
        "transformers.get_scheduler, as the HF Trainer builds it)"))
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (training_args.warmup_steps; HF default 0)")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warm-up as a fraction of the steps, used when warmup_steps is 0 (HF default 0)")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="clip the gradient's global norm to this (HF Trainer default 1.0); null = no clipping")
    references: Literal["all", "first"] = Field("all", description=(
        "all: one training example per (input, reference), as the reference's get_datasets_for_causal / "
        "_seq2seq do; first: only each input's first reference"))
    causal_loss_tokens: Optional[Literal["prompt_and_reference", "reference"]] = Field(None, description=(
        "causal models: prompt_and_reference = a plain LM loss on the text prompt + reference, as the reference "
        "trains (DataCollatorForLanguageModeling); reference = only the reference's tokens; null = "
        "prompt_and_reference for GRUE tasks, reference for the built-in task (not in the reference: its random "
        "prompts are not worth modelling)"))
    causal_append_eos: Optional[bool] = Field(None, description=(
        "causal models: end each training text with EOS. null = as the reference for GRUE tasks (GPT-2's "
        "tokenizer adds no EOS, so none) and yes for the built-in task, whose outputs must learn to stop"))
    max_train_length: Optional[int] = Field(None, ge=2, description=(
        "tokens kept of a training sequence (causal: prompt + reference; seq2seq: the encoder input and the "
        "target each); null = the model's positions (n_positions / tokenizer.model_max_length: GPT-2 1024, "
        "T5 512), where the reference's tokenizer(truncation=True) cuts"))
    truncation_side: Literal["task", "left", "right"] = Field("task", description=(
        "which end a too-long sequence loses; task = the reference config's tokenizer.truncation_side "
        "(left for IMDB, right for the T5 tasks and DailyDialog; built-in task: causal left, seq2seq right)"))
    max_prompt_length: int = Field(512, ge=1, description="prompt tokens kept when generating for the held-out evaluation (tokenizer.max_length; GRUE: 512)")
    seed: int = Field(0, description="seed of the data order")
    log_every_steps: int = Field(10, ge=1, description="optimiser steps between metric rows")

    @model_validator(mode="after")
    def _warmup_one_way(self):
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"give warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), "
                             "not both")
        return self
