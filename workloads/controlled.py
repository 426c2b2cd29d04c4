"""Controlled finetunes: SFT vs RFT on classifiers (paper section 4.2).

A classifier's softmax over classes is the policy pi(y|x) = softmax(f(x) / T).

1. Pretrain (`use_label_sets: true`): every input x gets a set S(x) of m
   labels -- its true label plus m-1 others drawn once per class -- and the
   loss is the cross-entropy to the uniform distribution over S(x).
2. Finetune from that checkpoint on single labels, where a fraction of the
   train inputs get a new label OUTSIDE S(x). The pretrained policy gives that
   label almost no probability, so the reward std of those inputs is tiny and
   (paper, Theorem 1) the expected RFT gradient on them vanishes, while SFT's
   cross-entropy gradient does not.

The file reads top to bottom: data -> models -> rewards and objectives ->
metrics per group (modified = "small reward std" / unmodified) -> training
loop with checkpoints. Semantics follow apple/ml-rlgrad sft_vs_rft/.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from .configs import CONTROLLED_HUB_DATASETS, CONTROLLED_NUM_CLASSES, ControlledConfig
from .context import WorkloadContext


# ============================================================================
# 1. Data
# ============================================================================

# Hugging Face dataset ids: (path, config name, train split, test split); in
# configs.py so that validation can check them without importing torch.
HUB_DATASETS = CONTROLLED_HUB_DATASETS
# per-channel mean / std of the pixel values scaled to [0, 1] (the original's constants)
PIXEL_NORMALISATION = {
    "digits": ([0.3053], [0.3760]),  # scikit-learn digits, pixels 0..16 scaled by 1/16
    "mnist": ([0.1307], [0.3081]),
    "cifar10": ([0.491, 0.482, 0.446], [0.247, 0.243, 0.261]),
}
IMAGE_COLUMNS = ("image", "img", "pixels")
TEST_SPLIT_NAMES = ("test", "validation")


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither reachable on the hub nor given as a local copy."""


@dataclass
class ControlledData:
    train_inputs: object  # Inputs
    train_labels: torch.Tensor  # [N] finetuning targets (modified where train_modified)
    train_label_sets: torch.Tensor  # [N, m] pretraining label sets, column 0 = true label
    train_modified: torch.Tensor  # [N] bool: the label was moved outside the set
    test_inputs: object  # Inputs
    test_labels: torch.Tensor  # [M] true labels
    test_label_sets: torch.Tensor  # [M, m]
    num_classes: int
    input_shape: tuple  # one image's shape (C, H, W); () for token inputs


def _unavailable(config: ControlledConfig, why: str) -> DatasetUnavailableError:
    hub = HUB_DATASETS.get(config.dataset)
    hub_text = f"Hugging Face dataset {hub[0]!r}" + (f" (config {hub[1]!r})" if hub and hub[1] else "") if hub else ""
    return DatasetUnavailableError(
        f"dataset {config.dataset!r} is not available ({why}). "
        f"{'It loads from the ' + hub_text + ' when the hub is reachable; otherwise ' if hub else ''}"
        f"point `dataset_path` at a local copy: a directory written by datasets' save_to_disk, or one with "
        f"train.parquet / test.parquet (or .csv / .jsonl) files"
        + (" (STS-B: train and validation, columns sentence1, sentence2, label)" if config.dataset == "stsb"
           else " (columns: image, label)")
    )


def load_raw_splits(config: ControlledConfig):
    """(train, test) as Hugging Face `datasets.Dataset`s with an image or sentence-pair column and `label`."""
    import datasets

    if config.dataset == "digits":
        # scikit-learn's 8x8 handwritten digits, offline. No official split: a fixed
        # stratified 70/30 split makes the train and test pools.
        from sklearn.datasets import load_digits

        digits = load_digits()
        train_idx, test_idx = train_test_split(np.arange(len(digits.target)), test_size=0.3,
                                               stratify=digits.target, random_state=0)
        as_dataset = lambda idx: datasets.Dataset.from_dict(  # noqa: E731
            {"image": (digits.images[idx] / 16.0).astype(np.float32), "label": digits.target[idx].astype(np.int64)})
        return as_dataset(train_idx), as_dataset(test_idx)

    if config.dataset_path is not None:
        return _load_local_copy(config)
    path, name, train_split, test_split = HUB_DATASETS[config.dataset]
    try:
        loaded = datasets.load_dataset(path, name)
        return loaded[train_split], loaded[test_split]
    except Exception as e:  # offline, unknown id, no permission, ...
        raise _unavailable(config, f"loading {path!r} from the hub failed: {type(e).__name__}: {e}") from e


def _load_local_copy(config: ControlledConfig):
    import datasets

    root = config.dataset_path
    if not os.path.isdir(root):
        raise _unavailable(config, f"dataset_path {root!r} is not a directory")
    if os.path.exists(os.path.join(root, "dataset_dict.json")):
        loaded = datasets.load_from_disk(root)
    else:
        files = sorted(os.listdir(root))
        data_files, builder = {}, None
        for split in ("train",) + TEST_SPLIT_NAMES:
            for ext, kind in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "json"), (".json", "json")):
                matches = [os.path.join(root, f) for f in files if f.startswith(split) and f.endswith(ext)]
                if matches:
                    data_files[split], builder = matches, kind
                    break
        if "train" not in data_files:
            raise _unavailable(config, f"dataset_path {root!r} holds neither a save_to_disk dataset nor train.* files")
        loaded = datasets.load_dataset(builder, data_files=data_files)
    test_split = next((s for s in TEST_SPLIT_NAMES if s in loaded), None)
    if "train" not in loaded or test_split is None:
        raise _unavailable(config, f"dataset_path {root!r} needs a train and a test (or validation) split; found {list(loaded)}")
    return loaded["train"], loaded[test_split]


def _class_labels(split, dataset: str) -> np.ndarray:
    labels = np.asarray(split["label"])
    if dataset == "stsb":
        # STS-B similarity scores 0..5 rounded to 6 classes (Python's round, as the original)
        labels = np.array([round(float(score)) for score in labels])
    return labels.astype(np.int64)


def _subsample(labels: np.ndarray, num_samples: int, rng: np.random.RandomState) -> np.ndarray:
    """Stratified choice of num_samples indices; all of them when num_samples is -1 or too large."""
    if not 0 < num_samples < len(labels):
        return np.arange(len(labels))
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=num_samples, stratify=labels, random_state=rng)
    return np.asarray(chosen)


def _decode_images(split, indices: np.ndarray, dataset: str) -> torch.Tensor:
    column = next((c for c in IMAGE_COLUMNS if c in split.column_names), None)
    if column is None:
        raise ValueError(f"dataset {dataset!r}: no image column; expected one of {IMAGE_COLUMNS}, got {split.column_names}")
    images = []
    for image in split.select(indices.tolist())[column]:  # PIL images or (nested) arrays
        array = np.asarray(image)
        # integer pixels are 0..255; float pixels are taken as already in [0, 1]
        array = array.astype(np.float32) / 255.0 if array.dtype.kind in "iub" else array.astype(np.float32)
        if array.ndim == 2:
            array = array[None]  # grey: (1, H, W)
        elif array.ndim == 3 and array.shape[-1] in (1, 3):
            array = array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
        images.append(array)
    pixels = torch.from_numpy(np.stack(images))
    mean, std = PIXEL_NORMALISATION[dataset]
    if len(mean) != pixels.shape[1]:
        raise ValueError(f"dataset {dataset!r}: images have {pixels.shape[1]} channels, expected {len(mean)}")
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _tokenize_pairs(split, indices: np.ndarray, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    rows = split.select(indices.tolist())
    # padded to the longest pair of the split; with the attention mask this gives
    # the same logits as the original's padding to 512, at a fraction of the cost
    encoded = tokenizer(list(rows["sentence1"]), list(rows["sentence2"]), truncation=True,
                        max_length=max_length, padding="longest", return_tensors="pt")
    return {k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded}


def load_tokenizer(name_or_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as e:
        raise DatasetUnavailableError(
            f"tokenizer {name_or_dir!r} is not available ({type(e).__name__}); set model.tokenizer to a local "
            f"tokenizer directory (save_pretrained) when the hub is unreachable"
        ) from e


def draw_label_sets(num_classes: int, num_labels_per_sample: int, generator: torch.Generator) -> torch.Tensor:
    """[num_classes, m]: row c is c followed by m-1 other classes in random order.

    Drawn once per CLASS (not per input), so all inputs of a class share a set."""
    rows = []
    for c in range(num_classes):
        others = torch.tensor([k for k in range(num_classes) if k != c])
        order = torch.randperm(num_classes - 1, generator=generator)
        rows.append(torch.cat([torch.tensor([c]), others[order[: num_labels_per_sample - 1]]]))
    return torch.stack(rows)


def modify_labels(labels: torch.Tensor, label_sets: torch.Tensor, frac: float, num_classes: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Give int(frac * N) random inputs a label drawn uniformly from the classes
    OUTSIDE their label set. Returns (new labels, modified indicator)."""
    num_inputs = labels.shape[0]
    num_to_modify = int(num_inputs * frac)
    chosen = torch.randperm(num_inputs, generator=generator)[:num_to_modify]
    outside = torch.ones(num_to_modify, num_classes, dtype=torch.bool)
    outside[torch.arange(num_to_modify).unsqueeze(1), label_sets[chosen]] = False
    num_outside = num_classes - label_sets.shape[1]  # set members are distinct
    candidates = torch.arange(num_classes).expand(num_to_modify, -1)[outside].view(num_to_modify, num_outside)
    pick = torch.randint(0, num_outside, (num_to_modify,), generator=generator)
    new_labels = labels.clone()
    new_labels[chosen] = candidates[torch.arange(num_to_modify), pick]
    modified = torch.zeros(num_inputs, dtype=torch.bool)
    modified[chosen] = True
    return new_labels, modified


def load_controlled_data(config: ControlledConfig) -> ControlledData:
    """Load, subsample (stratified), attach label sets and modify labels.

    Everything random here is fixed by samples_rnd_seed, so a pretrain and a
    finetune run with the same seed see the same inputs and label sets."""
    raw_train, raw_test = load_raw_splits(config)
    num_classes = CONTROLLED_NUM_CLASSES[config.dataset]
    train_all_labels = _class_labels(raw_train, config.dataset)
    test_all_labels = _class_labels(raw_test, config.dataset)
    for name, labels in (("train", train_all_labels), ("test", test_all_labels)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"dataset {config.dataset!r} {name}: labels must lie in 0..{num_classes - 1}")

    rng = np.random.RandomState(config.samples_rnd_seed)
    train_idx = _subsample(train_all_labels, config.num_train_samples, rng)
    test_idx = _subsample(test_all_labels, config.num_test_samples, rng)
    train_labels = torch.from_numpy(train_all_labels[train_idx])
    test_labels = torch.from_numpy(test_all_labels[test_idx])

    if config.dataset == "stsb":
        tokenizer = load_tokenizer(config.model.tokenizer)
        train_inputs = _tokenize_pairs(raw_train, train_idx, tokenizer, config.model.max_length)
        test_inputs = _tokenize_pairs(raw_test, test_idx, tokenizer, config.model.max_length)
        input_shape = ()
    else:
        train_inputs = _decode_images(raw_train, train_idx, config.dataset)
        test_inputs = _decode_images(raw_test, test_idx, config.dataset)
        input_shape = tuple(train_inputs.shape[1:])

    generator = torch.Generator().manual_seed(config.samples_rnd_seed)
    per_class_sets = draw_label_sets(num_classes, config.num_labels_per_sample, generator)
    train_label_sets, test_label_sets = per_class_sets[train_labels], per_class_sets[test_labels]
    finetune_labels, modified = modify_labels(train_labels, train_label_sets, config.frac_samples_to_modify_labels,
                                              num_classes, generator)
    return ControlledData(train_inputs, finetune_labels, train_label_sets, modified, test_inputs, test_labels,
                          test_label_sets, num_classes, input_shape)


def take(inputs, index: torch.Tensor):
    """Rows `index` of a tensor or of every tensor in a dict."""
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def num_rows(inputs) -> int:
    return next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]


def to_device(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


# ============================================================================
# 2. Models: f(x) -> logits over classes
# ============================================================================


class MLP(nn.Module):
    def __init__(self, input_size: int, hidden_sizes: list[int], num_classes: int):
        super().__init__()
        layers, width = [nn.Flatten()], input_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class HuggingFaceLogits(nn.Module):
    """A transformers classifier as a plain inputs -> logits module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model(**x) if isinstance(x, dict) else self.model(pixel_values=x)).logits


def build_resnet18(num_channels: int, num_classes: int, stem: str) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.resnet.modeling_resnet import ResNetConvLayer

    resnet_config = ResNetConfig(num_channels=num_channels, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                 depths=[2, 2, 2, 2], layer_type="basic", num_labels=num_classes)
    model = ResNetForImageClassification(resnet_config)
    if stem == "cifar":
        # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep the spatial resolution
        model.resnet.embedder.embedder = ResNetConvLayer(num_channels, 64, kernel_size=3, stride=1)
        model.resnet.embedder.pooler = nn.Identity()
    return HuggingFaceLogits(model)


def build_bert_mini(vocab_size: int, pad_token_id: int, num_classes: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    # prajjwal1/bert-mini's shape, randomly initialised, all dropout off (as the original)
    bert_config = BertConfig(vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=1024, max_position_embeddings=512, type_vocab_size=2,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                             pad_token_id=pad_token_id or 0, num_labels=num_classes)
    return HuggingFaceLogits(BertForSequenceClassification(bert_config))


def build_model(config: ControlledConfig, data: ControlledData) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_rnd_seed)  # same init for every trial of a seed
        if config.model.type == "mlp":
            return MLP(math.prod(data.input_shape), list(config.model.hidden_sizes), data.num_classes)
        if config.model.type == "resnet18":
            return build_resnet18(data.input_shape[0], data.num_classes, config.model.stem)
        tokenizer = load_tokenizer(config.model.tokenizer)
        return build_bert_mini(len(tokenizer), tokenizer.pad_token_id, data.num_classes)


def log_policy(model: nn.Module, inputs, temperature: float) -> torch.Tensor:
    """log pi(y|x) = log softmax(f(x) / T), shape [B, num_classes]."""
    return F.log_softmax(model(inputs) / temperature, dim=-1)


# ============================================================================
# 3. Rewards and objectives (every function returns one value per input)
# ============================================================================


def reward_table(labels: torch.Tensor, modified: torch.Tensor, config: ControlledConfig, num_classes: int) -> torch.Tensor:
    """r(x, y) for every class y, shape [B, C].

    labels:              +1 for the target label, min_reward (-1) otherwise.
    labels_with_custom:  as labels, but a wrong label on a MODIFIED input earns
                         modified_incorrect_reward (0.5): the high-initial-reward setting."""
    wrong = torch.full(labels.shape, config.min_reward, dtype=torch.float32, device=labels.device)
    if config.reward_type == "labels_with_custom":
        wrong = torch.where(modified, torch.full_like(wrong, config.modified_incorrect_reward), wrong)
    rewards = wrong.unsqueeze(1).repeat(1, num_classes)
    rewards[torch.arange(labels.shape[0], device=labels.device), labels] = 1.0
    return rewards


def expected_reward(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """V(x) = sum_y pi(y|x) r(x, y)."""
    return (log_probs.exp() * rewards).sum(-1)


def reward_std(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """std_{y ~ pi(.|x)} r(x, y) = sqrt(sum_y pi (r - V)^2): Theorem 1's quantity."""
    probs = log_probs.exp()
    mean = (probs * rewards).sum(-1, keepdim=True)
    return (probs * (rewards - mean) ** 2).sum(-1).clamp_min(0).sqrt()


def kl_to_reference(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) = sum_y pi log(pi / pi_ref), exact over all classes."""
    return (log_probs.exp() * (log_probs - reference_log_probs)).sum(-1)


def per_input_loss(method: str, log_probs: torch.Tensor, labels: torch.Tensor, label_sets: torch.Tensor | None,
                   rewards: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The quantity each method MINIMISES, per input (mean it over a batch).

    supervised, label sets:  -(1/m) sum_{j in S(x)} log pi(j|x)   (CE to uniform over S(x))
    supervised:              -log pi(y*|x)
    expected_reinforce:      -sum_y pi(y|x) r(x, y); its gradient is the exact
                             policy gradient E_y[r grad log pi] over all classes
    reinforce:               -r(x, y) log pi(y|x) with one y ~ pi(.|x) (no baseline,
                             as the original), an unbiased estimate of the above
    """
    if method == "supervised":
        if label_sets is not None:
            return -log_probs.gather(1, label_sets).mean(-1)
        return -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    if method == "expected_reinforce":
        return -expected_reward(log_probs, rewards)
    if method == "reinforce":
        sampled = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)
        return -rewards.gather(1, sampled).squeeze(1) * log_probs.gather(1, sampled).squeeze(1)
    raise ValueError(f"unknown opt_method {method!r}")


class Objective:
    """The finetuning objective of a config: method loss + KL coefficient * KL(pi || reference)."""

    def __init__(self, config: ControlledConfig, data: ControlledData, reference_model: nn.Module | None):
        self.config, self.data, self.reference_model = config, data, reference_model
        self.train_rewards = reward_table(data.train_labels, data.train_modified, config, data.num_classes)

    def loss_terms(self, model: nn.Module, inputs, index: torch.Tensor, method: str,
                   generator: torch.Generator | None = None):
        """(per-input objective, log pi) for train rows `index`."""
        log_probs = log_policy(model, inputs, self.config.temperature)
        label_sets = self.data.train_label_sets[index] if self.config.use_label_sets else None
        terms = per_input_loss(method, log_probs, self.data.train_labels[index], label_sets,
                               self.train_rewards[index], generator)
        if self.config.kl_regularization_coeff > 0:
            terms = terms + self.config.kl_regularization_coeff * self.kl(inputs, log_probs)
        return terms, log_probs

    def kl(self, inputs, log_probs: torch.Tensor) -> torch.Tensor:
        if self.config.kl_reference == "uniform":
            reference = torch.full_like(log_probs, -math.log(self.data.num_classes))
        else:
            with torch.no_grad():
                reference = log_policy(self.reference_model, inputs, self.config.temperature)
        return kl_to_reference(log_probs, reference)


# ============================================================================
# 4. Metrics, separately for modified ("small reward std") and unmodified inputs
# ============================================================================


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def param_norm(model: nn.Module) -> float:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm().item()


def measure(model: nn.Module, objective: Objective, config: ControlledConfig, data: ControlledData) -> dict[str, dict]:
    """Metrics of the current model: {split: {metric: value}}.

    Evaluated in eval mode (BatchNorm running statistics) over the WHOLE group,
    in chunks. The gradient norm of a group is ||grad of the mean objective over
    that group|| -- for the RL methods the exact expected-reward objective (the
    quantity Theorem 1 bounds), for SFT the cross-entropy. The train gradient
    is their input-weighted combination."""
    was_training = model.training
    model.eval()
    method = "expected_reinforce" if config.opt_method == "reinforce" else config.opt_method
    theta_norm = param_norm(model)
    groups = {"modified": data.train_modified, "unmodified": ~data.train_modified}
    results, weighted_grad, num_train = {}, None, data.train_labels.shape[0]
    for split, members in groups.items():
        index_all = members.nonzero().squeeze(1)
        n = index_all.shape[0]
        if n == 0:
            continue
        model.zero_grad(set_to_none=True)
        sums = dict.fromkeys(["objective", "loss", "accuracy", "reward", "reward_std"], 0.0)
        for index in index_all.split(config.eval_batch_size):
            index = index.to(data.train_labels.device)
            inputs = take(data.train_inputs, index)
            terms, log_probs = objective.loss_terms(model, inputs, index, method)
            (terms.sum() / n).backward()  # accumulates grad of the group mean
            with torch.no_grad():
                rewards = objective.train_rewards[index]
                targets = data.train_labels[index]
                if config.use_label_sets:  # pretraining: CE to uniform over the set; hit = argmax in the set
                    sets = data.train_label_sets[index]
                    loss = -log_probs.gather(1, sets).mean(-1)
                    hit = (sets == log_probs.argmax(-1, keepdim=True)).any(-1)
                else:
                    loss = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
                    hit = log_probs.argmax(-1) == targets
                sums["objective"] += terms.sum().item()
                sums["loss"] += loss.sum().item()
                sums["accuracy"] += hit.float().sum().item()
                sums["reward"] += expected_reward(log_probs, rewards).sum().item()
                sums["reward_std"] += reward_std(log_probs, rewards).sum().item()
        grad = flat_grad(model)
        grad_norm = grad.norm().item()
        results[split] = {k: v / n for k, v in sums.items()}
        results[split].update(grad_norm=grad_norm, normalized_grad_norm=grad_norm / theta_norm, num_inputs=n)
        weighted_grad = grad * (n / num_train) if weighted_grad is None else weighted_grad + grad * (n / num_train)
    model.zero_grad(set_to_none=True)

    train = {k: sum(results[g][k] * results[g]["num_inputs"] for g in results) / num_train
             for k in ("objective", "loss", "accuracy", "reward", "reward_std")}
    train_grad_norm = weighted_grad.norm().item()
    train.update(grad_norm=train_grad_norm, normalized_grad_norm=train_grad_norm / theta_norm, param_norm=theta_norm)
    for split in results:
        results[split].pop("num_inputs")
    results["train"] = train
    results["test"] = evaluate_test(model, config, data)
    model.train(was_training)
    return results


@torch.no_grad()
def evaluate_test(model: nn.Module, config: ControlledConfig, data: ControlledData) -> dict[str, float]:
    n = data.test_labels.shape[0]
    sums = dict.fromkeys(["loss", "accuracy", "reward"], 0.0)
    for index in torch.arange(n, device=data.test_labels.device).split(config.eval_batch_size):
        log_probs = log_policy(model, take(data.test_inputs, index), config.temperature)
        targets = data.test_labels[index]
        if config.use_label_sets:
            sets = data.test_label_sets[index]
            sums["loss"] += -log_probs.gather(1, sets).mean(-1).sum().item()
            sums["accuracy"] += (sets == log_probs.argmax(-1, keepdim=True)).any(-1).float().sum().item()
        else:
            sums["loss"] += -log_probs.gather(1, targets.unsqueeze(1)).sum().item()
            sums["accuracy"] += (log_probs.argmax(-1) == targets).float().sum().item()
        no_modification = torch.zeros_like(targets, dtype=torch.bool)  # test labels are never modified
        sums["reward"] += expected_reward(log_probs, reward_table(targets, no_modification, config, data.num_classes)).sum().item()
    return {k: v / n for k, v in sums.items()}


# ============================================================================
# 5. Training loop, checkpoints
# ============================================================================

MODEL_FILE = "model.pt"
TRAINING_STATE_FILE = "training_state.pt"


def load_model_weights(model: nn.Module, checkpoint: str, device) -> None:
    """Load a state dict from a checkpoint directory (model.pt) or a file."""
    if checkpoint.startswith("@"):
        raise ValueError(f"init_checkpoint {checkpoint!r} is an unresolved from_stage reference; "
                         f"the orchestrator replaces it with the earlier stage's checkpoint directory")
    path = os.path.join(checkpoint, MODEL_FILE) if os.path.isdir(checkpoint) else checkpoint
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_checkpoint: no {MODEL_FILE} at {checkpoint!r}")
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def save_checkpoint(model, optimizer, epoch: int, generators: dict, config: ControlledConfig) -> str:
    directory = tempfile.mkdtemp(prefix="rlgrad-controlled-")
    torch.save(model.state_dict(), os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch,
                "generators": {k: g.get_state() for k, g in generators.items()}},
               os.path.join(directory, TRAINING_STATE_FILE))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.model_dump(mode="json"), f, indent=1)
    return directory


def make_optimizer(config: ControlledConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def run_controlled(config: ControlledConfig, ctx: WorkloadContext) -> dict:
    if ctx.world_size > 1:
        raise ValueError("the controlled workload runs on one worker (its models fit one device in seconds "
                         "per epoch); set scaling.num_workers: 1")
    device = torch.device(ctx.device)
    data = load_controlled_data(config)
    for name in ("train_inputs", "test_inputs"):
        setattr(data, name, to_device(getattr(data, name), device))
    for name in ("train_labels", "train_label_sets", "train_modified", "test_labels", "test_label_sets"):
        setattr(data, name, getattr(data, name).to(device))

    model = build_model(config, data).to(device)
    if config.init_checkpoint:
        load_model_weights(model, config.init_checkpoint, device)
    reference_model = None
    if config.kl_regularization_coeff > 0 and config.kl_reference == "initial":
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)  # the model finetuning starts from
    objective = Objective(config, data, reference_model)
    optimizer = make_optimizer(config, model)
    generators = {
        "batch_order": torch.Generator().manual_seed(config.init_rnd_seed),
        "samples": torch.Generator(device=device).manual_seed(config.init_rnd_seed + 1),  # REINFORCE's y ~ pi
    }

    start_epoch = 0
    if ctx.resume_from:
        load_model_weights(model, ctx.resume_from, device)
        state = torch.load(os.path.join(ctx.resume_from, TRAINING_STATE_FILE), map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name].cpu())
        start_epoch = int(state["epoch"])

    def log_and_report(epoch: int, with_checkpoint: bool) -> dict:
        results = measure(model, objective, config, data)
        for split, values in results.items():
            ctx.log_metrics(epoch, values, split=split)
        flat = {"epoch": epoch, **{f"{split}/{k}": v for split, values in results.items() for k, v in values.items()}}
        checkpoint_dir = save_checkpoint(model, optimizer, epoch, generators, config) if with_checkpoint else None
        try:
            ctx.report(flat, checkpoint_dir=checkpoint_dir)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if ctx.show_progress and ctx.is_main:
            groups = " ".join(f"{g}: acc {results[g]['accuracy']:.3f} grad {results[g]['grad_norm']:.2e}"
                              for g in ("modified", "unmodified") if g in results)
            print(f"[controlled {config.opt_method}] epoch {epoch}/{config.num_epochs} "
                  f"train acc {results['train']['accuracy']:.3f} test acc {results['test']['accuracy']:.3f} {groups}",
                  flush=True)
        return flat

    last = None
    if start_epoch == 0:
        last = log_and_report(0, with_checkpoint=False)  # the starting point: initial grad norms
    num_train = data.train_labels.shape[0]
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        model.train()
        order = torch.randperm(num_train, generator=generators["batch_order"]).to(device)
        for index in order.split(config.batch_size):
            terms, _ = objective.loss_terms(model, take(data.train_inputs, index), index, config.opt_method,
                                            generators["samples"])
            optimizer.zero_grad(set_to_none=True)
            terms.mean().backward()
            optimizer.step()
        is_last = epoch == config.num_epochs
        wants_checkpoint = is_last or (config.checkpoint_every > 0 and epoch % config.checkpoint_every == 0)
        if wants_checkpoint or epoch % config.log_every == 0:
            last = log_and_report(epoch, with_checkpoint=wants_checkpoint)
    return last or {}
