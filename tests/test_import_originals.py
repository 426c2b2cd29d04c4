"""`rlgrad import` over stand-ins of all 54 original configs (tests/originals.py: the
reference's layout, sections, fields and values, generated here -- the reference's
files are not part of this project), on a machine without NLTK data: every one
imports, names are unique, every file carries its provenance, translated and dropped
values are printed and commented, NLPO stages validate as workload `nlpo`."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.originals import write_originals


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml-rlgrad")
    return write_originals(str(root))


def test_the_stand_ins_are_the_54_originals(originals):
    assert len(originals) == 54
    assert sum(p.endswith(".json") for p in originals) == 12
    assert sum(p.startswith("rl4lms_scripts/extract_samples/") for p in originals) == 7
    assert sum(p.startswith("rl4lms_scripts/training/") for p in originals) == 35
    assert sum("nlpo" in p for p in originals) == 14


@pytest.fixture()
def no_nltk_data(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    from workloads.text.rewards import RewardNotAvailableError, check_reward_available

    with pytest.raises(RewardNotAvailableError):
        check_reward_available("meteor")  # really without WordNet here


def test_every_original_imports_without_nltk_data(originals, no_nltk_data, tmp_path, capsys):
    from orchestrator.cli import main

    names = {}
    for relative, path in sorted(originals.items()):
        out = tmp_path / (relative.replace("/", "_") + ".yaml")
        code = main(["import", path, "-o", str(out)])
        captured = capsys.readouterr()
        assert code == 0, f"{relative}: {captured.err}"
        text = out.read_text()
        assert text.startswith(f"# imported from apple/ml-rlgrad {relative}\n"), relative
        spec = yaml.safe_load(text)
        assert spec["description"].startswith(f"imported from apple/ml-rlgrad {relative}")
        names[spec["sweep"]] = relative
        assert "rlgrad import: translated or dropped values" in captured.err, relative
        workloads = [s["workload"] for s in spec["stages"]]
        if "nlpo" in relative:
            assert workloads[-1] == "nlpo"
            nlpo = spec["stages"][-1]["config"]
            assert {"top_mask", "target_update_iterations", "mask_type", "min_tokens_to_keep"} <= set(nlpo)
        if relative.endswith("_on_supervised.yml"):
            assert workloads[0] == "sft" and spec["stages"][-1]["from_stage"] == "sft"
            assert "# alg.policy.args.model_name: _ -> the supervised checkpoint" in text
        if relative.endswith("_supervised.yml") and "on_supervised" not in relative:
            assert workloads == ["sft"]
        if relative.startswith("rl4lms_scripts/"):
            # dropped evaluation-suite values are commented under the stage's config
            assert "# train_evaluation.metrics:" in text or "# evaluation.eval_batch_size:" in text, relative
    assert len(names) == 54  # unique: task + algorithm + variant
    assert "rl4lms_common_gen_nlpo_on_supervised" in names and "controlled_resnet_cifar_finetune_sgd" in names


def test_translations_have_the_reference_meaning(originals, no_nltk_data, capsys):
    from orchestrator.import_rl4lms import import_rl4lms_file_with_notes

    # CommonGen (T5): HF min_length 5 counts the decoder start token -> 4 new tokens
    spec, notes = import_rl4lms_file_with_notes(originals["rl4lms_scripts/extract_samples/t5_commongen_extract_samples.yml"])
    assert spec["stages"][0]["config"]["generation"]["min_new_tokens"] == 4
    # DailyDialog (GPT-2): min_length is raised by the prompt length -> 2 new tokens; right side in SFT
    spec, _ = import_rl4lms_file_with_notes(originals["rl4lms_scripts/training/dialog/gpt2_ppo.yml"])
    assert spec["stages"][0]["workload"] == "ppo"
    assert spec["stages"][0]["config"]["generation"]["min_new_tokens"] == 2
    spec, _ = import_rl4lms_file_with_notes(originals["rl4lms_scripts/training/dialog/gpt2_supervised.yml"])
    assert spec["stages"][0]["config"]["truncation_side"] == "right"
    # the schedules the importer used to refuse
    spec, _ = import_rl4lms_file_with_notes(originals["rl4lms_scripts/training/cnn/t5_supervised.yml"])
    assert spec["stages"][0]["config"]["lr_scheduler"] == "cosine"
    spec, _ = import_rl4lms_file_with_notes(originals["rl4lms_scripts/training/totto/t5_supervised.yml"])
    assert spec["stages"][0]["config"]["lr_scheduler"] == "constant_with_warmup"
    # IMDB's SFT datapool is imdb_seq2seq (left truncation), its PPO one imdb
    spec, _ = import_rl4lms_file_with_notes(originals["rl4lms_scripts/training/imdb/gpt2_ppo_on_supervised.yml"])
    assert [s["config"]["task"] for s in spec["stages"]] == ["imdb", "imdb"]
    assert spec["stages"][0]["config"]["truncation_side"] == "left"
    # NLPO's mask policy
    spec, _ = import_rl4lms_file_with_notes(originals["rl4lms_scripts/training/iwslt2017/t5_nlpo.yml"])
    config = spec["stages"][0]["config"]
    assert (config["top_mask"], config["target_update_iterations"], config["mask_type"]) == (0.5, 20, "learned_top_p")
    # PPO's rollout keeps the reference's size: n_steps x n_envs token transitions, n_envs prompts a batch
    assert (config["rollout_tokens"], config["inputs_per_rollout"], config["minibatch_size"]) == (5120, 10, 64)


def test_a_wrong_side_or_an_unknown_field_is_one_line(originals, tmp_path, capsys):
    from orchestrator.cli import main

    path = originals["rl4lms_scripts/training/dialog/gpt2_ppo.yml"]
    config = yaml.safe_load(open(path))
    config["env"]["args"]["prompt_truncation_side"] = "right"
    bad = tmp_path / "gpt2_ppo.yml"
    bad.write_text(yaml.safe_dump(config))
    assert main(["import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "env.args.prompt_truncation_side='right' is not supported for 'daily_dialog'" in err
    config = yaml.safe_load(open(path))
    config["alg"]["args"]["clip_range_vf"] = 0.2
    bad.write_text(yaml.safe_dump(config))
    assert main(["import", str(bad)]) == 2
    assert "field 'alg.args.clip_range_vf' is not supported" in capsys.readouterr().err


def test_placeholder_without_its_supervised_config_says_what_to_do(originals, tmp_path, capsys):
    from orchestrator.cli import main

    lonely = tmp_path / "t5_ppo_on_supervised.yml"
    lonely.write_text(open(originals["rl4lms_scripts/training/totto/t5_ppo_on_supervised.yml"]).read())
    assert main(["import", str(lonely)]) == 2
    assert "put the task's *_supervised.yml next to" in capsys.readouterr().err
    assert main(["import", str(lonely), "--sft-config",
                 originals["rl4lms_scripts/training/totto/t5_supervised.yml"]]) == 0
