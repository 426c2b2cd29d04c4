"""The RL4LMs-config importer on configs written here in the form of the
reference files (apple/ml-rlgrad rl4lms_scripts/): an extract-samples config,
a supervised config and PPO configs become one-stage specs whose configs
validate; unsupported fields and values are named."""

import copy

import pytest
import yaml

from orchestrator.import_rl4lms import Rl4lmsImportError, import_rl4lms_file, rl4lms_to_spec
from workloads import validate_config
from workloads import WORKLOADS

NARRATIVE_QA_TOKENIZER = {"model_name": "t5-base", "padding_side": "left", "truncation_side": "right",
                          "pad_token_as_eos_token": False, "max_length": 512}
ROUGE_ARGS = {"max_n": 4, "limit_length": True, "length_limit": 100, "length_limit_type": "words",
              "apply_avg": True, "apply_best": True, "alpha": 0.5, "weight_factor": 1.2, "stemming": True}

EXTRACT_IWSLT = """
tokenizer:
  model_name: t5-base
  padding_side: left
  truncation_side: right
  pad_token_as_eos_token: False
  max_length: 128
datapool:
  id: iwslt2017en_de
  num_train_samples: 5000
  train_samples_rnd_seed: 7
  args:
    prompt_prefix: "translate English to German: "
alg:
  model_type: seq2seq
  model_name: "t5-base"
  generation_kwargs:
    do_sample: True
    top_k: 10
    max_new_tokens: 128
    post_processing_fn: null
evaluation:
  eval_batch_size: 128
  num_samples_per_input: 10
  metrics:
    - id: sacre_bleu
      args:
        tokenize: "intl"
"""

SUPERVISED_NARRATIVE_QA = {
    "tokenizer": NARRATIVE_QA_TOKENIZER,
    "datapool": {"id": "narrative_qa", "frac_train_samples": -1, "train_samples_rnd_seed": -1},
    "alg": {"id": "supervised",
            "training_args": {"per_device_train_batch_size": 64, "logging_steps": 500, "num_train_epochs": 5,
                              "max_steps": -1, "weight_decay": 0.01, "lr_scheduler_type": "constant",
                              "learning_rate": 0.00001, "save_total_limit": 1},
            "model_type": "seq2seq", "model_name": "t5-base",
            "generation_kwargs": {"temperature": 1, "do_sample": True, "top_k": 50}},
    "train_evaluation": {"eval_batch_size": 50,
                         "metrics": [{"id": "meteor", "args": {}}, {"id": "rouge_l_max", "args": ROUGE_ARGS}],
                         "generation_kwargs": {"num_beams": 4, "max_new_tokens": 50}},
}

PPO_NARRATIVE_QA = {
    "tokenizer": NARRATIVE_QA_TOKENIZER,
    "reward_fn": {"id": "rouge_l_max", "args": ROUGE_ARGS},
    "datapool": {"id": "narrative_qa", "frac_train_samples": -1, "train_samples_rnd_seed": -1},
    "env": {"n_envs": 10, "args": {"max_prompt_length": 512, "max_episode_length": 50, "terminate_on_eos": True,
                                   "context_start_token": 0, "prompt_truncation_side": "right"}},
    "alg": {"id": "ppo",
            "args": {"n_steps": 256, "batch_size": 64, "verbose": 1, "learning_rate": 0.000002, "n_epochs": 5,
                     "enforce_token_entropy_reg_estimate": False, "ent_coef": 0},
            "kl_div": {"coeff": 0.001, "target_kl": 1.0},
            "policy": {"id": "seq2seq_lm_actor_critic_policy",
                       "args": {"model_name": "t5-base", "apply_model_parallel": True,
                                "prompt_truncation_side": "right",
                                "generation_kwargs": {"temperature": 1, "do_sample": True, "top_k": 50}}}},
    "train_evaluation": {"eval_batch_size": 50, "n_iters": 100, "eval_every": 10, "save_every": 1,
                         "metrics": [{"id": "rouge_l_max", "args": ROUGE_ARGS}],
                         "generation_kwargs": {"num_beams": 4, "max_new_tokens": 50}},
}


def only_stage(spec):
    assert len(spec["stages"]) == 1
    return spec["stages"][0]


def test_extract_samples_config(tmp_path):
    path = tmp_path / "t5_iwslt2017_extract_samples.yml"
    path.write_text(EXTRACT_IWSLT)
    spec = import_rl4lms_file(str(path))
    stage = only_stage(spec)
    assert spec["sweep"] == "t5_iwslt2017_extract_samples" and stage["workload"] == "extract"
    assert stage["config"] == {
        "model": "t5-base", "task": "iwslt2017", "num_samples_per_input": 10, "num_inputs": 5000, "seed": 7,
        "generation": {"top_k": 10, "max_new_tokens": 128, "max_prompt_length": 128},
        "reward": "sacrebleu", "reward_args": {"tokenize": "intl"}}
    config = validate_config("extract", stage["config"])
    assert config.generation.max_prompt_length == 128 and config.reward_args == {"tokenize": "intl"}


def test_supervised_config():
    stage = only_stage(rl4lms_to_spec(copy.deepcopy(SUPERVISED_NARRATIVE_QA), "nqa_sft"))
    assert stage["workload"] == "sft"
    config = validate_config("sft", stage["config"])
    assert (config.task, config.model, config.batch_size, config.num_epochs, config.max_steps) == \
        ("narrative_qa", "t5-base", 64, 5, -1)
    assert (config.learning_rate, config.weight_decay, config.log_every_steps, config.max_prompt_length) == \
        (1e-5, 0.01, 500, 512)
    assert config.frac_train_samples == 1.0 and config.num_train_inputs >= 1_000_000  # all train inputs


@pytest.mark.skipif("ppo" not in WORKLOADS, reason="PPOConfig is not registered yet")
def test_ppo_config():
    stage = only_stage(rl4lms_to_spec(copy.deepcopy(PPO_NARRATIVE_QA), "nqa_ppo"))
    assert stage["workload"] == "ppo"
    config = validate_config("ppo", stage["config"])
    assert (config.model, config.task, config.learning_rate, config.ppo_epochs, config.minibatch_size) == \
        ("t5-base", "narrative_qa", 2e-6, 5, 64)
    assert (config.kl_coef, config.target_kl, config.ent_coef, config.num_rollouts) == (0.001, 1.0, 0.0, 100)
    assert config.reward == "rouge_l_max"
    assert config.reward_args == {"stemming": True, "alpha": 0.5, "length_limit": 100}
    assert (config.generation.top_k, config.generation.max_new_tokens, config.generation.temperature) == (50, 50, 1.0)
    # the reference's buffer: n_steps 256 x n_envs 10 token transitions, batches of 10 prompts (K = 4 each)
    assert (config.rollout_tokens, config.inputs_per_rollout, config.num_samples_per_input) == (2560, 10, 4)


def test_ppo_with_learned_reward_maps_its_arguments():
    imdb = yaml.safe_load("""
tokenizer: {model_name: lvwerra/gpt2-imdb, padding_side: left, truncation_side: left, pad_token_as_eos_token: True,
            max_length: 64}
reward_fn: {id: learned_reward, args: {model_name: lvwerra/distilbert-imdb, label_ix: 1, include_prompt_for_eval: True}}
datapool: {id: imdb, frac_train_samples: -1, train_samples_rnd_seed: -1, args: {seed: 42, only_positive_samples: True}}
env: {n_envs: 10, args: {max_prompt_length: 64, max_episode_length: 48, terminate_on_eos: True}}
alg:
  id: ppo
  args: {n_steps: 128, batch_size: 64, verbose: 1, learning_rate: 0.000001, n_epochs: 5}
  kl_div: {coeff: 0.1, target_kl: 0.1}
  policy: {id: causal_lm_actor_critic_policy, args: {model_name: lvwerra/gpt2-imdb, apply_model_parallel: True,
           generation_kwargs: {do_sample: True, min_length: 48, max_new_tokens: 48}}}
train_evaluation: {eval_batch_size: 64, n_iters: 50, eval_every: 10, save_every: 10, metrics: []}
""")
    config = only_stage(rl4lms_to_spec(imdb, "imdb_ppo"))["config"]
    assert config["reward"] == "learned"
    assert config["reward_args"] == {"model": "lvwerra/distilbert-imdb", "label_index": 1, "include_prompt": True}
    assert config["generation"] == {"min_new_tokens": 48, "max_new_tokens": 48, "max_prompt_length": 64}
    assert (config["kl_coef"], config["target_kl"], config["num_rollouts"]) == (0.1, 0.1, 50)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["alg"]["training_args"].update(lr_scheduler_type="cosine"),
     r"alg.training_args.lr_scheduler_type='cosine' is not supported"),
    (lambda c: c["alg"]["training_args"].update(gradient_accumulation_steps=4),
     r"field 'alg.training_args.gradient_accumulation_steps' is not supported"),
    (lambda c: c["datapool"].update(id="xsum"), r"datapool.id='xsum' is not supported"),
    (lambda c: c["datapool"].update(args={"context_size": 3}),
     r"datapool.args.context_size is not supported for datapool 'narrative_qa'"),
    (lambda c: c["tokenizer"].update(truncation_side="left"), r"tokenizer.truncation_side='left' is not supported"),
    (lambda c: c["alg"].update(id="nlpo"), r"alg.id='nlpo' is not supported"),
    (lambda c: c.update(wandb={"project": "x"}), r"field 'wandb.project' is not supported"),
])
def test_unsupported_fields_are_named(edit, message):
    config = copy.deepcopy(SUPERVISED_NARRATIVE_QA)
    edit(config)
    with pytest.raises(Rl4lmsImportError, match=message):
        rl4lms_to_spec(config, "x")


def test_ppo_on_supervised_placeholder_and_beam_search_are_named():
    config = copy.deepcopy(PPO_NARRATIVE_QA)
    config["alg"]["policy"]["args"]["model_name"] = "_"
    with pytest.raises(Rl4lmsImportError, match="placeholder .* `from_stage: sft`"):
        rl4lms_to_spec(config, "x")
    config = copy.deepcopy(PPO_NARRATIVE_QA)
    config["alg"]["policy"]["args"]["generation_kwargs"]["num_beams"] = 4
    with pytest.raises(Rl4lmsImportError, match=r"generation_kwargs.num_beams is not supported"):
        rl4lms_to_spec(config, "x")
    extract = yaml.safe_load(EXTRACT_IWSLT)
    extract["evaluation"]["metrics"].append({"id": "bleu", "args": {}})
    with pytest.raises(Rl4lmsImportError, match=r"one reward, got \['sacre_bleu', 'bleu'\]"):
        rl4lms_to_spec(extract, "x")


@pytest.fixture(autouse=True)
def _translation_only(hub_assumed_reachable):
    """These tests check how configs translate, not whether data or models can be had here."""
