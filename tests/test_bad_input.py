"""Every kind of bad input: one line naming the thing, exit status 2, and the
results already on disk untouched. Table-driven, through the real CLI entry point."""

import hashlib
import os
import socket

import pytest

from orchestrator.cli import main

GOOD_STAGE = """
  - name: extract
    workload: extract
    config: {num_inputs: 4, num_samples_per_input: 2, generation: {temperature: 1.0}}
"""


def _spec(stage=GOOD_STAGE, sweep="bad"):
    return f"sweep: {sweep}\nstages:{stage}"


CASES = {
    # name: (spec text, extra CLI args, text the error must contain)
    "a sweep file that is not UTF-8": (_spec().replace("sweep: bad", "sweep: bad # caf\xe9").encode("latin-1"), [],
                                       "spec.yaml: the sweep file is not UTF-8 text (byte 0xe9 at line 1); save it as UTF-8"),
    "malformed YAML": ("sweep: bad\nstages: [\n  {name: x\n", [], "not valid YAML at line"),
    "unknown key, with a suggestion": (_spec(GOOD_STAGE.replace("num_inputs", "num_input")), [],
                                       "unknown key 'num_input' (did you mean 'num_inputs'?)"),
    "wrong type": (_spec(GOOD_STAGE.replace("num_inputs: 4", "num_inputs: many")), [],
                   "stages[0].config.num_inputs = 'many': Input should be a valid integer"),
    "out-of-range value": (_spec(GOOD_STAGE.replace("temperature: 1.0", "temperature: 0")), [],
                           "stages[0].config.generation.temperature = 0: Input should be greater than 0"),
    "unknown workload": (_spec(GOOD_STAGE.replace("workload: extract", "workload: extrct")), [],
                         "unknown workload (did you mean 'extract'?)"),
    "unknown dataset": (_spec("\n  - name: c\n    workload: controlled\n    config: {dataset: mnistt}\n"), [],
                        "stages[0].config.dataset = 'mnistt': Input should be 'digits', 'mnist', 'cifar10' or 'stsb'"),
    "unknown model": (_spec(GOOD_STAGE.replace("num_inputs: 4", "model: 'builtin:huge', num_inputs: 4")), [],
                      "unknown built-in model 'builtin:huge'; built-in models: builtin:tiny-gpt2, builtin:tiny-t5"),
    "missing model directory": (_spec(GOOD_STAGE.replace("num_inputs: 4", "model: ./no/such/ckpt, num_inputs: 4")), [],
                                "model './no/such/ckpt': no such directory"),
    "unknown reward": (_spec(GOOD_STAGE.replace("num_inputs: 4", "reward: bleurt, num_inputs: 4")), [],
                       "unknown reward 'bleurt'"),
    "dataset unavailable offline": (_spec(GOOD_STAGE.replace("num_inputs: 4", "task: narrative_qa, model: 'builtin:tiny-t5', num_inputs: 4")), [],
                                    "dataset 'narrative_qa' (deepmind/narrativeqa) is not available offline"),
    "unwritable storage": (_spec(), ["--results", "{tmp}/a-file/results"], "cannot write results to"),
    "a different sweep under the same name": (_spec(sweep="old"), [], "already holds a different sweep named 'old'"),
    "a sweep another driver is running": (_spec(sweep="busy"), [], "is in use by another rlgrad run"),
}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


def _digest(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def earlier_results(tmp_path):
    """A results root holding an earlier sweep 'old' and a sweep 'busy' whose driver (this process) is alive."""
    root = tmp_path / "results"
    (root / "old" / "samples" / "extract" / "t").mkdir(parents=True)
    (root / "old" / "sweep.yaml").write_text("sweep: old\nstages: []\n")
    (root / "old" / "samples" / "extract" / "t" / "inputs-000000-000003.parquet").write_bytes(b"earlier rows")
    (root / "busy").mkdir()
    (root / "busy" / ".driver.lock").write_text(f"{os.getpid()} 0\n")
    (tmp_path / "a-file").write_text("not a directory")
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_results_untouched(case, tmp_path, earlier_results, capsys, monkeypatch):
    text, args, expected = CASES[case]
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(text) if isinstance(text, bytes) else spec.write_text(text)
    if case == "a sweep another driver is running":
        from orchestrator.spec import parse_spec, resolved_spec_yaml

        (earlier_results / "busy" / "sweep.yaml").write_text(resolved_spec_yaml(parse_spec(text)))
    before = _digest(earlier_results)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] or ["--results", str(earlier_results)]
    code = main(["run", str(spec), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rlgrad: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert _digest(earlier_results) == before
    assert not (earlier_results / "bad").exists()


def test_unreachable_object_store_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    spec = tmp_path / "spec.yaml"
    spec.write_text(_spec())
    code = main(["run", str(spec), "--results", "s3://rlgrad-bucket/results"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot write results to s3://rlgrad-bucket/results" in err


def test_unknown_sweep_in_report_status_and_query(tmp_path, earlier_results, capsys):
    for argv in (["report", "nope"], ["status", "nope"], ["query", "SELECT 1", "--sweep", "nope"]):
        code = main([*argv, "--results", str(earlier_results)])
        err = capsys.readouterr().err
        assert code == 2 and "no sweep named 'nope'" in err and err.count("\n") == 1, (argv, err)
    # a corrupted shard is named, not skipped
    code = main(["query", "SELECT count(*) FROM samples", "--results", str(earlier_results)])
    err = capsys.readouterr().err
    assert code == 2 and "inputs-000000-000003.parquet" in err and err.count("\n") == 1, err
    os.remove(earlier_results / "old" / "samples" / "extract" / "t" / "inputs-000000-000003.parquet")
    code = main(["query", "SELECT nonsense FROM samples", "--results", str(earlier_results)])
    err = capsys.readouterr().err
    assert code == 2 and "query failed" in err and err.count("\n") == 1, err


def test_yaml_is_parsed_safely(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("sweep: !!python/object/apply:os.system ['echo pwned']\nstages: []\n")
    code = main(["validate", str(spec)])
    err = capsys.readouterr().err
    assert code == 2 and "not valid YAML" in err
