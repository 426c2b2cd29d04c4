"""The controlled workload: gradients, label modification, loaders, and the paper's effect on digits."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from workloads import run_workload, validate_config
from workloads.controlled import data as CD, finetune as C, models as CM
from workloads.core.availability import DatasetNotAvailableError
from workloads.core.context import local_context


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on 2 shared cores: one intra-op thread is many times faster
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def read_metrics(results: str) -> pd.DataFrame:
    import pyarrow.dataset as ds

    return ds.dataset(os.path.join(results, "local", "metrics"), format="parquet").to_table().to_pandas()


# ---------------------------------------------------------------- gradients


def tiny_policy_setup(reward_type="labels"):
    torch.manual_seed(0)
    model = CM.MLP(4, [5], 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    modified = torch.tensor([True, False, False, True, False, False])
    config = validate_config("controlled", {"reward_type": reward_type, "num_labels_per_sample": 1})
    rewards = C.reward_table(labels, modified, config, 3).double()
    return model, x, labels, rewards


def expected_reward_of(model, x, rewards) -> torch.Tensor:
    return C.expected_reward(CM.log_policy(model, x, 1.0), rewards).mean()


@pytest.mark.parametrize("reward_type", ["labels", "labels_with_custom"])
def test_expected_reinforce_gradient_equals_finite_differences(reward_type):
    model, x, labels, rewards = tiny_policy_setup(reward_type)
    loss = C.per_input_loss("expected_reinforce", CM.log_policy(model, x, 1.0), labels, None, rewards).mean()
    model.zero_grad()
    loss.backward()
    analytic = -C.flat_grad(model)  # the loss is minus the expected reward

    params = list(model.parameters())
    numeric, eps = [], 1e-6
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = expected_reward_of(model, x, rewards).item()
                flat[i] = old - eps
                down = expected_reward_of(model, x, rewards).item()
                flat[i] = old
                numeric.append((up - down) / (2 * eps))
    numeric = torch.tensor(numeric, dtype=torch.float64)
    assert analytic.norm() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_expected_reinforce_gradient_is_the_mean_of_sampled_reinforce_gradients():
    model, x, labels, rewards = tiny_policy_setup()
    loss = C.per_input_loss("expected_reinforce", CM.log_policy(model, x, 1.0), labels, None, rewards).mean()
    model.zero_grad()
    loss.backward()
    exact = C.flat_grad(model).clone()

    # each estimate: the REINFORCE loss over the batch repeated `copies` times (one sample per row)
    generator = torch.Generator().manual_seed(1)
    copies, num_estimates = 200, 200
    x_rep, labels_rep, rewards_rep = x.repeat(copies, 1), labels.repeat(copies), rewards.repeat(copies, 1)
    estimates = []
    for _ in range(num_estimates):
        model.zero_grad()
        log_probs = CM.log_policy(model, x_rep, 1.0)
        C.per_input_loss("reinforce", log_probs, labels_rep, None, rewards_rep, generator).mean().backward()
        estimates.append(C.flat_grad(model).clone())
    estimates = torch.stack(estimates)
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / num_estimates**0.5
    # the test has power: the noise is small next to the gradient itself
    assert standard_error.norm() < 0.1 * exact.norm()
    assert ((mean - exact).abs() <= 5 * standard_error + 1e-9).all(), (mean - exact).abs() / standard_error
    # and single-sample estimates are genuinely noisy (not the exact gradient in disguise)
    assert (estimates[0] - exact).norm() > 0.01 * exact.norm()


def test_kl_to_reference_matches_torch():
    p = torch.randn(5, 4).log_softmax(-1)
    q = torch.randn(5, 4).log_softmax(-1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(C.kl_to_reference(p, q), expected)


def test_labels_with_custom_reward_semantics():
    config = validate_config("controlled", {"reward_type": "labels_with_custom"})
    table = C.reward_table(torch.tensor([2, 2]), torch.tensor([True, False]), config, 4)
    assert table.tolist() == [[0.5, 0.5, 1.0, 0.5], [-1.0, -1.0, 1.0, -1.0]]


# ---------------------------------------------------------------- label sets and modification


def test_modified_labels_never_come_from_the_label_set():
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        sets_per_class = CD.draw_label_sets(10, 5, generator)
        assert (sets_per_class[:, 0] == torch.arange(10)).all()
        assert all(len(set(row.tolist())) == 5 for row in sets_per_class)
        labels = torch.randint(0, 10, (300,), generator=generator)
        sets = sets_per_class[labels]
        new_labels, modified = CD.modify_labels(labels, sets, 0.1, 10, generator)
        assert modified.sum() == 30
        assert not (sets[modified] == new_labels[modified].unsqueeze(1)).any()
        assert (new_labels[~modified] == labels[~modified]).all()


def test_same_seeds_give_the_same_inputs_sets_and_labels():
    common = dict(num_train_samples=300, num_test_samples=100)
    pretrain = CD.load_controlled_data(validate_config("controlled", dict(common, use_label_sets=True, frac_samples_to_modify_labels=0.0)))
    finetune = CD.load_controlled_data(validate_config("controlled", common))
    again = CD.load_controlled_data(validate_config("controlled", common))
    other_seed = CD.load_controlled_data(validate_config("controlled", dict(common, samples_rnd_seed=7)))

    assert torch.equal(pretrain.train_inputs, finetune.train_inputs)
    assert torch.equal(pretrain.train_label_sets, finetune.train_label_sets)
    assert torch.equal(finetune.train_labels, again.train_labels) and torch.equal(finetune.train_modified, again.train_modified)
    assert not torch.equal(finetune.train_modified, other_seed.train_modified)
    # pretraining modifies nothing; finetuning moves 10% of labels outside the pretraining set
    assert not pretrain.train_modified.any() and finetune.train_modified.sum() == 30
    moved = finetune.train_modified
    assert not (pretrain.train_label_sets[moved] == finetune.train_labels[moved].unsqueeze(1)).any()
    assert torch.equal(finetune.train_labels[~moved], pretrain.train_labels[~moved])
    # stratified: every digit present in the subsample
    assert len(torch.unique(finetune.train_label_sets[:, 0])) == 10


# ---------------------------------------------------------------- loaders on tiny local copies


def write_mnist_copy(root: str) -> str:
    import datasets

    rng = np.random.default_rng(0)
    path = os.path.join(root, "mnist")
    splits = {}
    for split, n in (("train", 30), ("test", 10)):
        # arrays (PIL is not installed here; PIL images go through the same np.asarray)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        features = datasets.Features({"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(num_classes=10)})
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(path)
    return path


def write_cifar_copy(root: str) -> str:
    import datasets

    rng = np.random.default_rng(1)
    path = os.path.join(root, "cifar10")
    os.makedirs(path)
    for split, n in (("train", 20), ("test", 10)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # (H, W, C) as in uoft-cs/cifar10
        features = datasets.Features({"img": datasets.Array3D((32, 32, 3), "uint8"), "label": datasets.Value("int64")})
        datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(n)]}, features=features).to_parquet(
            os.path.join(path, f"{split}.parquet"))
    return path


WORDS = "a man is playing guitar woman cutting onion dog runs in the park cat sleeps on sofa child reads book".split()


def write_stsb_copy(root: str) -> tuple[str, str]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    rng = np.random.default_rng(2)
    path = os.path.join(root, "stsb")
    os.makedirs(path)
    for split, n in (("train", 24), ("validation", 12)):
        frame = pd.DataFrame({
            "sentence1": [" ".join(rng.choice(WORDS, 6)) for _ in range(n)],
            "sentence2": [" ".join(rng.choice(WORDS, 5)) for _ in range(n)],
            "label": [round(float(s), 2) for s in np.linspace(0, 5, n)],
            "idx": list(range(n)),
        })
        frame.to_csv(os.path.join(path, f"{split}.csv"), index=False)
    # a word-level BERT tokenizer built here (no hub)
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer_dir = os.path.join(root, "tokenizer")
    BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(tokenizer_dir)
    return path, tokenizer_dir


def run_one_epoch(tmp_path, values: dict) -> pd.DataFrame:
    config = validate_config("controlled", dict(values, num_epochs=1, batch_size=8, checkpoint_every_epochs=0))
    ctx = local_context(str(tmp_path / "results"), show_progress=False)
    run_workload("controlled", config, ctx)
    assert os.path.exists(os.path.join(ctx.checkpoint_path, C.MODEL_FILE))
    return read_metrics(str(tmp_path / "results"))


def test_mnist_local_copy_with_mlp(tmp_path):
    path = write_mnist_copy(str(tmp_path))
    config = validate_config("controlled", dict(dataset="mnist", dataset_path=path, num_train_samples=-1, num_test_samples=-1))
    data = CD.load_controlled_data(config)
    assert data.train_inputs.shape == (30, 1, 28, 28) and data.test_inputs.shape == (10, 1, 28, 28)
    assert data.num_classes == 10 and data.train_modified.sum() == 3
    # normalised with MNIST's mean/std: uniform noise in [0, 1] -> mean about (0.5 - 0.1307) / 0.3081
    assert abs(data.train_inputs.mean().item() - (0.5 - 0.1307) / 0.3081) < 0.1
    metrics = run_one_epoch(tmp_path, dict(dataset="mnist", dataset_path=path, model={"type": "mlp", "hidden_sizes": [16]}))
    assert {"modified", "unmodified", "train", "test"} <= set(metrics.split)


def test_cifar10_local_copy_with_resnet18(tmp_path):
    path = write_cifar_copy(str(tmp_path))
    config = validate_config("controlled", dict(dataset="cifar10", dataset_path=path, model={"type": "resnet18"}))
    data = CD.load_controlled_data(config)
    assert data.train_inputs.shape == (20, 3, 32, 32) and data.train_modified.sum() == 2
    model = CM.build_model(config, data)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)  # ResNet18, 10 classes
    assert model(data.train_inputs[:2]).shape == (2, 10)
    metrics = run_one_epoch(tmp_path, dict(dataset="cifar10", dataset_path=path, model={"type": "resnet18"}))
    assert metrics.query("split == 'modified' and metric == 'grad_norm'").value.notna().all()


def test_stsb_local_copy_with_bert_mini(tmp_path):
    path, tokenizer_dir = write_stsb_copy(str(tmp_path))
    values = dict(dataset="stsb", dataset_path=path, num_labels_per_sample=3,
                  model={"type": "bert-mini", "tokenizer": tokenizer_dir})
    data = CD.load_controlled_data(validate_config("controlled", values))
    assert data.num_classes == 6
    assert data.train_inputs["input_ids"].shape[0] == 24 and data.test_labels.shape == (12,)
    # scores 0..5 rounded to classes: linspace(0, 5, 12) rounds to these
    assert data.test_labels.tolist() == [round(float(s)) for s in pd.read_csv(os.path.join(path, "validation.csv")).label]
    metrics = run_one_epoch(tmp_path, values)
    assert {"modified", "unmodified"} <= set(metrics.split)


def test_missing_local_copy_names_the_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"'cifar10': dataset_path .*nowhere' does not exist"):
        validate_config("controlled", dict(dataset="cifar10", dataset_path=str(tmp_path / "nowhere"), model={"type": "resnet18"}))
    # gone between validation and the run: the loader names it too
    gone = tmp_path / "gone"
    gone.mkdir()
    config = validate_config("controlled", dict(dataset="cifar10", dataset_path=str(gone), model={"type": "resnet18"}))
    gone.rmdir()
    with pytest.raises(DatasetNotAvailableError, match=r"'cifar10'.*dataset_path"):
        CD.load_controlled_data(config)


def test_unreachable_hub_names_the_dataset(monkeypatch):
    import datasets.config

    from workloads.core.availability import hub_assumed_reachable

    with pytest.raises(ValueError, match=r"'mnist' \(ylecun/mnist\) is not available offline.*dataset_path"):
        validate_config("controlled", dict(dataset="mnist"))  # refused before any worker starts
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with hub_assumed_reachable():  # validated where the hub was up; the run finds it down
        config = validate_config("controlled", dict(dataset="mnist"))
    with pytest.raises(DatasetNotAvailableError, match=r"'mnist'.*ylecun/mnist.*dataset_path"):
        CD.load_controlled_data(config)


def test_config_rules():
    with pytest.raises(ValueError, match="bert-mini"):
        validate_config("controlled", dict(dataset="stsb"))
    with pytest.raises(ValueError, match="frac_samples_to_modify_labels"):
        validate_config("controlled", dict(use_label_sets=True))
    with pytest.raises(ValueError, match="no label outside"):
        validate_config("controlled", dict(num_labels_per_sample=10))
    with pytest.raises(ValueError):
        validate_config("controlled", dict(model={"type": "mlp", "width": 3}))


# ---------------------------------------------------------------- checkpoints and resumption


def test_resume_continues_exactly(tmp_path):
    values = dict(num_train_samples=200, num_test_samples=50, batch_size=64, learning_rate=1e-3, num_epochs=4,
                  checkpoint_every_epochs=2, model={"type": "mlp", "hidden_sizes": [32]}, opt_method="reinforce")
    straight = local_context(str(tmp_path / "a"), show_progress=False)
    run_workload("controlled", validate_config("controlled", values), straight)

    first_half = local_context(str(tmp_path / "b"), show_progress=False)
    run_workload("controlled", validate_config("controlled", dict(values, num_epochs=2)), first_half)
    resumed = local_context(str(tmp_path / "b"), show_progress=False)
    resumed.resume_from = first_half.checkpoint_path
    run_workload("controlled", validate_config("controlled", values), resumed)

    a = torch.load(os.path.join(straight.checkpoint_path, C.MODEL_FILE), weights_only=True)
    b = torch.load(os.path.join(resumed.checkpoint_path, C.MODEL_FILE), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in resumed.reported] == [3, 4]  # picks up after the epoch-2 checkpoint


def test_refuses_several_workers(tmp_path):
    ctx = local_context(str(tmp_path), show_progress=False)
    ctx.world_size = 2
    with pytest.raises(ValueError, match="num_workers: 1"):
        run_workload("controlled", validate_config("controlled", dict(num_epochs=1)), ctx)


# ---------------------------------------------------------------- the paper's effect, scaled down


GROUP_METRICS = {"accuracy", "reward", "reward_std", "grad_norm", "normalized_grad_norm", "loss", "objective"}


def test_digits_sft_fits_modified_labels_and_rft_does_not(tmp_path):
    results = str(tmp_path / "results")
    common = dict(num_train_samples=400, num_test_samples=200, learning_rate=1e-3, checkpoint_every_epochs=0,
                  model={"type": "mlp", "hidden_sizes": [64, 32]})
    pretrain_ctx = local_context(results, stage="pretrain", trial="p", show_progress=False)
    run_workload("controlled", validate_config("controlled", dict(
        common, use_label_sets=True, frac_samples_to_modify_labels=0.0, num_epochs=600, log_every_epochs=200)), pretrain_ctx)

    final = {}
    for method in ("supervised", "expected_reinforce"):
        ctx = local_context(results, stage="finetune", trial=method, show_progress=False)
        run_workload("controlled", validate_config("controlled", dict(
            common, opt_method=method, num_epochs=500, log_every_epochs=100,
            init_checkpoint=pretrain_ctx.checkpoint_path)), ctx)
        final[method] = ctx.reported

    metrics = read_metrics(results)
    finetune = metrics[metrics.stage == "finetune"]
    for method in final:
        trial = finetune[finetune.trial == method]
        for split in ("modified", "unmodified"):
            assert GROUP_METRICS <= set(trial[trial.split == split].metric), (method, split)
        assert {"loss", "accuracy", "reward"} <= set(trial[trial.split == "test"].metric)
        assert sorted(trial.step.unique()) == [0, 100, 200, 300, 400, 500]

    sft, rft = final["supervised"], final["expected_reinforce"]
    # the starting point: the same model, but RFT's gradient on modified inputs is orders of magnitude smaller
    assert sft[0]["modified/accuracy"] == rft[0]["modified/accuracy"] < 0.1
    assert rft[0]["modified/grad_norm"] < 1e-2 * sft[0]["modified/grad_norm"]
    assert rft[0]["modified/reward_std"] < 0.1 < rft[0]["unmodified/reward_std"]
    # the end: SFT fits the modified inputs, RFT barely moves them; both fit the unmodified ones
    assert sft[-1]["modified/accuracy"] > 0.9
    assert rft[-1]["modified/accuracy"] < 0.3
    assert sft[-1]["unmodified/accuracy"] > 0.9 and rft[-1]["unmodified/accuracy"] > 0.9

    # the report section: the epochs-to-fit table tells the same story
    import json

    import plotly.graph_objects as go

    from orchestrator.controlled_report import controlled_section, fit_table, _trial_info

    trials = pd.DataFrame([
        {"sweep": "local", "stage": stage, "trial": trial, "config_hash": "local", "workload": "controlled",
         "params": json.dumps(params), "config": json.dumps({"opt_method": method})}
        for stage, trial, method, params in [("pretrain", "p", "supervised", {}),
                                             ("finetune", "supervised", "supervised", {"opt_method": "supervised"}),
                                             ("finetune", "expected_reinforce", "expected_reinforce",
                                              {"opt_method": "expected_reinforce"})]])
    section = controlled_section(metrics, trials)
    figures = [item for item in section if isinstance(item, go.Figure)]
    assert len(figures) == 2 and all(isinstance(item, (str, go.Figure)) for item in section)
    assert figures[0].layout.yaxis3.type == "log"  # gradient norms
    table = fit_table(metrics, _trial_info(trials).query("stage == 'finetune'")).set_index("trial")
    fit_column = "modified: epochs to accuracy >= 0.99"
    assert isinstance(table.loc["supervised", fit_column], int)
    assert table.loc["expected_reinforce", fit_column] == "not reached"
