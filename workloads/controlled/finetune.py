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

Data and label sets live in data.py, the classifiers in models.py; this file
reads top to bottom: rewards and objectives -> metrics per group (modified =
"small reward std" / unmodified) -> training loop with checkpoints. Semantics
follow apple/ml-rlgrad sft_vs_rft/.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile

import torch
import torch.nn as nn

from ..core.context import WorkloadContext
from .config import ControlledConfig
from .data import ControlledData, load_controlled_data, take, to_device
from .models import build_model, log_policy


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
    """Metrics of the current model, grad_norm_measurement = full_batch_exact (not the
    reference's measurement; see train_epoch for that): {split: {metric: value}}.

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
                loss, hit = _loss_and_hits(config, data, index, log_probs)
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


def _loss_and_hits(config: ControlledConfig, data: ControlledData, index: torch.Tensor,
                   log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input of `index`: its supervised loss and whether the policy's argmax is right.
    Pretraining (label sets): cross-entropy to uniform over the set, a hit is an argmax in the set."""
    if config.use_label_sets:
        sets = data.train_label_sets[index]
        return -log_probs.gather(1, sets).mean(-1), (sets == log_probs.argmax(-1, keepdim=True)).any(-1)
    targets = data.train_labels[index]
    return -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1), log_probs.argmax(-1) == targets


def _group_metrics(config: ControlledConfig, data: ControlledData, index: torch.Tensor, terms: torch.Tensor,
                   log_probs: torch.Tensor, rewards: torch.Tensor) -> dict[str, float]:
    """Means over `index` of what `measure` reports per group, from one forward pass."""
    with torch.no_grad():
        loss, hit = _loss_and_hits(config, data, index, log_probs)
        return {"objective": terms.mean().item(), "loss": loss.mean().item(), "accuracy": hit.float().mean().item(),
                "reward": expected_reward(log_probs, rewards).mean().item(),
                "reward_std": reward_std(log_probs, rewards).mean().item()}


def train_epoch(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer, config: ControlledConfig,
                data: ControlledData, order: torch.Tensor, generator: torch.Generator | None,
                step: bool = True) -> dict[str, dict]:
    """One pass over the train minibatches in train mode, measuring as the reference
    does (sft_vs_rft/train/reinforce_trainer.py and supervised_kl_trainer.py
    batch_update): before each step, the batch's modified and unmodified inputs each
    get a forward pass, their mean objective's gradient norm (for reinforce with a
    fresh sample: the sampled REINFORCE gradient), accuracy, reward and reward std;
    then the batch's own objective is backpropagated, its gradient norm recorded
    and the optimiser steps. Every metric is averaged over the epoch's batches that
    have such inputs (common/evaluation/evaluators/train_batch_output_evaluator.py).
    step=False measures without updating (the epoch-0 row)."""
    model.train()
    # train-mode BatchNorm cannot normalise one input (ResNet18's 1x1 last stage): a
    # group with a single input in a batch is left out of that batch's average
    min_group = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}

    def add(split: str, values: dict[str, float]) -> None:
        totals = sums.setdefault(split, {})
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value
        counts[split] = counts.get(split, 0) + 1

    for index in order.split(config.batch_size):
        theta_norm = param_norm(model)
        modified = data.train_modified[index]
        for split, members in (("modified", modified), ("unmodified", ~modified)):
            if int(members.sum()) < min_group:
                continue
            sub = index[members]
            terms, log_probs = objective.loss_terms(model, take(data.train_inputs, sub), sub, config.opt_method,
                                                    generator)
            optimizer.zero_grad(set_to_none=True)
            terms.mean().backward()
            grad_norm = flat_grad(model).norm().item()
            add(split, {**_group_metrics(config, data, sub, terms, log_probs, objective.train_rewards[sub]),
                        "grad_norm": grad_norm, "normalized_grad_norm": grad_norm / theta_norm})
        terms, log_probs = objective.loss_terms(model, take(data.train_inputs, index), index, config.opt_method,
                                                generator)
        optimizer.zero_grad(set_to_none=True)
        terms.mean().backward()
        grad_norm = flat_grad(model).norm().item()
        add("train", {**_group_metrics(config, data, index, terms, log_probs, objective.train_rewards[index]),
                      "grad_norm": grad_norm, "normalized_grad_norm": grad_norm / theta_norm, "param_norm": theta_norm})
        if step:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {split: {k: v / counts[split] for k, v in totals.items()} for split, totals in sums.items()}


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

    def log_and_report(epoch: int, with_checkpoint: bool, batch_results: dict | None) -> dict:
        if config.grad_norm_measurement == "train_batches":
            results = {**batch_results, "test": evaluate_test_mode(model, config, data)}
        else:
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

    num_train = data.train_labels.shape[0]

    def epoch_order() -> torch.Tensor:
        return torch.randperm(num_train, generator=generators["batch_order"]).to(device)

    def measured_pass(step: bool) -> dict | None:
        if config.grad_norm_measurement != "train_batches":
            return None
        return train_epoch(model, objective, optimizer, config, data, epoch_order(), generators["samples"], step)

    last = None
    if start_epoch == 0:
        # the starting point: initial grad norms (train_batches: a pass over the
        # batches of a separate order, without steps; BatchNorm statistics restored)
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        before = None
        if config.grad_norm_measurement == "train_batches":
            with torch.random.fork_rng(devices=[]):
                order = torch.randperm(num_train, generator=torch.Generator().manual_seed(config.init_rnd_seed + 2))
                sample_state = generators["samples"].get_state()
                before = train_epoch(model, objective, optimizer, config, data, order.to(device), generators["samples"],
                                     step=False)
                generators["samples"].set_state(sample_state)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
        last = log_and_report(0, with_checkpoint=False, batch_results=before)
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        if config.grad_norm_measurement == "train_batches":
            batch_results = measured_pass(step=True)
        else:
            model.train()
            batch_results = None
            for index in epoch_order().split(config.batch_size):
                terms, _ = objective.loss_terms(model, take(data.train_inputs, index), index, config.opt_method,
                                                generators["samples"])
                optimizer.zero_grad(set_to_none=True)
                terms.mean().backward()
                optimizer.step()
        is_last = epoch == config.num_epochs
        wants_checkpoint = is_last or (config.checkpoint_every_epochs > 0 and epoch % config.checkpoint_every_epochs == 0)
        if wants_checkpoint or epoch % config.log_every_epochs == 0:
            last = log_and_report(epoch, with_checkpoint=wants_checkpoint, batch_results=batch_results)
    return last or {}


def evaluate_test_mode(model: nn.Module, config: ControlledConfig, data: ControlledData) -> dict[str, float]:
    """Test metrics in eval mode (the reference's SupervisedValidationEvaluator)."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_test(model, config, data)
    finally:
        model.train(was_training)
