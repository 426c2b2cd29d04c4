"""Sweep files: what is accepted, and the one-line errors for what is not."""

import os
import subprocess
import sys
import textwrap

import pytest

from orchestrator.cli import main
from orchestrator.spec import SpecError, grid_points, load_spec, parse_spec, resolve_trial

GOOD = """
sweep: demo
stages:
  - name: sft
    workload: sft
    config: {max_steps: 5, learning_rate: 1e-3}
    search:
      grid:
        max_steps: [0, 5]
  - name: extract
    workload: extract
    from_stage: sft
    config:
      num_inputs: 8
      num_samples_per_input: 4
      generation: {temperature: 1.0}
    search:
      grid:
        generation.temperature: [0.7, 1.0]
    scaling: {num_workers: 2}
"""


def test_good_spec_parses_with_paper_defaults_and_yaml12_floats():
    spec = parse_spec(GOOD)
    assert [s.name for s in spec.stages] == ["sft", "extract"]
    assert spec.stages[0].config["learning_rate"] == 1e-3  # `1e-3` is a float, not a string
    assert len(grid_points(spec.stages[1])) == 2
    trial = resolve_trial(spec.stages[1], {"generation.temperature": 0.7}, "sft-0123456789")
    assert trial.config.generation.temperature == 0.7
    assert trial.config.model == "@sft/sft-0123456789"
    assert trial.config.seed == 7  # the paper's seed for choosing inputs
    assert trial.trial_id.startswith("extract-") and len(trial.config_hash) == 16


def test_trial_identity_is_a_pure_function_of_its_config():
    spec = parse_spec(GOOD)
    a = resolve_trial(spec.stages[1], {"generation.temperature": 0.7}, "sft-aaaaaaaaaa")
    b = resolve_trial(spec.stages[1], {"generation.temperature": 0.7}, "sft-aaaaaaaaaa")
    c = resolve_trial(spec.stages[1], {"generation.temperature": 1.0}, "sft-aaaaaaaaaa")
    d = resolve_trial(spec.stages[1], {"generation.temperature": 0.7}, "sft-bbbbbbbbbb")
    assert a.trial_id == b.trial_id
    assert len({a.trial_id, c.trial_id, d.trial_id}) == 3


BAD = {
    "unknown workload": ("stages[0].workload", GOOD.replace("workload: sft", "workload: sfft"),
                         "unknown workload (did you mean 'sft'?)"),
    "unknown key": ("stages[1].config", GOOD.replace("num_inputs: 8", "num_input: 8"),
                    "unknown key 'num_input' (did you mean 'num_inputs'?)"),
    "unknown nested key": ("stages[1].config.generation", GOOD.replace("{temperature: 1.0}", "{temprature: 1.0}"),
                           "unknown key 'temprature' (did you mean 'temperature'?)"),
    "wrong type": ("stages[1].config.num_inputs", GOOD.replace("num_inputs: 8", "num_inputs: eight"),
                   "'eight': Input should be a valid integer"),
    "K < 2": ("stages[1].config.num_samples_per_input", GOOD.replace("num_samples_per_input: 4", "num_samples_per_input: 1"),
              "= 1: Input should be greater than or equal to 2"),
    "missing stage reference": ("stages[1].from_stage", GOOD.replace("from_stage: sft", "from_stage: pretrain"),
                                "no earlier stage of that name; earlier stages: sft"),
    "bad grid value": ("stages[0].config.max_steps", GOOD.replace("max_steps: [0, 5]", "max_steps: [0, -7]"),
                       "= -7: Input should be greater than or equal to -1"),
    "search over unknown field": ("stages[1].search", GOOD.replace("generation.temperature: [0.7, 1.0]", "temperature: [0.7]"),
                                  "'temperature' is not a field of ExtractConfig"),
    "unknown key inside a model union": ("stages[0].config.model.mlp",
                                         "sweep: x\nstages:\n  - {name: c, workload: controlled, config: {model: {type: mlp, hiden_sizes: [3]}}}\n",
                                         "unknown key 'hiden_sizes' (did you mean 'hidden_sizes'?); allowed: type, hidden_sizes"),
    "unknown top-level key": ("stage", GOOD.replace("stages:", "stage: []\nstages:"), "unknown key 'stage'"),
    "not YAML": ("not valid YAML", "sweep: [unclosed\n", "line"),
    "config_from an unknown stage": ("stages[1].config_from",
                                     GOOD.replace("from_stage: sft", "from_stage: sft\n    config_from: sfft"),
                                     "= 'sfft': no stage of that name; earlier stages: sft"),
    "config_from a later stage": ("stages[0].config_from",
                                  GOOD.replace("workload: sft", "workload: sft\n    config_from: extract"),
                                  "= 'extract': is this stage or a later one; config_from names an earlier stage"),
    "config_from another config class": ("stages[1].config_from",
                                         GOOD.replace("from_stage: sft", "from_stage: sft\n    config_from: sft"),
                                         "workload 'sft' has config SFTConfig, this stage's 'extract' has ExtractConfig"),
    "extract has no checkpoint": ("from_stage", GOOD + "  - name: again\n    workload: extract\n    from_stage: extract\n",
                                  "writes no checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_error_names_the_field_and_the_rule(case):
    where, text, expected = BAD[case]
    with pytest.raises(SpecError) as err:
        parse_spec(text, source="x.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("x.yaml: ")
    assert where in message, message
    assert expected in message, message


@pytest.mark.parametrize("case", ["unknown workload", "unknown key", "wrong type", "K < 2", "missing stage reference"])
def test_cli_run_refuses_bad_spec_with_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD[case][1])
    results = tmp_path / "results"
    code = main(["run", str(spec), "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rlgrad: error: ") and err.count("\n") == 1, err
    assert not results.exists()


def test_cli_exit_status_through_a_real_process(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD["K < 2"][1])
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "num_samples_per_input" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_validate_lists_trials(tmp_path, capsys):
    spec = tmp_path / "good.yaml"
    spec.write_text(textwrap.dedent(GOOD))
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "sft: sft, 2 trial(s)" in out
    assert "extract: extract, 2 trial(s) per finished trial of 'sft'; 2 worker(s)" in out


SEARCH_SPACES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces")
SHIPPED = sorted(f for f in os.listdir(SEARCH_SPACES) if f.endswith(".yaml"))
OFFLINE_ONLY = ("is not available offline", "is not available: not a local directory",
                "is not available -- not a local directory", "needs NLTK data")


def test_shipped_search_spaces_include_the_offline_ones():
    for name in ("quickstart.yaml", "controlled_digits.yaml", "ppo_builtin.yaml"):
        assert name in SHIPPED


OFFLINE_SWEEPS = ("quickstart.yaml", "controlled_digits.yaml", "ppo_builtin.yaml")


@pytest.mark.parametrize("name", OFFLINE_SWEEPS)
def test_the_offline_sweeps_validate_here(name, capsys):
    assert main(["validate", os.path.join(SEARCH_SPACES, name)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in OFFLINE_SWEEPS])
def test_every_other_shipped_search_space_validates_or_names_what_is_missing_offline(name, capsys):
    code = main(["validate", os.path.join(SEARCH_SPACES, name)])
    err = capsys.readouterr().err
    assert code == 0 or any(reason in err for reason in OFFLINE_ONLY), err


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_search_space_validates_where_the_hub_is_reachable(name, monkeypatch, capsys):
    import workloads.core.availability

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(workloads.core.availability, "hub_is_reachable", lambda *a, **k: True)
    code = main(["validate", os.path.join(SEARCH_SPACES, name)])
    err = capsys.readouterr().err
    assert code == 0 or "needs NLTK data" in err, err  # METEOR's WordNet data is not a hub download


# ---------------------------------------------------------------- validate --resolved


def _resolved(tmp_path, capsys, text: str) -> dict:
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    assert main(["validate", "--resolved", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {path}: ")
    return yaml.safe_load(out)


def test_validate_resolved_prints_every_trial_with_its_complete_config(tmp_path, capsys):
    resolved = _resolved(tmp_path, capsys, GOOD)
    spec = parse_spec(GOOD)
    trials = resolved["trials"]
    assert resolved["sweep"] == "demo"
    assert [t["stage"] for t in trials] == ["sft"] * 2 + ["extract"] * 4  # 2 sft points x 2 temperatures
    sft_ids = [resolve_trial(spec.stages[0], {"max_steps": n}, None).trial_id for n in (0, 5)]
    assert [t["trial"] for t in trials[:2]] == sft_ids
    assert trials[0]["config"]["learning_rate"] == 1e-3 and trials[0]["config"]["num_epochs"] == 1  # a default, filled
    for trial in trials[2:]:
        assert trial["parent_trial"] in sft_ids
        assert trial["config"]["model"] == f"@sft/{trial['parent_trial']}"  # the reference the driver fills in
        assert trial["config"]["generation"]["temperature"] == trial["params"]["generation.temperature"]
        assert trial["config"]["generation"]["top_p"] == 1.0 and trial["config"]["seed"] == 7
        expected = resolve_trial(spec.stages[1], trial["params"], trial["parent_trial"]).trial_id
        assert trial["trial"] == expected
    assert len({t["trial"] for t in trials}) == 6


OPTUNA = """
sweep: tuned
stages:
  - name: sft
    workload: sft
    config: {max_steps: 5}
    search:
      optuna: {metric: eval_reward_mean, mode: max, num_samples: 3, params: {learning_rate: {loguniform: [1.0e-5, 1.0e-2]}}}
  - name: extract
    workload: extract
    from_stage: sft
    config: {num_inputs: 8, num_samples_per_input: 4}
"""


def test_validate_resolved_gives_an_optuna_stage_its_base_config_and_search_space(tmp_path, capsys):
    sft, extract = _resolved(tmp_path, capsys, OPTUNA)["trials"]
    assert sft["trial"] is None and sft["trials"] == "3 drawn by Optuna at run time"
    assert sft["search_space"]["params"] == {"learning_rate": {"loguniform": [1e-5, 1e-2]}}
    assert sft["base_config"]["max_steps"] == 5 and sft["base_config"]["learning_rate"] == 1e-4  # the default
    assert extract["trial"] is None  # its parents' ids are drawn at run time
    assert extract["config"]["model"] == "@sft/<trial drawn at run time>"
    assert extract["config"]["num_inputs"] == 8


OPTUNA_AFTER_GRID = """
sweep: tuned_after_grid
stages:
  - name: sft
    workload: sft
    search: {grid: {max_steps: [1, 2]}}
  - name: extract
    workload: extract
    from_stage: sft
    config: {num_inputs: 8, num_samples_per_input: 4}
    search:
      optuna: {metric: reward_mean, mode: max, num_samples: 2, params: {generation.temperature: {uniform: [0.5, 1.5]}}}
"""


def test_validate_resolved_gives_an_optuna_stage_one_search_per_known_parent(tmp_path, capsys):
    trials = _resolved(tmp_path, capsys, OPTUNA_AFTER_GRID)["trials"]
    sft_ids = [t["trial"] for t in trials if t["stage"] == "sft"]
    searches = [t for t in trials if t["stage"] == "extract"]
    assert len(sft_ids) == 2 and all(sft_ids)
    assert [s["parent_trial"] for s in searches] == sft_ids
    assert [s["base_config"]["model"] for s in searches] == [f"@sft/{i}" for i in sft_ids]
    assert all(s["trial"] is None and s["trials"] == "2 drawn by Optuna at run time" for s in searches)


# ---------------------------------------------------------------- config_from

COPIED = """
sweep: paired
stages:
  - name: sft
    workload: sft
    config: {max_steps: 5, learning_rate: 1e-3}
  - name: extract_pretrained
    workload: extract
    config: {model: builtin:tiny-t5, num_inputs: 8, num_samples_per_input: 4, generation: {temperature: 0.7, top_k: 5}}
    search: {grid: {seed: [1, 2]}}
  - name: extract_sft
    workload: extract
    from_stage: sft
    config: {num_inputs: 8, num_samples_per_input: 4, generation: {temperature: 1.0, top_k: 5}}
  - name: extract_sft_again
    workload: extract
    from_stage: sft
    config: {num_inputs: 16, num_samples_per_input: 4, generation: {temperature: 1.0, top_k: 5}}
"""

WITH_CONFIG_FROM = """
sweep: paired
stages:
  - name: sft
    workload: sft
    config: {max_steps: 5, learning_rate: 1e-3}
  - name: extract_pretrained
    workload: extract
    config: {model: builtin:tiny-t5, num_inputs: 8, num_samples_per_input: 4, generation: {temperature: 0.7, top_k: 5}}
    search: {grid: {seed: [1, 2]}}
  - name: extract_sft
    workload: extract
    from_stage: sft
    config_from: extract_pretrained   # model is left to from_stage; the grid is not inherited
    config: {generation: {temperature: 1.0}}
  - name: extract_sft_again
    workload: extract
    from_stage: sft
    config_from: extract_sft          # a chain: extract_pretrained's block, then extract_sft's
    config: {num_inputs: 16}
"""


def test_config_from_resolves_to_the_same_trials_and_sweep_yaml_as_the_copied_blocks(tmp_path, capsys):
    from orchestrator.spec import resolved_spec_yaml

    copied = _resolved(tmp_path, capsys, COPIED)
    named = _resolved(tmp_path, capsys, WITH_CONFIG_FROM)
    assert named == copied
    assert [t["stage"] for t in named["trials"]] == ["sft", "extract_pretrained", "extract_pretrained",
                                                    "extract_sft", "extract_sft_again"]
    assert named["trials"][3]["config"]["generation"] == copied["trials"][3]["config"]["generation"]
    assert named["trials"][3]["config"]["generation"]["top_k"] == 5  # merged, not replaced
    assert named["trials"][4]["config"]["num_inputs"] == 16
    # sweep.yaml (what a rerun compares to resume) is the same too
    assert resolved_spec_yaml(parse_spec(WITH_CONFIG_FROM)) == resolved_spec_yaml(parse_spec(COPIED))


def test_a_file_without_config_from_keeps_its_sweep_yaml():
    """config_from is left out of sweep.yaml, so results written before it existed still resume."""
    from orchestrator.spec import resolved_spec_yaml

    assert "config_from" not in resolved_spec_yaml(parse_spec(GOOD))


def test_config_merge_is_deep_and_a_union_member_of_another_type_replaces_the_base():
    from orchestrator.spec import merge_configs

    base = {"lr": 1, "generation": {"temperature": 0.7, "top_k": 5}, "model": {"type": "mlp", "hidden_sizes": [3]}}
    assert merge_configs(base, {"generation": {"temperature": 1.0}, "model": {"hidden_sizes": [4, 2]}}) == {
        "lr": 1, "generation": {"temperature": 1.0, "top_k": 5}, "model": {"type": "mlp", "hidden_sizes": [4, 2]}}
    assert merge_configs(base, {"model": {"type": "resnet18"}})["model"] == {"type": "resnet18"}
    assert base["generation"] == {"temperature": 0.7, "top_k": 5}  # the base stage's block is left as it was


def test_shipped_controlled_digits_finetune_inherits_pretrain_settings():
    spec, _ = load_spec(os.path.join(SEARCH_SPACES, "controlled_digits.yaml"))
    pretrain, finetune = spec.stages
    assert finetune.config_from == "pretrain"
    for key in ("samples_rnd_seed", "num_labels_per_sample", "model", "learning_rate", "num_epochs"):
        assert finetune.config[key] == pretrain.config[key], key
    assert finetune.config["use_label_sets"] is False and finetune.config["frac_samples_to_modify_labels"] == 0.1
