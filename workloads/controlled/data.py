"""Data of the controlled finetunes: images or sentence pairs, their m-label sets
and the modified labels (paper section 4.2; apple/ml-rlgrad sft_vs_rft/).

Every input x gets a set S(x) of m labels -- its true label plus m-1 others
drawn once per class -- for pretraining, and a fraction of the train inputs get
a finetuning label OUTSIDE S(x), which the pretrained policy gives almost no
probability: their reward std is tiny.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..core.availability import DatasetNotAvailableError
from ..core.local_data import load_local_split
from .config import CONTROLLED_HUB_DATASETS, CONTROLLED_NUM_CLASSES, ControlledConfig


# ============================================================================
# 1. Data
# ============================================================================

# Hugging Face dataset ids (path, config name, train split, test split) live in
# config.py so that validation can check them without importing torch.
HUB_DATASETS = CONTROLLED_HUB_DATASETS
# per-channel mean / std of the pixel values scaled to [0, 1] (the original's constants)
PIXEL_NORMALISATION = {
    "digits": ([0.3053], [0.3760]),  # scikit-learn digits, pixels 0..16 scaled by 1/16
    "mnist": ([0.1307], [0.3081]),
    "cifar10": ([0.491, 0.482, 0.446], [0.247, 0.243, 0.261]),
}
IMAGE_COLUMNS = ("image", "img", "pixels")
TEST_SPLIT_NAMES = ("test", "validation")


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


def _unavailable(config: ControlledConfig, why: str) -> DatasetNotAvailableError:
    hub = HUB_DATASETS.get(config.dataset)
    hub_text = f"Hugging Face dataset {hub[0]!r}" + (f" (config {hub[1]!r})" if hub and hub[1] else "") if hub else ""
    return DatasetNotAvailableError(
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
    root = config.dataset_path
    if not os.path.isdir(root):
        raise _unavailable(config, f"dataset_path {root!r} is not a directory")
    train = load_local_split(root, "train")
    test = next((t for t in (load_local_split(root, s) for s in TEST_SPLIT_NAMES) if t is not None), None)
    if train is None or test is None:
        raise _unavailable(config, f"dataset_path {root!r} needs a train and a test (or validation) split "
                                   "(a save_to_disk dataset, or train.* and test.* files)")
    return train, test


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
        raise DatasetNotAvailableError(
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
