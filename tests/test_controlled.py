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
    # the report says how the gradient norm was measured (configs without the field: the exact one)
    assert set(table["grad norm measured"]) == {"full_batch_exact"}
    assert "exact gradient of the whole group" in figures[0].layout.title.text


# ---------------------------------------------------------------- the reference's ResNet18 and measurement
# apple/ml-rlgrad common/utils/model.py (create_modified_model), sft_vs_rft/train/reinforce_trainer.py and
# supervised_kl_trainer.py (batch_update), common/evaluation/evaluators/train_batch_output_evaluator.py


def test_resnet18_is_torchvisions_with_the_imagenet_stem():
    model = CM.ResNet18(3, 10)
    # torchvision's resnet18 has 11,689,512 parameters with its 1000-class fc (512*1000 + 1000):
    # with fc replaced by a 10-class one: 11,689,512 - 513,000 + 5,130
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 513_000 + 5_130
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(model.maxpool, torch.nn.MaxPool2d) and model.conv1.bias is None
    names = set(model.state_dict())
    assert {"layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.weight", "fc.bias"} <= names
    assert len(names) == 122  # torchvision resnet18's state dict: 122 entries
    shapes = {}
    model.maxpool.register_forward_hook(lambda m, i, o: shapes.update(stem=tuple(o.shape)))
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert shapes["stem"] == (2, 64, 8, 8)  # 32 -> 16 (7x7 stride 2) -> 8 (max-pool)
    cifar = CM.ResNet18(3, 10, stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, torch.nn.Identity)
    assert CM.ResNet18(1, 10).conv1.in_channels == 1  # grayscale: conv1 replaced, as the reference does
    assert validate_config("controlled", dict(dataset="digits", num_labels_per_sample=1)).model.type == "mlp"
    from workloads.controlled.config import ControlledResNet18

    assert ControlledResNet18().stem == "imagenet"


def _zero_input_data(modified: list[bool], labels: list[int]):
    n = len(labels)
    return CD.ControlledData(
        train_inputs=torch.zeros(n, 4), train_labels=torch.tensor(labels), train_label_sets=torch.tensor(labels)[:, None],
        train_modified=torch.tensor(modified), test_inputs=torch.zeros(1, 4), test_labels=torch.tensor([0]),
        test_label_sets=torch.tensor([[0]]), num_classes=10, input_shape=(4,))


def test_batch_grad_norms_hand_computed_and_averaged_over_batches():
    """Linear policy with zero weights and equal biases on zero inputs: pi = uniform over 10
    classes and only the biases get gradients: d(-log pi_y)/db = 1/10 - e_y. A group of
    two inputs with different labels: ||1/10 - (e_a + e_b)/2|| = sqrt(2 * 0.4^2 + 8 * 0.1^2)."""
    config = validate_config("controlled", dict(num_labels_per_sample=1, batch_size=4, learning_rate=1e-3,
                                                optimizer="sgd"))
    data = _zero_input_data([True, True, False, False, False, False, True, True], [0, 1, 2, 3, 4, 5, 6, 7])
    model = CM.MLP(4, [], 10)
    with torch.no_grad():
        model.net[-1].weight.zero_()
        model.net[-1].bias.fill_(0.5)
    objective = C.Objective(config, data, None)
    optimizer = C.make_optimizer(config, model)
    modes = []
    model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    order = torch.arange(8)  # batches {0,1,2,3} and {4,5,6,7}
    results = C.train_epoch(model, objective, optimizer, config, data, order, None, step=False)
    pair = (2 * 0.4 ** 2 + 8 * 0.1 ** 2) ** 0.5
    four = (4 * 0.15 ** 2 + 6 * 0.1 ** 2) ** 0.5  # a batch of 4 distinct labels: 1/10 - 1/4 at four places
    assert results["modified"]["grad_norm"] == pytest.approx(pair)  # each batch has two modified inputs
    assert results["unmodified"]["grad_norm"] == pytest.approx(pair)
    assert results["train"]["grad_norm"] == pytest.approx(four)
    assert results["train"]["param_norm"] == pytest.approx(0.5 * 10 ** 0.5)
    assert results["modified"]["normalized_grad_norm"] == pytest.approx(pair / (0.5 * 10 ** 0.5))
    assert results["train"]["accuracy"] == 0.125  # argmax of a uniform policy: class 0; batch means 1/4 and 0
    assert all(modes) and len(modes) == 2 * 3  # train mode; per batch: two groups + the batch itself
    # with steps: the second batch is measured after the first step, and the mean is over both batches
    results = C.train_epoch(model, objective, optimizer, config, data, order, None, step=True)
    assert results["train"]["grad_norm"] != pytest.approx(four)


def test_reinforce_logs_the_sampled_gradient():
    """For reinforce the per-batch grad norm is of -r(y) log pi(y|x) at a sampled y: with
    rewards +1 / -1 its norm differs from the exact expected-reward gradient's, and matches
    a manual computation drawing the same samples."""
    config = validate_config("controlled", dict(num_labels_per_sample=1, batch_size=4, opt_method="reinforce",
                                                optimizer="sgd", learning_rate=1e-3))
    data = _zero_input_data([False] * 4, [0, 1, 2, 3])
    torch.manual_seed(3)
    model = CM.MLP(4, [], 10)
    objective = C.Objective(config, data, None)
    results = C.train_epoch(model, objective, C.make_optimizer(config, model), config, data, torch.arange(4),
                            torch.Generator().manual_seed(5), step=False)
    generator = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(2):  # the unmodified group, then the whole batch: each draws its own samples
        model.zero_grad()
        terms, _ = objective.loss_terms(model, data.train_inputs, torch.arange(4), "reinforce", generator)
        terms.mean().backward()
        norms.append(C.flat_grad(model).norm().item())
    assert results["unmodified"]["grad_norm"] == pytest.approx(norms[0])
    assert results["train"]["grad_norm"] == pytest.approx(norms[1])
    model.zero_grad()
    exact, _ = objective.loss_terms(model, data.train_inputs, torch.arange(4), "expected_reinforce")
    exact.mean().backward()
    assert C.flat_grad(model).norm().item() != pytest.approx(norms[1])


def test_full_batch_exact_measurement_is_kept_as_an_option(tmp_path):
    base = dict(dataset="digits", num_train_samples=64, num_test_samples=32, num_labels_per_sample=1, num_epochs=1,
                batch_size=32, opt_method="expected_reinforce")
    exact = run_one_epoch(tmp_path / "exact", {**base, "grad_norm_measurement": "full_batch_exact"})
    batches = run_one_epoch(tmp_path / "batches", base)
    e0 = exact.query("step == 0 and split == 'modified' and metric == 'grad_norm'").value.item()
    b0 = batches.query("step == 0 and split == 'modified' and metric == 'grad_norm'").value.item()
    assert e0 > 0 and b0 > 0 and e0 != pytest.approx(b0)  # the two measurements differ and both are logged
    with pytest.raises(Exception, match="grad_norm_measurement"):
        validate_config("controlled", {**base, "grad_norm_measurement": "sometimes"})
