"""Importing ml-rlgrad experiment plans (sft_vs_rft/experiment_plans/*.json) as controlled sweeps."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from orchestrator.import_plan import PlanImportError, import_plan_file, plan_to_spec
from orchestrator.spec import grid_points, parse_spec
from workloads import validate_config

# The shape of the original plans: run bookkeeping + the experiment's fields in base_config, a grid in options.
BASE_CONFIG = {
    "experiment_name": "{dataset}_{model_type}_{opt_method}_finetune_{reward_type}",
    "random_seed": -1, "gpu_ids": [0], "trainer_checkpoint": "", "epochs": 5000, "validate_every": 1,
    "outputs_dir": "outputs/controlled", "disable_console_log": False, "save_logs": True,
    "train_batch_log_interval": -1, "epoch_log_interval": 10, "save_metric_plots": True, "save_every_num_val": 100,
    "use_tensorboard": False, "use_wandb": False, "wandb_project_name": "wandb_project", "wandb_entity_name": "",
    "wandb_resume_id": "", "wandb_track_model": None, "wandb_exclude_files": ["plots/**"],
    "score_metric_name": "train loss", "is_train_metric": True, "score_largest": False, "return_best_score": False,
    "save_checkpoints": True, "num_checkpoints": 1, "save_checkpoints_by_score": False, "early_stop": False,
    "early_stop_min_delta": 0, "early_stop_patience": 0, "early_stop_cooldown": 0,
    "early_stop_restore_best_weights": False,
    "dataset": "mnist", "num_train_samples": 1000, "num_test_samples": 1000, "samples_rnd_seed": -1,
    "num_labels_per_sample": 1, "use_multiple_labels_per_sample": False, "frac_samples_to_modify_labels": 0,
    "model_type": "mlp", "mlp_hidden_layer_sizes": [250, 100], "init_rnd_seed": -1, "opt_method": "supervised",
    "reward_type": "labels", "min_reward": -1, "optimizer": "adam", "lr": 0.0001, "weight_decay": 0,
    "kl_regularization_coeff": 0, "kl_reg_ref_unif": False, "logits_temperature": 1, "batch_size": 512,
    "load_model_from_checkpoint": "ADD PATH TO CHECKPOINT",
}


def plan(base_overrides: dict, options: dict) -> dict:
    return {"name": "Supervised vs Reinforcement MLP controlled experiments plan", "description": "", "skip": 0,
            "repetitions": 1, "largest": False, "multiprocess": False, "num_parallel": 1, "gpu_ids_pool": [],
            "configurations": [{"base_config": dict(BASE_CONFIG, **base_overrides), "options": options}]}


FINETUNE_SGD = plan({}, {
    "optimizer": ["sgd"], "lr": [1e-2], "opt_method": ["expected_reinforce", "supervised"],
    "change_label_per_class": [False], "num_labels_per_sample": [5], "use_multiple_labels_per_sample": [False],
    "frac_samples_to_modify_labels": [0.1], "init_rnd_seed": [111], "samples_rnd_seed": [192]})
PRETRAIN = plan({"epochs": 1000, "validate_every": 10, "save_every_num_val": 10, "load_model_from_checkpoint": ""}, {
    "optimizer": ["adam"], "lr": [1e-4], "opt_method": ["supervised"], "num_labels_per_sample": [5],
    "use_multiple_labels_per_sample": [True], "init_rnd_seed": [111], "samples_rnd_seed": [192]})


def validate_stages(spec: dict) -> list:
    """Every stage config and grid point is a valid ControlledConfig; the spec parses as a sweep file."""
    parsed = parse_spec(yaml.safe_dump(spec), source="imported")
    configs = []
    for stage in parsed.stages:
        for params in grid_points(stage) or [{}]:
            values = copy.deepcopy(stage.config)
            values.update(params)
            configs.append(validate_config("controlled", values))
    return configs


def test_pretrain_plan_becomes_one_label_set_stage():
    spec = plan_to_spec(PRETRAIN, "mnist_pretrain")
    assert spec["sweep"] == "mnist_pretrain" and [s["name"] for s in spec["stages"]] == ["pretrain"]
    (config,) = validate_stages(spec)
    assert config.use_label_sets and config.frac_samples_to_modify_labels == 0
    assert (config.dataset, config.num_train_samples, config.num_labels_per_sample) == ("mnist", 1000, 5)
    assert (config.init_rnd_seed, config.samples_rnd_seed, config.batch_size) == (111, 192, 512)
    assert (config.optimizer, config.learning_rate, config.num_epochs, config.log_every_epochs) == ("adam", 1e-4, 1000, 10)
    assert config.checkpoint_every_epochs == 100  # every 10 validations of every 10 epochs
    assert config.model.type == "mlp" and config.model.hidden_sizes == [250, 100]
    assert "from_stage" not in spec["stages"][0]


def test_finetune_plan_with_its_pretrain_plan(tmp_path):
    finetune_path, pretrain_path = tmp_path / "sft_vs_rft_mlp_mnist_finetune_sgd_experiments_plan.json", tmp_path / "pre.json"
    finetune_path.write_text(json.dumps(FINETUNE_SGD))
    pretrain_path.write_text(json.dumps(PRETRAIN))
    spec = import_plan_file(str(finetune_path), pretrain_plan_path=str(pretrain_path))
    assert spec["sweep"] == "controlled_mlp_mnist_finetune_sgd"
    pretrain, finetune = spec["stages"]
    assert finetune["from_stage"] == "pretrain" and "init_checkpoint" not in finetune["config"]
    assert finetune["search"] == {"grid": {"opt_method": ["expected_reinforce", "supervised"]}}
    assert finetune["scaling"] == {"num_workers": 1, "use_gpu": False}
    configs = validate_stages(spec)
    assert [c.opt_method for c in configs[1:]] == ["expected_reinforce", "supervised"]
    for config in configs[1:]:
        assert not config.use_label_sets and config.frac_samples_to_modify_labels == 0.1
        assert (config.optimizer, config.learning_rate, config.num_epochs) == ("sgd", 1e-2, 5000)
        assert (config.reward_type, config.min_reward, config.kl_reference) == ("labels", -1.0, "initial")
    # pretrain and finetune see the same inputs and label sets
    assert configs[0].samples_rnd_seed == configs[1].samples_rnd_seed == 192


def test_finetune_plan_alone_gets_a_reference_pretrain_stage():
    high_reward = plan({"reward_type": "labels_with_custom", "dataset": "cifar10", "model_type": "resnet18",
                        "num_train_samples": 10000}, {"opt_method": ["supervised"], "num_labels_per_sample": [5],
                                                     "frac_samples_to_modify_labels": [0.1], "init_rnd_seed": [111],
                                                     "samples_rnd_seed": [192]})
    spec = plan_to_spec(high_reward, "cifar_high")
    pretrain, finetune = spec["stages"]
    assert finetune["from_stage"] == "pretrain" and "search" not in finetune
    assert finetune["scaling"] == {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1}
    pre, fine = validate_stages(spec)
    assert pre.use_label_sets and pre.num_epochs == 1000 and pre.model.type == "resnet18"
    assert fine.reward_type == "labels_with_custom" and fine.model.type == "resnet18"
    assert "hidden_sizes" not in finetune["config"]["model"]  # MLP sizes only go to the MLP


def test_real_checkpoint_path_is_kept():
    spec = plan_to_spec(plan({"load_model_from_checkpoint": "/ckpt/model.pt"}, {"init_rnd_seed": [1], "samples_rnd_seed": [2]}), "x")
    (stage,) = spec["stages"]
    assert stage["config"]["init_checkpoint"] == "/ckpt/model.pt" and "from_stage" not in stage


@pytest.mark.parametrize("bad, message", [
    ({"base": {"some_new_knob": 3}}, "some_new_knob"),
    ({"options": {"dropout_rate": [0.1, 0.2]}}, "dropout_rate"),
    ({"base": {"init_rnd_seed": -1}}, "init_rnd_seed"),
    ({"base": {"model_type": "vgg16"}}, "model_type"),
    ({"options": {"change_label_per_class": [True]}}, "change_label_per_class"),
])
def test_unknown_or_unsupported_fields_are_named(bad, message):
    options = {"init_rnd_seed": [111], "samples_rnd_seed": [192]}
    options.update(bad.get("options", {}))
    base = dict(bad.get("base", {}))
    if "init_rnd_seed" in base:
        options.pop("init_rnd_seed")
    with pytest.raises(PlanImportError, match=message):
        plan_to_spec(plan(base, options), "bad")


def test_shipped_reference_sweeps_parse():
    import glob
    import os

    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "search_spaces", "controlled_*.yaml")))
    assert len(files) == 13
    for path in files:
        with open(path) as f:
            spec = parse_spec(f.read(), source=path)
        names = [s.name for s in spec.stages]
        assert names in (["pretrain"], ["pretrain", "finetune"]), path


def test_rlgrad_import_writes_a_sweep_that_validates(tmp_path, capsys):
    from orchestrator.cli import main

    source = tmp_path / "mine_experiments_plan.json"
    source.write_text(json.dumps(FINETUNE_SGD))
    out = tmp_path / "mine.yaml"
    assert main(["import", str(source), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out
    text = out.read_text()
    assert text.startswith(f"# imported from apple/ml-rlgrad {source.name}\n# imported by `rlgrad import`")
    spec = yaml.safe_load(text)
    assert spec["sweep"] == "controlled_mine" and spec["description"].startswith("imported from apple/ml-rlgrad")
    # dropped bookkeeping is a comment under `config:` and a row of the printed table
    assert "# configurations[0].use_wandb: false -> dropped: the original trainer's bookkeeping" in text
    assert "save_every_num_val" in captured.err and "checkpoint_every_epochs" in captured.err
    assert main(["import", str(source), "-o", str(out)]) == 2  # no silent overwrite
    assert "exists; pass --force" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(plan({"no_such_option": 1}, {"init_rnd_seed": [111], "samples_rnd_seed": [192]})))
    assert main(["import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_option" in err


@pytest.fixture(autouse=True)
def _translation_only(hub_assumed_reachable):
    """These tests check how configs translate, not whether data or models can be had here."""
