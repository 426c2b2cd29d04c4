"""The config of the controlled finetunes (workloads/controlled/finetune.py). Torch-free.

Classifier "policies" pretrained on label sets, then finetuned with SFT or RFT
(paper section 4.2; apple/ml-rlgrad sft_vs_rft/experiment/sft_vs_rft_controlled_experiment.py
documents the reference's options).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import Field, model_validator

from ..core.availability import check_dataset_available
from ..core.config import StrictConfig

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

    type: Literal["mlp"] = Field("mlp", description="model kind")
    hidden_sizes: list[int] = Field([250, 100], description="hidden layer widths (paper: 250, 100)")


class ControlledResNet18(StrictConfig):
    """ResNet18 (basic blocks, depths 2-2-2-2) built from transformers' ResNetConfig."""

    type: Literal["resnet18"] = Field("resnet18", description="model kind")
    stem: Literal["cifar", "imagenet"] = Field("cifar", description=(
        "cifar: 3x3 stride-1 stem without max-pool (suits 32x32 images); "
        "imagenet: the 7x7 stride-2 stem + max-pool the original project used"))


class ControlledBertMini(StrictConfig):
    """BERT-mini (4 layers, hidden 256, 4 heads), random init, dropout 0."""

    type: Literal["bert-mini"] = Field("bert-mini", description="model kind")
    tokenizer: str = Field("prajjwal1/bert-mini", description="hub id or a local tokenizer directory")
    max_length: int = Field(512, ge=8, description="truncation of a sentence pair (original: 512)")


ControlledModel = Annotated[
    Union[ControlledMLP, ControlledResNet18, ControlledBertMini], Field(discriminator="type")
]


class ControlledConfig(StrictConfig):
    """Controlled experiment (section 4.2): label-set pretraining, then SFT vs RFT.

    Pretrain a classifier so that each input spreads its probability over a
    set of m labels, then finetune on single labels, 10% of which lie outside
    the input's set (tiny reward std).

    Defaults are the reference plans' (MNIST/MLP finetune with Adam), except
    `dataset`, which defaults to scikit-learn's offline digits."""

    checkpoint_field: ClassVar[str] = "init_checkpoint"  # what `from_stage:` fills in
    produces_checkpoint: ClassVar[bool] = True  # pretrain -> finetune

    # data
    dataset: Literal["digits", "mnist", "cifar10", "stsb"] = Field("digits", description="digits = scikit-learn's 8x8 digits (offline MNIST stand-in)")
    dataset_path: Optional[str] = Field(None, description="local copy: save_to_disk dir or parquet/csv/json files per split")
    num_train_samples: int = Field(1000, ge=-1, description="train inputs (paper: 1,000 MNIST, 10,000 CIFAR10); -1 = all")
    num_test_samples: int = Field(1000, ge=-1, description="test inputs (paper: 1,000); -1 = all")
    samples_rnd_seed: int = Field(192, description="seed of subsampling, label sets and label modification (paper: 192)")
    num_labels_per_sample: int = Field(5, ge=1, description="m labels per input in pretraining (paper: 5 MNIST/CIFAR10, 3 STS-B)")
    use_label_sets: bool = Field(False, description="pretraining: cross-entropy to uniform over the m-label set")
    frac_samples_to_modify_labels: float = Field(0.1, ge=0, le=1, description="fraction of train inputs given a label outside their set (paper: 0.1)")
    # model / policy
    model: ControlledModel = Field(ControlledMLP(), description="the classifier: mlp | resnet18 | bert-mini")
    init_rnd_seed: int = Field(111, description="seed of weights, batch order and REINFORCE samples (paper: 111)")
    temperature: float = Field(1.0, gt=0, description="policy = softmax(logits / temperature) (paper: 1)")
    init_checkpoint: Optional[str] = Field(None, description="weights to start from; `from_stage: pretrain` fills it")
    # objective
    opt_method: Literal["supervised", "expected_reinforce", "reinforce"] = Field("supervised", description=(
        "supervised = cross-entropy; expected_reinforce = exact gradient of expected reward; reinforce = sampled"))
    reward_type: Literal["labels", "labels_with_custom"] = Field("labels", description=(
        "labels: +1 correct, min_reward otherwise; labels_with_custom: modified_incorrect_reward for a "
        "wrong prediction on a modified input (the high-initial-reward setting)"))
    min_reward: float = Field(-1.0, description="reward of a wrong label (correct: +1)")
    modified_incorrect_reward: float = Field(0.5, description="labels_with_custom: reward of a wrong label on a modified input")
    kl_regularization_coeff: float = Field(0.0, ge=0, description="weight of a KL penalty to kl_reference")
    kl_reference: Literal["initial", "uniform"] = Field("initial", description="KL to the initial model or to uniform")
    # optimisation
    optimizer: Literal["adam", "sgd"] = Field("adam", description="paper: Adam (lr 1e-4) or SGD (lr 1e-2 MLP/ResNet, 1e-3 BERT)")
    learning_rate: float = Field(1e-4, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    batch_size: int = Field(512, ge=1, description="train inputs per optimiser step (paper: 512)")
    num_epochs: int = Field(5000, ge=1, description="finetune plans: 5,000; pretrain plans: 1,000")
    # bookkeeping
    log_every_epochs: int = Field(1, ge=1, description="epochs between metric rows (finetune plans validate every epoch)")
    checkpoint_every_epochs: int = Field(100, ge=0, description="epochs between checkpoints; 0 = only at the end")
    eval_batch_size: int = Field(1024, ge=1, description="chunk size of the metric passes")

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
        hub = CONTROLLED_HUB_DATASETS.get(self.dataset)
        check_dataset_available(self.dataset, hub[0] if hub else None, self.dataset_path)
        return self
