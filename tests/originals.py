"""Generated stand-ins for the 54 original configs of apple/ml-rlgrad (12 controlled
plans in sft_vs_rft/experiment_plans/, 42 RL4LMs YAMLs in rl4lms_scripts/extract_samples/
and rl4lms_scripts/training/<task>/), written from a reading of those files: the same
sections, fields and value types, with the values the originals use for every field
the importer maps (models, datapools and their arguments, tokenizer settings,
generation kwargs, training/PPO/NLPO arguments, rewards with their arguments) and
representative values for the evaluation-suite sections it drops. The reference's
files themselves are not copied into this project.

    write_originals(root) -> {relative path: absolute path}   # the same layout as the reference
"""

from __future__ import annotations

import copy
import json
import os

import yaml

ROUGE_ARGS = {"max_n": 4, "limit_length": True, "length_limit": 100, "length_limit_type": "words",
              "apply_avg": True, "apply_best": True, "alpha": 0.5, "weight_factor": 1.2, "stemming": True}

# per task: directory, model prefix, model, tokenizer.max_length, datapool id (+ SFT's), datapool args,
# tokenizer truncation side, reward (RL4LMs id, args), extraction generate kwargs, SFT training args,
# PPO: n_steps, episode length, policy generate kwargs, env prompt_truncation_side (None = absent)
TASKS = {
    "narrative_qa": dict(dir="narrative_qa", prefix="t5", model="t5-base", max_length=512, pool="narrative_qa",
                         args=None, side="right", reward=("rouge_l_max", ROUGE_ARGS),
                         extract_gen={"top_k": 50}, sft={"per_device_train_batch_size": 64, "logging_steps": 500,
                                                          "num_train_epochs": 5, "max_steps": -1,
                                                          "weight_decay": 0.01, "lr_scheduler_type": "constant",
                                                          "learning_rate": 0.00001},
                         n_steps=256, episode=50, ppo_gen={"temperature": 1, "top_k": 50}, env_side="right"),
    "totto": dict(dir="totto", prefix="t5", model="t5-base", max_length=512, pool="totto",
                  args={"representation": "subtable"}, side="right", reward=("sacre_bleu", None),
                  extract_gen={"top_k": 0, "min_length": 10, "max_new_tokens": 50},
                  sft={"per_device_train_batch_size": 8, "logging_steps": 20000, "num_train_epochs": 5,
                       "max_steps": -1, "weight_decay": 0.1, "lr_scheduler_type": "constant_with_warmup",
                       "learning_rate": 0.0001},
                  n_steps=256, episode=50, ppo_gen={"temperature": 1, "top_k": 0, "min_length": 10,
                                                    "max_new_tokens": 50}, env_side=None),
    "common_gen": dict(dir="common_gen", prefix="t5", model="t5-base", max_length=20, pool="commongen",
                       args={"concept_end_token": ".", "concept_separator_token": " ",
                             "prefix": "generate a sentence with: "}, side="right", reward=("meteor", None),
                       extract_gen={"top_k": 0, "min_length": 5, "max_new_tokens": 20},
                       sft={"per_device_train_batch_size": 8, "logging_steps": 5000, "num_train_epochs": 4,
                            "max_steps": -1, "weight_decay": 0.01, "lr_scheduler_type": "cosine",
                            "learning_rate": 0.00001},
                       n_steps=128, episode=20, ppo_gen={"temperature": 1, "top_k": 0, "min_length": 5,
                                                         "max_new_tokens": 20}, env_side="right"),
    "iwslt2017": dict(dir="iwslt2017", prefix="t5", model="t5-base", max_length=128, pool="iwslt2017en_de",
                      args={"prompt_prefix": "translate English to German: "}, side="right",
                      reward=("sacre_bleu", {"tokenize": "intl"}), extract_gen={"top_k": 10, "max_new_tokens": 128},
                      sft={"per_device_train_batch_size": 64, "logging_steps": 1000, "num_train_epochs": 5,
                           "weight_decay": 0.1, "lr_scheduler_type": "constant", "learning_rate": 0.00001},
                      n_steps=512, episode=128, ppo_gen={"top_k": 10, "max_new_tokens": 128}, env_side="right"),
    "cnn_daily_mail": dict(dir="cnn", prefix="t5", model="t5-base", max_length=512, pool="cnn_daily_mail",
                           args={"prompt_prefix": "Summarize: "}, side="right", reward=("meteor", None),
                           extract_gen={"top_k": 50, "min_length": 50, "max_new_tokens": 100},
                           sft={"per_device_train_batch_size": 16, "logging_steps": 5000, "num_train_epochs": 2,
                                "max_steps": -1, "weight_decay": 0.1, "lr_scheduler_type": "cosine",
                                "learning_rate": 0.0001},
                           n_steps=512, episode=100, ppo_gen={"top_k": 50, "min_length": 50, "max_new_tokens": 100},
                           env_side="right"),
    "daily_dialog": dict(dir="dialog", prefix="gpt2", model="gpt2", max_length=128, pool="daily_dialog",
                         args={"context_size": 5}, side="right", reward=("meteor", None),
                         extract_gen={"top_k": 20, "min_length": 2, "max_new_tokens": 20},
                         sft={"per_device_train_batch_size": 32, "logging_steps": 300, "num_train_epochs": 20,
                              "lr_scheduler_type": "constant", "learning_rate": 0.00001},
                         n_steps=128, episode=20, ppo_gen={"top_k": 20, "min_length": 2, "max_new_tokens": 20},
                         env_side=None),
    "imdb": dict(dir="imdb", prefix="gpt2", model="lvwerra/gpt2-imdb", max_length=64, pool="imdb",
                 sft_pool="imdb_seq2seq", args={"seed": 42, "only_positive_samples": True},
                 sft_args={"positive_ratio": 1.0, "seed": 42}, side="left",
                 reward=("learned_reward", {"model_name": "lvwerra/distilbert-imdb", "label_ix": 1,
                                            "include_prompt_for_eval": True}),
                 extract_reward=("learned_reward", {"model_name": "lvwerra/distilbert-imdb", "label_ix": 1,
                                                    "batch_size": 100}),
                 extract_gen={"min_length": 48, "max_new_tokens": 48},
                 sft={"per_device_train_batch_size": 16, "logging_steps": 200, "num_train_epochs": 10,
                      "lr_scheduler_type": "constant", "learning_rate": 0.00001},
                 n_steps=128, episode=48, ppo_gen={"min_length": 48, "max_new_tokens": 48}, env_side=None),
}
EXTRACT_FILES = {"narrative_qa": "t5_narrative_qa", "totto": "t5_totto", "common_gen": "t5_commongen",
                 "iwslt2017": "t5_iwslt2017", "cnn_daily_mail": "t5_cnn", "daily_dialog": "gpt2_dialog",
                 "imdb": "gpt2_imdb"}


def _tokenizer(t: dict) -> dict:
    causal = t["prefix"] == "gpt2"
    return {"model_name": t["model"], "padding_side": "left", "truncation_side": t["side"],
            "pad_token_as_eos_token": causal, "max_length": t["max_length"]}


def _datapool(t: dict, sft: bool = False, extract: bool = False) -> dict:
    pool = {"id": t.get("sft_pool", t["pool"]) if sft else t["pool"]}
    if extract:
        pool.update(num_train_samples=5000, train_samples_rnd_seed=7)
    else:
        pool.update(frac_train_samples=-1, train_samples_rnd_seed=-1)
    args = t.get("sft_args", t["args"]) if sft else t["args"]
    if args is not None:
        pool["args"] = dict(args)
    return pool


def _reward(reward: tuple) -> dict:
    rid, args = reward
    return {"id": rid} if args is None else {"id": rid, "args": dict(args)}


def _train_evaluation(t: dict, rl: bool) -> dict:
    section = {"eval_batch_size": 50, "metrics": [{"id": "meteor", "args": {}}, {"id": "rouge"},
                                                  {"id": "bert_score", "args": {"language": "en"}},
                                                  {"id": "diversity", "args": {}}],
               "generation_kwargs": {"num_beams": 4, "max_new_tokens": t["episode"], "post_processing_fn": None}}
    if rl:
        section.update(n_iters=100 if t["prefix"] == "t5" else 50, eval_every=10, save_every=1)
    return section


def extract_config(task: str) -> dict:
    t = TASKS[task]
    metric = _reward(t.get("extract_reward", t["reward"]))
    metric.setdefault("args", {})
    return {"tokenizer": _tokenizer(t), "datapool": _datapool(t, extract=True),
            "alg": {"model_type": "causal" if t["prefix"] == "gpt2" else "seq2seq", "model_name": t["model"],
                    "generation_kwargs": {"do_sample": True, **t["extract_gen"], "post_processing_fn": None}},
            "evaluation": {"eval_batch_size": 256, "num_samples_per_input": 10, "metrics": [metric]}}


def supervised_config(task: str) -> dict:
    t = TASKS[task]
    return {"tokenizer": _tokenizer(t), "datapool": _datapool(t, sft=True),
            "alg": {"id": "supervised", "training_args": {**t["sft"], "save_total_limit": 1},
                    "model_type": "causal" if t["prefix"] == "gpt2" else "seq2seq", "model_name": t["model"],
                    "generation_kwargs": {"do_sample": True, **t["extract_gen"]}},
            "train_evaluation": _train_evaluation(t, rl=False)}


def rl_config(task: str, alg: str, on_supervised: bool) -> dict:
    t = TASKS[task]
    causal = t["prefix"] == "gpt2"
    env_args = {"max_prompt_length": t["max_length"], "max_episode_length": t["episode"], "terminate_on_eos": True}
    if not causal:
        env_args["context_start_token"] = 0
    if t["env_side"] is not None:
        env_args["prompt_truncation_side"] = t["env_side"]
    policy_args = {"model_name": "_" if on_supervised else t["model"], "apply_model_parallel": True}
    if t["env_side"] is not None:
        policy_args["prompt_truncation_side"] = t["env_side"]
    if alg == "nlpo":
        policy_args.update(mask_type="learned_top_p", top_mask=0.5 if task == "iwslt2017" else 0.9,
                           target_update_iterations=5 if task == "imdb" else 20, min_tokens_to_keep=100)
    policy_args["generation_kwargs"] = {"do_sample": True, **t["ppo_gen"]}
    kind = ("maskable_" if alg == "nlpo" else "") + ("causal" if causal else "seq2seq") + "_lm_actor_critic_policy"
    alg_args = {"n_steps": t["n_steps"], "batch_size": 64, "verbose": 1,
                "learning_rate": 0.000001 if causal else 0.000002, "n_epochs": 5}
    if not causal:
        alg_args.update(enforce_token_entropy_reg_estimate=False, ent_coef=0.01 if task == "common_gen" else 0)
    return {"tokenizer": _tokenizer(t), "reward_fn": _reward(t["reward"]), "datapool": _datapool(t),
            "env": {"n_envs": 10, "args": env_args},
            "alg": {"id": alg, "args": alg_args, "kl_div": {"coeff": 0.01 if on_supervised else 0.001,
                                                            "target_kl": 0.2},
                    "policy": {"id": kind, "args": policy_args}},
            "train_evaluation": _train_evaluation(t, rl=True)}


# ---------------------------------------------------------------- the 12 controlled plans

PLAN_BASE = {
    "experiment_name": "{dataset}_{model_type}_{opt_method}_finetune_{reward_type}", "random_seed": -1,
    "gpu_ids": [0], "trainer_checkpoint": "", "epochs": 5000, "validate_every": 1, "outputs_dir": "outputs",
    "disable_console_log": False, "save_logs": True, "train_batch_log_interval": -1, "epoch_log_interval": 10,
    "save_metric_plots": True, "save_every_num_val": 100, "use_tensorboard": False, "use_wandb": False,
    "wandb_project_name": "p", "wandb_entity_name": "", "wandb_resume_id": "", "wandb_track_model": None,
    "wandb_exclude_files": ["plots/**"], "score_metric_name": "train loss", "is_train_metric": True,
    "score_largest": False, "return_best_score": False, "save_checkpoints": True, "num_checkpoints": 1,
    "save_checkpoints_by_score": False, "early_stop": False, "early_stop_min_delta": 0, "early_stop_patience": 0,
    "early_stop_cooldown": 0, "early_stop_restore_best_weights": False, "num_labels_per_sample": 1,
    "use_multiple_labels_per_sample": False, "frac_samples_to_modify_labels": 0, "mlp_hidden_layer_sizes": [250, 100],
    "init_rnd_seed": -1, "samples_rnd_seed": -1, "opt_method": "supervised", "reward_type": "labels", "min_reward": -1,
    "optimizer": "adam", "lr": 0.0001, "weight_decay": 0, "kl_regularization_coeff": 0, "kl_reg_ref_unif": False,
    "logits_temperature": 1, "batch_size": 512, "load_model_from_checkpoint": "ADD PATH TO CHECKPOINT",
}
PLAN_MODELS = {  # file stem: (dataset, model_type, train, test, labels per sample, sgd lr)
    "mlp_mnist": ("mnist", "mlp", 1000, 1000, 5, 0.01),
    "resnet_cifar": ("cifar10", "resnet18", 10000, 1000, 5, 0.01),
    "bert_stsb": ("stsb", "bert-mini", -1, -1, 3, 0.001),
}


def plan_config(stem: str, variant: str) -> dict:
    dataset, model_type, n_train, n_test, m, sgd_lr = PLAN_MODELS[stem]
    base = dict(PLAN_BASE, dataset=dataset, model_type=model_type, num_train_samples=n_train,
                num_test_samples=n_test)
    options = {"optimizer": ["adam"], "lr": [0.0001], "opt_method": ["expected_reinforce", "supervised"],
               "num_labels_per_sample": [m], "use_multiple_labels_per_sample": [False],
               "frac_samples_to_modify_labels": [0.1], "init_rnd_seed": [111], "samples_rnd_seed": [192]}
    if stem == "mlp_mnist" and variant != "pretrain":
        options["change_label_per_class"] = [False]
    if variant == "pretrain":
        base.update(epochs=1000, validate_every=10, save_every_num_val=10, load_model_from_checkpoint="")
        options.update(opt_method=["supervised"], use_multiple_labels_per_sample=[True])
        del options["frac_samples_to_modify_labels"]
    elif variant == "finetune_sgd":
        options.update(optimizer=["sgd"], lr=[sgd_lr])
    elif variant == "finetune_high_init_reward":
        base["reward_type"] = "labels_with_custom"
    name = "Pretraining" if variant == "pretrain" else "Finetuning"
    return {"name": f"Supervised vs Reinforcement {model_type} {name} controlled experiments plan", "description": "",
            "skip": 0, "repetitions": 1, "largest": False, "multiprocess": False, "num_parallel": 1,
            "gpu_ids_pool": [], "configurations": [{"base_config": base, "options": options}]}


def write_originals(root: str) -> dict[str, str]:
    """Write the 54 stand-ins under `root` in the reference's layout; {relative path: path}."""
    files: dict[str, object] = {}
    for task, stem in EXTRACT_FILES.items():
        files[f"rl4lms_scripts/extract_samples/{stem}_extract_samples.yml"] = extract_config(task)
    for task, t in TASKS.items():
        directory = f"rl4lms_scripts/training/{t['dir']}/{t['prefix']}"
        files[f"{directory}_supervised.yml"] = supervised_config(task)
        for alg in ("ppo", "nlpo"):
            files[f"{directory}_{alg}.yml"] = rl_config(task, alg, on_supervised=False)
            files[f"{directory}_{alg}_on_supervised.yml"] = rl_config(task, alg, on_supervised=True)
    for stem in PLAN_MODELS:
        for variant in ("pretrain", "finetune", "finetune_sgd", "finetune_high_init_reward"):
            files[f"sft_vs_rft/experiment_plans/sft_vs_rft_{stem}_{variant}_experiments_plan.json"] = \
                plan_config(stem, variant)
    paths = {}
    for relative, content in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            if relative.endswith(".json"):
                json.dump(content, f, indent=1)
            else:
                yaml.safe_dump(copy.deepcopy(content), f, sort_keys=False)
        paths[relative] = path
    return paths
