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


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: two 3x3 convs with BatchNorm, identity
    or 1x1-conv + BatchNorm shortcut. Parameter names are torchvision's."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18 rebuilt in plain torch (torchvision does not import
    here), as the reference creates it (apple/ml-rlgrad common/utils/model.py
    create_modified_model -> __create_modified_resnet_model): the ImageNet stem --
    7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool -- four stages
    of two BasicBlocks (64, 128, 256, 512 channels), global average pool and `fc`
    replaced by nn.Linear(512, num_classes); conv1 replaced by a fresh
    nn.Conv2d(num_channels, 64, 7, 2, 3, bias=False) when the images do not have 3
    channels. Initialisation as torchvision's: Kaiming-normal (fan_out, relu)
    convolutions, BatchNorm weight 1 / bias 0, default nn.Linear/nn.Conv2d init for
    the replaced layers. Names match torchvision's state dict.

    stem="cifar" (not the reference): a 3x3 stride-1 conv1 and no max-pool, the
    usual variant for 32x32 images."""

    def __init__(self, num_channels: int = 3, num_classes: int = 1000, stem: str = "imagenet"):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={stem!r}; allowed: 'imagenet', 'cifar'")
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, 1000)
        for module in self.modules():  # torchvision.models.resnet.ResNet.__init__
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        # __create_modified_resnet_model: only fc replaced (and conv1 for non-RGB inputs)
        self.fc = nn.Linear(512, num_classes)
        if num_channels != 3:
            old = self.conv1
            self.conv1 = nn.Conv2d(num_channels, 64, kernel_size=old.kernel_size, stride=old.stride,
                                   padding=old.padding, bias=False)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet18(num_channels: int, num_classes: int, stem: str = "imagenet") -> nn.Module:
    return ResNet18(num_channels, num_classes, stem)


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
