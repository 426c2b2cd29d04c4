"""cluster.yaml is a valid Ray autoscaler config with the security properties we
promise, and the code loads nothing unsafely and never hands a string to a shell."""

import ast
import json
import os
import re

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_valid_against_the_schema_ray_ships(cluster):
    import jsonschema
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(cluster, schema)
    # and Ray's own validator (defaults filled, node types cross-checked)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(dict(cluster)))


def test_a_cpu_head_and_autoscaled_gpu_workers_that_install_rlgrad(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # no trial workers on the head
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"] and t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(t["max_workers"] >= 1 and t["min_workers"] >= 0 for t in gpu)
    assert cluster["max_workers"] >= max(t["max_workers"] for t in gpu)
    assert any("pip install" in c and "rlgrad" in c for c in cluster["setup_commands"])
    assert "." in cluster["file_mounts"].values()


def test_only_ssh_is_open_and_the_dashboard_listens_on_loopback(cluster):
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(22, 22, "tcp")]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "ray-client-server-port" not in head_start  # the client port is not exposed either


def _python_sources():
    for top in ("orchestrator", "workloads", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    yield os.path.relpath(path, REPO), open(path, encoding="utf-8").read()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def test_checkpoints_and_yaml_load_safely_and_no_shell():
    safe_loaders = {"_YamlLoader", "YamlLoader", "yaml.SafeLoader", "SafeLoader"}  # ours subclasses SafeLoader
    for path, text in _python_sources():
        for name, call in _calls(ast.parse(text)):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            where = f"{path}:{call.lineno}"
            if name == "torch.load":
                assert keywords.get("weights_only") == "True", f"{where}: torch.load without weights_only=True"
            if name == "yaml.load":
                assert keywords.get("Loader") in safe_loaders, f"{where}: yaml.load with an unsafe loader"
            assert name not in ("yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads",
                                "os.system", "os.popen", "eval", "exec"), where
            if name.startswith("subprocess."):
                assert keywords.get("shell", "False") == "False", f"{where}: shell=True"
