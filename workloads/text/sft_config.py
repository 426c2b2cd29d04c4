"""The config of supervised finetuning (workloads/text/sft.py). Torch-free."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from .config import TextTaskConfig


class SFTConfig(TextTaskConfig):
    """Supervised finetuning: teacher-forced cross-entropy on the task's references.

    For causal and seq2seq models (RL4LMs supervised trainer). The paper gives no SFT hyperparameters; these
    defaults are the usual Hugging Face Trainer ones, small enough for the
    built-in task. The held-out evaluation is scored with `reward`."""

    produces_checkpoint: ClassVar[bool] = True

    num_train_inputs: int = Field(5000, ge=1, description="train inputs in the pool")
    frac_train_samples: float = Field(1.0, gt=0, le=1, description="fraction of labelled train inputs (section 5.2; datapool.frac_train_samples)")
    max_steps: int = Field(-1, ge=-1, description="optimiser-step cap (section 5.2; training_args.max_steps); -1 = run num_epochs")
    num_epochs: int = Field(1, ge=1, description="passes over the train inputs")
    batch_size: int = Field(16, ge=1, description="examples per optimiser step, summed over workers")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (RL4LMs supervised configs: 1e-4)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_prompt_length: int = Field(512, ge=1, description="prompt tokens kept (GRUE: 512)")
    seed: int = Field(0, description="seed of the data order")
    log_every_steps: int = Field(10, ge=1, description="optimiser steps between metric rows")
