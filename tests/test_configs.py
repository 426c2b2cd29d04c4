"""Self-describing configs: every field says what it means, and `rlgrad config` prints it."""

import pytest
from pydantic import BaseModel

from orchestrator.cli import main
from workloads import WORKLOADS
from workloads.core.config import config_models, describe_fields


def _reachable_models(config_cls: type[BaseModel]) -> list[type[BaseModel]]:
    """The config and every config nested in it (union members included), walked here
    independently of describe_fields so that a field it skipped would still be checked."""
    found, todo = [], [config_cls]
    while todo:
        model = todo.pop()
        if model not in found:
            found.append(model)
            todo.extend(m for field in model.model_fields.values() for m in config_models(field.annotation))
    return found


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_every_field_of_every_workload_has_a_description(workload):
    """The "self-describing" rule: a new field without `description=` fails here."""
    undescribed = [f"{model.__name__}.{name}" for model in _reachable_models(WORKLOADS[workload].config)
                   for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert undescribed == []


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_describe_fields_lists_every_field_of_every_nested_config(workload):
    rows = describe_fields(WORKLOADS[workload].config)
    listed = {name.rsplit(".", 1)[-1] for name, *_ in rows}
    for model in _reachable_models(WORKLOADS[workload].config):
        assert set(model.model_fields) <= listed, model.__name__
    assert all(description for *_, description in rows)


def test_config_without_argument_lists_workloads_with_their_summary(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for name, workload in WORKLOADS.items():
        summary = workload.config.__doc__.strip().splitlines()[0]
        assert f"  {name}  " in out and summary in out, name
    assert max(map(len, out.splitlines())) <= 100


def test_config_of_a_workload_prints_type_default_and_description_of_nested_fields(capsys):
    assert main(["config", "extract"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("generation.temperature "))
    assert lines[row].split() == ["generation.temperature", "float", "=", "1.0"]
    assert lines[row + 1].strip() == "sampling temperature (paper: 1; section 5.1 sweeps it)"
    row = next(i for i, line in enumerate(lines) if line.startswith("num_samples_per_input "))
    assert lines[row].split() == ["num_samples_per_input", "int", "=", "10"]
    assert "K samples per input (paper: 10" in lines[row + 1]
    assert max(map(len, lines)) <= 100


def test_config_shows_each_member_of_the_controlled_model_union(capsys):
    assert main(["config", "controlled"]) == 0
    out = capsys.readouterr().out
    assert "model[mlp].hidden_sizes" in out and "list[int] = [250, 100]" in out
    assert "model[resnet18].stem" in out and "imagenet|cifar = imagenet" in out
    assert "model[bert-mini].tokenizer" in out and "= prajjwal1/bert-mini" in out
    assert "`from_stage:` fills 'init_checkpoint'" in out
    assert max(map(len, out.splitlines())) <= 100


def test_config_of_an_unknown_workload_is_one_line_naming_it_and_the_allowed(capsys):
    assert main(["config", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "unknown workload 'nope' (did you mean 'noop'?); allowed: controlled, extract, grpo, nlpo, noop, ppo, sft" in captured.err


def test_help_lists_every_command_and_the_new_options(capsys):
    from orchestrator.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"config", "validate"} <= set(commands)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in commands:
        assert f"    {command} " in out, command
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "--resolved" in capsys.readouterr().out
