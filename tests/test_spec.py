"""Sweep files: what is accepted, and the one-line errors for what is not."""

import os
import subprocess
import sys
import textwrap

import pytest

from orchestrator.cli import main
from orchestrator.spec import SpecError, grid_points, parse_spec, resolve_trial

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
