"""Typed, validated configs: one per workload.

This module imports no torch and builds no model, so the orchestrator can
validate a whole sweep file (and every point of its search space) before a
single Ray worker starts. Defaults are the paper's settings where the paper
gives one (see ../shared/reference/paper.md); where it is silent the default
says so in its comment.

Model names accepted everywhere a config says `model`:
  * ``builtin:tiny-gpt2`` / ``builtin:tiny-t5`` -- tiny models built from a
    config with the built-in character tokenizer (offline, random init);
  * a local directory holding a Hugging Face checkpoint (``save_pretrained``);
  * a Hugging Face hub id such as ``gpt2`` or ``t5-base`` (needs hub access).
The orchestrator fills `model` in with a checkpoint directory when a stage says
``from_stage: <earlier stage>``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_MODELS = ("builtin:tiny-gpt2", "builtin:tiny-t5")
BUILTIN_TASKS = ("reverse",)


class StrictConfig(BaseModel):
    """Unknown keys and wrong types are errors (no silent coercion of '8' to 8)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GenerationConfig(StrictConfig):
    """Sampling settings shared by extraction and (later) PPO rollouts."""

    temperature: float = Field(1.0, gt=0)  # paper: sampling temperature 1
    top_k: int = Field(0, ge=0)  # 0 disables top-k (ToTTo uses 0, IMDB 50, ...)
    top_p: float = Field(1.0, gt=0, le=1)
    min_new_tokens: int = Field(0, ge=0)
    max_new_tokens: int = Field(48, ge=1)  # IMDB: exactly 48 new tokens
    max_prompt_length: int = Field(512, ge=1)  # GRUE prompts are cut at 512

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        return self


class ExtractConfig(StrictConfig):
    """Sample extraction (paper section 4): K samples per input, their rewards,
    per-input reward mean/std and the per-input policy-gradient norm."""

    checkpoint_field: ClassVar[str] = "model"  # what `from_stage:` fills in
    produces_checkpoint: ClassVar[bool] = False

    model: str = "builtin:tiny-gpt2"
    task: str = "reverse"  # built-in offline task; GRUE tasks arrive with issue 4
    split: Literal["train", "validation", "test"] = "train"
    num_inputs: int = Field(5000, ge=1)  # paper: 5,000 random train inputs
    num_samples_per_input: int = Field(10, ge=2)  # paper: 10 samples per input (K)
    seed: int = 7  # paper: fixed seed 7 for choosing the inputs
    generation: GenerationConfig = GenerationConfig()
    batch_size: int = Field(16, ge=1)  # prompts per generate() call (x K sequences)
    compute_grad_norm: bool = True
    grad_norm_dtype: Literal["float32", "float64"] = "float32"
    shard_size: int = Field(256, ge=1)  # inputs per Parquet shard (unit of resumption)
    reward_std_thresholds: list[float] = [0.01, 0.05, 0.1]  # reported shares


class SFTConfig(StrictConfig):
    """Teacher-forced cross-entropy finetuning for causal and seq2seq models.
    The paper gives no SFT hyperparameters; these defaults are the usual
    Hugging Face Trainer ones, small enough for the built-in task."""

    checkpoint_field: ClassVar[str] = "model"
    produces_checkpoint: ClassVar[bool] = True

    model: str = "builtin:tiny-gpt2"
    task: str = "reverse"
    num_train_inputs: int = Field(5000, ge=1)
    frac_train_samples: float = Field(1.0, gt=0, le=1)  # section 5.2: labelled fraction
    max_steps: int = Field(-1, ge=-1)  # section 5.2: step cap; -1 = run num_epochs
    num_epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_prompt_length: int = Field(512, ge=1)
    seed: int = 0
    log_every: int = Field(10, ge=1)


# name -> (config class, "module:function" of the workload entry point).
# Entry points are imported lazily so that this registry stays torch-free.
WORKLOADS: dict[str, tuple[type[StrictConfig], str]] = {
    "extract": (ExtractConfig, "workloads.extract:run_extract"),
    "sft": (SFTConfig, "workloads.sft:run_sft"),
}


# --------------------------------------------------------------------------
# controlled: classifier "policies" pretrained on label sets, then finetuned
# with SFT or RFT (paper section 4.2; apple/ml-rlgrad sft_vs_rft/).
# --------------------------------------------------------------------------

CONTROLLED_NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "stsb": 6}


class ControlledMLP(StrictConfig):
    """Fully connected ReLU network on flattened inputs."""

    type: Literal["mlp"] = "mlp"
    hidden_sizes: list[int] = [250, 100]  # paper: hidden layers of 250 and 100


class ControlledResNet18(StrictConfig):
    """ResNet18 (basic blocks, depths 2-2-2-2) built from transformers' ResNetConfig."""

    type: Literal["resnet18"] = "resnet18"
    # "cifar": 3x3 stride-1 stem without max-pool (suits 32x32 images);
    # "imagenet": the 7x7 stride-2 stem + max-pool the original project used
    stem: Literal["cifar", "imagenet"] = "cifar"


class ControlledBertMini(StrictConfig):
    """BERT-mini (4 layers, hidden 256, 4 heads), random init, dropout 0."""

    type: Literal["bert-mini"] = "bert-mini"
    tokenizer: str = "prajjwal1/bert-mini"  # hub id or a local tokenizer directory
    max_length: int = Field(512, ge=8)  # truncation of a sentence pair (original: 512)


ControlledModel = Annotated[
    Union[ControlledMLP, ControlledResNet18, ControlledBertMini], Field(discriminator="type")
]


class ControlledConfig(StrictConfig):
    """Controlled finetuning experiment: pretrain a classifier so that each input
    spreads its probability over a set of m labels, then finetune on single
    labels, 10% of which lie outside the input's set (tiny reward std).

    Defaults are the reference plans' (MNIST/MLP finetune with Adam), except
    `dataset`, which defaults to scikit-learn's offline digits."""

    checkpoint_field: ClassVar[str] = "init_checkpoint"  # what `from_stage:` fills in
    produces_checkpoint: ClassVar[bool] = True  # pretrain -> finetune

    # data
    dataset: Literal["digits", "mnist", "cifar10", "stsb"] = "digits"
    dataset_path: Optional[str] = None  # local copy: save_to_disk dir or parquet/csv/json files per split
    num_train_samples: int = Field(1000, ge=-1)  # -1 (or more than available) = all
    num_test_samples: int = Field(1000, ge=-1)
    samples_rnd_seed: int = 192  # subsampling, label sets and label modification
    num_labels_per_sample: int = Field(5, ge=1)  # m: 5 for MNIST/CIFAR10, 3 for STS-B
    use_label_sets: bool = False  # pretraining loss: CE to uniform over the m-label set
    frac_samples_to_modify_labels: float = Field(0.1, ge=0, le=1)
    # model / policy
    model: ControlledModel = ControlledMLP()
    init_rnd_seed: int = 111  # weights, batch order and REINFORCE samples
    temperature: float = Field(1.0, gt=0)  # policy = softmax(logits / temperature)
    init_checkpoint: Optional[str] = None  # filled by `from_stage: pretrain`
    # objective
    opt_method: Literal["supervised", "expected_reinforce", "reinforce"] = "supervised"
    reward_type: Literal["labels", "labels_with_custom"] = "labels"
    min_reward: float = -1.0  # reward of a wrong label (correct: +1)
    modified_incorrect_reward: float = 0.5  # labels_with_custom: wrong label on a modified input
    kl_regularization_coeff: float = Field(0.0, ge=0)
    kl_reference: Literal["initial", "uniform"] = "initial"
    # optimisation
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(512, ge=1)
    num_epochs: int = Field(5000, ge=1)  # finetune plans: 5,000; pretrain plans: 1,000
    # bookkeeping
    log_every: int = Field(1, ge=1)  # epochs between metric rows (finetune plans validate every epoch)
    checkpoint_every: int = Field(100, ge=0)  # epochs between checkpoints; 0 = only at the end
    eval_batch_size: int = Field(1024, ge=1)  # chunk size of the metric passes

    @model_validator(mode="after")
    def _consistent(self):
        num_classes = CONTROLLED_NUM_CLASSES[self.dataset]
        if (self.dataset == "stsb") != (self.model.type == "bert-mini"):
            raise ValueError("dataset 'stsb' goes with model type 'bert-mini' and only with it")
        if self.use_label_sets and self.num_labels_per_sample < 2:
            raise ValueError("use_label_sets needs num_labels_per_sample >= 2")
        if self.use_label_sets and self.opt_method != "supervised":
            raise ValueError("use_label_sets (pretraining) supports only opt_method 'supervised'")
        if self.use_label_sets and self.frac_samples_to_modify_labels > 0:
            raise ValueError("use_label_sets (pretraining) trains on the label sets; set frac_samples_to_modify_labels: 0")
        if self.num_labels_per_sample > num_classes - (1 if self.frac_samples_to_modify_labels > 0 else 0):
            raise ValueError(
                f"num_labels_per_sample={self.num_labels_per_sample} leaves no label outside the set "
                f"for {self.dataset} ({num_classes} classes)"
            )
        return self


WORKLOADS["controlled"] = (ControlledConfig, "workloads.controlled:run_controlled")
