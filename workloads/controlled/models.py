"""Models of the controlled finetunes: f(x) -> logits over classes, and the
policy pi(y|x) = softmax(f(x) / T)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ControlledConfig
from .data import ControlledData, load_tokenizer


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
