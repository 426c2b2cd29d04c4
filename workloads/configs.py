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

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

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


class TextTaskConfig(StrictConfig):
    """What every language-model workload (extract, sft, ppo) names: a model, a
    text task, the task's data and a reward -- all checked here, at validation,
    so a sweep fails before any worker starts: unknown task or reward, bad reward
    arguments, METEOR without WordNet data, a learned reward's model, the model
    or the dataset unavailable (no local copy, no cache, no hub)."""

    checkpoint_field: ClassVar[str] = "model"  # what `from_stage:` fills in

    model: str = "builtin:tiny-gpt2"  # built-in, a local checkpoint directory, or a hub id
    task: str = "reverse"  # built-in offline task, or a GRUE task (workloads/grue.py)
    dataset_path: Optional[str] = None  # GRUE: local copy (save_to_disk dir or <split>.parquet/.jsonl/.csv)
    reward: str = "task"  # "task" = the task's default reward (workloads.tasks.default_reward)
    reward_args: dict[str, Any] = {}  # arguments of a named reward (workloads/rewards.py)

    @model_validator(mode="after")
    def _task_reward_model_and_data_can_run(self):
        from .availability import check_model_available, check_task_data
        from .tasks import check_task_and_reward

        check_task_and_reward(self.task, self.reward, self.reward_args)
        check_model_available(self.model)
        check_task_data(self.task, self.dataset_path)
        return self


class ExtractConfig(TextTaskConfig):
    """Sample extraction (paper section 4): K samples per input, their rewards,
    per-input reward mean/std and the per-input policy-gradient norm."""

    produces_checkpoint: ClassVar[bool] = False

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


class SFTConfig(TextTaskConfig):
    """Teacher-forced cross-entropy finetuning for causal and seq2seq models.
    The paper gives no SFT hyperparameters; these defaults are the usual
    Hugging Face Trainer ones, small enough for the built-in task."""

    produces_checkpoint: ClassVar[bool] = True

    # (reward: the held-out evaluation's)
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


class NoopConfig(StrictConfig):
    """A workload that does no science: for checking a cluster, the orchestrator's
    overhead and its load behaviour. Reports `objective = -(x - 1)^2`, so a
    search over `x` has a known optimum."""

    checkpoint_field: ClassVar[str] = "init_checkpoint"
    produces_checkpoint: ClassVar[bool] = False

    x: float = 0.0
    sleep_s: float = Field(0.0, ge=0)  # per report
    num_reports: int = Field(1, ge=1)
    init_checkpoint: Optional[str] = None


class PPOConfig(TextTaskConfig):
    """Actor-critic PPO on a language model (paper sections 4-5: "PPO" from the
    pretrained model and "PPO on supervised" from an SFT checkpoint), with a
    live monitor of per-prompt reward std and gradient norm.

    Defaults are the RL4LMs reference configs the paper used (paper.md, "PPO
    settings"): 5 epochs per rollout, minibatch 64, clip 0.2, lr 2e-6, initial
    KL coefficient 0.001-0.2 with an adaptive target, temperature 1. The
    rollout size (prompts_per_rollout x samples_per_prompt completions) is
    ours: RL4LMs collects 128-512 steps across 10 environments with one
    sample per prompt; K >= 2 samples per prompt make each prompt's reward
    std observable during training."""

    produces_checkpoint: ClassVar[bool] = True  # `from_stage: sft` fills `model` with the SFT checkpoint

    # (model: also the frozen reference model of the KL penalty)
    num_train_inputs: int = Field(5000, ge=1)  # prompts are drawn from this many train inputs
    generation: GenerationConfig = GenerationConfig()  # rollout sampling (paper: temperature 1)
    # rollouts
    num_rollouts: int = Field(100, ge=0)  # PPO iterations (rollout + ppo_epochs of updates); the `step`
    prompts_per_rollout: int = Field(32, ge=1)
    samples_per_prompt: int = Field(4, ge=2)  # K completions per prompt: per-prompt reward std
    # optimisation (RL4LMs reference configs)
    learning_rate: float = Field(2e-6, gt=0)  # paper: 1e-6 to 2e-6 for t5-base / gpt2
    weight_decay: float = Field(0.0, ge=0)
    ppo_epochs: int = Field(5, ge=1)  # passes over each rollout
    minibatch_size: int = Field(64, ge=1)  # completions per optimiser step, summed over workers
    clip_range: float = Field(0.2, gt=0, lt=1)  # policy ratio clip epsilon
    value_clip_range: Optional[float] = Field(0.2, gt=0)  # None: unclipped value loss
    vf_coef: float = Field(0.5, ge=0)
    ent_coef: float = Field(0.0, ge=0)  # paper: 0 or 0.01
    gamma: float = Field(0.99, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    normalize_advantages: bool = True  # whiten advantages over the rollout's tokens
    max_grad_norm: Optional[float] = Field(0.5, gt=0)  # None: no gradient clipping
    # KL penalty to the initial policy and its adaptive controller (Ziegler et al. 2019)
    kl_coef: float = Field(0.01, ge=0)  # initial coefficient; paper: 0.001-0.2
    target_kl: Optional[float] = Field(0.1, gt=0)  # per-sequence KL target; None = fixed kl_coef
    kl_horizon: int = Field(10000, ge=1)  # controller horizon in completions (RL4LMs: 10000)
    # bookkeeping and the monitor
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # rollouts between monitor-set evaluations; 0 = only first and last
    num_eval_inputs: int = Field(64, ge=1)  # fixed monitor set: the first train inputs of the pool
    monitor_reward_std_thresholds: list[float] = [0.01, 0.05, 0.1]
    monitor_grad_norm: bool = True  # per-prompt policy-gradient norms of every rollout
    checkpoint_every: int = Field(0, ge=0)  # rollouts between checkpoints; 0 = only at the end

    @model_validator(mode="after")
    def _consistent(self):
        rollout_size = self.prompts_per_rollout * self.samples_per_prompt
        if self.minibatch_size > rollout_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) exceeds a rollout's "
                             f"{rollout_size} completions (prompts_per_rollout x samples_per_prompt)")
        if self.prompts_per_rollout > self.num_train_inputs:
            raise ValueError(f"prompts_per_rollout ({self.prompts_per_rollout}) exceeds num_train_inputs "
                             f"({self.num_train_inputs})")
        if self.num_eval_inputs > self.num_train_inputs:
            raise ValueError(f"num_eval_inputs ({self.num_eval_inputs}) exceeds num_train_inputs "
                             f"({self.num_train_inputs}): the monitor set is drawn from the train inputs")
        if self.target_kl is not None and self.kl_coef == 0:
            raise ValueError("an adaptive KL controller (target_kl) cannot grow a kl_coef of 0; "
                             "set kl_coef > 0 or target_kl: null")
        thresholds = self.monitor_reward_std_thresholds
        if not thresholds or any(t <= 0 for t in thresholds) or sorted(set(thresholds)) != thresholds:
            raise ValueError(f"monitor_reward_std_thresholds must be positive and strictly increasing, got {thresholds}")
        if self.reward == "task" and self.reward_args:
            raise ValueError("reward_args needs an explicit reward name (reward: task takes no arguments)")
        return self


# name -> (config class, "module:function" of the workload entry point).
# Entry points are imported lazily so that this registry stays torch-free.
WORKLOADS: dict[str, tuple[type[StrictConfig], str]] = {
    "extract": (ExtractConfig, "workloads.extract:run_extract"),
    "sft": (SFTConfig, "workloads.sft:run_sft"),
    "ppo": (PPOConfig, "workloads.ppo:run_ppo"),
    "noop": (NoopConfig, "workloads.noop:run_noop"),
}


# --------------------------------------------------------------------------
# controlled: classifier "policies" pretrained on label sets, then finetuned
# with SFT or RFT (paper section 4.2; apple/ml-rlgrad sft_vs_rft/).
# --------------------------------------------------------------------------

CONTROLLED_NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "stsb": 6}
# Hugging Face dataset ids: (path, config name, train split, test split).
# STS-B's test split has no labels; like the original we test on validation.
CONTROLLED_HUB_DATASETS = {
    "mnist": ("ylecun/mnist", None, "train", "test"),
    "cifar10": ("uoft-cs/cifar10", None, "train", "test"),
    "stsb": ("nyu-mll/glue", "stsb", "train", "validation"),
}


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

    @model_validator(mode="after")
    def _data_can_load(self):  # after the rules above: shape errors first
        from .availability import check_dataset_available

        hub = CONTROLLED_HUB_DATASETS.get(self.dataset)
        check_dataset_available(self.dataset, hub[0] if hub else None, self.dataset_path)
        return self


WORKLOADS["controlled"] = (ControlledConfig, "workloads.controlled:run_controlled")
