"""Import the original project's RL4LMs-style GRUE configs (apple/ml-rlgrad
rl4lms_scripts/extract_samples/*.yml and rl4lms_scripts/training/*/*.yml) as
rlgrad sweep specs:

    config kind                                       stage(s)
    `evaluation.num_samples_per_input` (extraction)   extract
    `alg.id: supervised`                              sft
    `alg.id: ppo` / `nlpo`                            ppo / nlpo
    ... `*_on_supervised.yml` (policy model "_")      sft (from the sibling *_supervised.yml) -> ppo / nlpo

Every field of the original is read: copied to the field of ours with the same
meaning, translated (the value changes because the two programs count
differently, e.g. HF `min_length` vs `min_new_tokens`), or dropped (it steers
only the original's logging, evaluation suite, checkpoint housekeeping or
device placement). Each translated or dropped value becomes a `Note`, which
`rlgrad import` prints as a table and writes as a YAML comment beside the field
(orchestrator/import_notes.py). A field the importer does not know, or a value
rlgrad cannot honour (beam search, a datapool argument other than the prompt
format rlgrad implements), is an error naming the field.

NLPO (rl4lms/algorithms/nlpo/) becomes a stage of workload `nlpo`: the PPO
fields plus the mask policy's, under the reference's names (NLPO_FIELDS;
workloads/text/nlpo_config.py). Where a workload is not registered, `rlgrad
import` validates the PPO part of such a stage and defers the rest (it says so).

PPO's rollout keeps the reference's size and minibatching: `n_steps` x `n_envs`
token transitions per iteration become rollout_tokens, filled by batches of
`n_envs` prompts (inputs_per_rollout), and `batch_size` stays a count of token
transitions (minibatch_size). One deliberate difference: K = 4 completions per
prompt (RL4LMs draws one), so that each prompt's reward std is observed.

Sweeps are named rl4lms_<task>_<algorithm>[_on_supervised] (unique over the 42
originals) and carry a provenance line naming apple/ml-rlgrad and the original path.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from .import_notes import Note, provenance
from .spec import YamlLoader

# RL4LMs datapool id -> (rlgrad task, datapool arguments and the only values rlgrad implements)
DATAPOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    "narrative_qa": ("narrative_qa", {}),
    "totto": ("totto", {"representation": "subtable"}),
    "commongen": ("common_gen", {"prefix": "generate a sentence with: ", "concept_separator_token": " ",
                                 "concept_end_token": "."}),
    "iwslt2017en_de": ("iwslt2017", {"prompt_prefix": "translate English to German: "}),
    "cnn_daily_mail": ("cnn_daily_mail", {"prompt_prefix": "Summarize: "}),
    "daily_dialog": ("daily_dialog", {"context_size": 5}),
    "imdb": ("imdb", {"seed": 42, "only_positive_samples": True}),
    "imdb_seq2seq": ("imdb", {"seed": 42, "positive_ratio": 1.0}),  # the SFT view of the same reviews
}

# RL4LMs reward / metric id -> (rlgrad reward, {their argument: our argument or None = dropped})
REWARD_IDS: dict[str, tuple[str, dict[str, str | None]]] = {
    # max_n, apply_avg, apply_best and weight_factor do not change the ROUGE-L F of one
    # output against one reference; limit_length + length_limit(_type) become length_limit
    "rouge_l_max": ("rouge_l_max", {"stemming": "stemming", "alpha": "alpha", "length_limit": "length_limit",
                                    "limit_length": None, "length_limit_type": None, "max_n": None,
                                    "apply_avg": None, "apply_best": None, "weight_factor": None}),
    "sacre_bleu": ("sacrebleu", {"tokenize": "tokenize", "lowercase": "lowercase"}),
    "meteor": ("meteor", {}),
    "learned_reward": ("learned", {"model_name": "model", "label_ix": "label_index", "batch_size": "batch_size",
                                   "include_prompt_for_eval": "include_prompt"}),
}
ROUGE_DROPPED_WHY = "does not change the ROUGE-L F-measure of one output against its references"

# HF generate() kwargs -> GenerationConfig field (min_length is translated, see _generation)
GENERATION_KWARGS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                     "min_length": "min_new_tokens", "max_new_tokens": "max_new_tokens"}

SFT_TRAINING_ARGS = {"per_device_train_batch_size": "batch_size", "num_train_epochs": "num_epochs",
                     "max_steps": "max_steps", "weight_decay": "weight_decay", "learning_rate": "learning_rate",
                     "logging_steps": "log_every_steps", "lr_scheduler_type": "lr_scheduler",
                     "warmup_steps": "warmup_steps", "warmup_ratio": "warmup_ratio", "max_grad_norm": "max_grad_norm"}
SFT_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")

PPO_ARGS = {"learning_rate": "learning_rate", "n_epochs": "ppo_epochs", "batch_size": "minibatch_size",
            "ent_coef": "ent_coef", "gamma": "gamma", "gae_lambda": "gae_lambda", "clip_range": "clip_range",
            "vf_coef": "vf_coef", "max_grad_norm": "max_grad_norm"}

# NLPO's mask-policy fields (rl4lms/algorithms/nlpo/policies.py, maskable_*_lm_actor_critic_policy args)
# -> the field names the `nlpo` workload's config is expected to have (docs/fidelity.md)
NLPO_FIELDS = {"top_mask": "top_mask", "target_update_iterations": "target_update_iterations",
               "mask_type": "mask_type", "min_tokens_to_keep": "min_tokens_to_keep"}

POLICIES = {"ppo": {"causal_lm_actor_critic_policy": True, "seq2seq_lm_actor_critic_policy": False},
            "nlpo": {"maskable_causal_lm_actor_critic_policy": True, "maskable_seq2seq_lm_actor_critic_policy": False}}

PPO_SAMPLES_PER_INPUT = 4
ALL_TRAIN_INPUTS = 10_000_000  # SFT: above any GRUE split size, so every train input is used
PLACEHOLDER_MODELS = {"_", "", None}  # "REPLACE WITH SUPERVISED FINETUNED MODEL"

# Fields that steer only the original's logging, evaluation suite, checkpoint housekeeping or
# device placement: dropped, each with the reason the note gives.
DROPPED = {
    "tokenizer.padding_side": "rlgrad pads each model kind itself (padding does not change outputs)",
    "tokenizer.pad_token_as_eos_token": "rlgrad uses EOS as the pad token when a tokenizer has none, as this does",
    "alg.args.verbose": "console logging",
    "alg.training_args.save_total_limit": "checkpoint housekeeping (Ray keeps the checkpoints)",
    "alg.policy.args.apply_model_parallel": "device placement (rlgrad: scaling.*)",
    "env.args.context_start_token": "the T5 decoder start token (0), which rlgrad takes from the model config",
    "env.args.terminate_on_eos": "rlgrad completions end at EOS",
    "evaluation.eval_batch_size": "generate() batching only (ExtractConfig.batch_size)",
    "train_evaluation.eval_batch_size": "the original's evaluation suite",
    "train_evaluation.metrics": "the original's evaluation suite (rlgrad evaluates with the stage's reward)",
    "train_evaluation.generation_kwargs": "the original's evaluation decoding (rlgrad's SFT evaluates greedily)",
    "alg.generation_kwargs.post_processing_fn": "null: no post-processing",
    "alg.policy.args.generation_kwargs.post_processing_fn": "null: no post-processing",
}


class Rl4lmsImportError(ValueError):
    """An RL4LMs config that rlgrad cannot express; the message names the field."""


def import_rl4lms_file(path: str, sft_config_path: str | None = None) -> dict:
    return import_rl4lms_file_with_notes(path, sft_config_path)[0]


def import_rl4lms_file_with_notes(path: str, sft_config_path: str | None = None) -> tuple[dict, list[Note]]:
    """(spec, notes) of one original YAML file. A *_on_supervised config's SFT stage comes
    from `sft_config_path`, else from the sibling <model>_supervised.yml."""
    config = _read(path)
    placeholder = (config.get("alg") or {}).get("policy", {}).get("args", {}).get("model_name") in PLACEHOLDER_MODELS \
        if isinstance((config.get("alg") or {}).get("policy"), dict) else False
    sft_config = None
    if placeholder:
        sft_config_path = sft_config_path or _sibling_supervised(path)
        if sft_config_path is None or not os.path.exists(sft_config_path):
            raise Rl4lmsImportError(
                f"alg.policy.args.model_name='_' is a placeholder for a supervised checkpoint: put the task's "
                f"*_supervised.yml next to {os.path.basename(path)} (as in rl4lms_scripts/training/<task>/) or "
                f"pass --sft-config; rlgrad then runs that SFT first and this stage `from_stage: sft`")
        sft_config = _read(sft_config_path)
    return rl4lms_to_spec_with_notes(config, source=path, sft_config=sft_config)


def rl4lms_to_spec(config: dict, sweep_name: str | None = None, source: str = "<config>",
                   sft_config: dict | None = None) -> dict:
    spec, _ = rl4lms_to_spec_with_notes(config, source, sweep_name, sft_config)
    return spec


def rl4lms_to_spec_with_notes(config: dict, source: str = "<config>", sweep_name: str | None = None,
                              sft_config: dict | None = None) -> tuple[dict, list[Note]]:
    """A sweep spec (plain dict) equivalent to one RL4LMs config, and the notes of
    every value translated or dropped."""
    reader = _Reader(config, "")
    task = _task(reader)
    alg_id = reader.take("alg.id")
    stages: list[dict] = []
    if reader.has("evaluation.num_samples_per_input") and alg_id is None:
        kind, stage_config = "extract", _extract_config(reader, task)
        stages.append({"name": "extract", "workload": "extract", "config": stage_config})
    elif alg_id == "supervised":
        kind = "supervised"
        reader.stage = "sft"
        stages.append({"name": "sft", "workload": "sft", "config": _sft_config(reader, task)})
    elif alg_id in ("ppo", "nlpo"):
        kind = alg_id
        reader.stage = alg_id
        stage_config, placeholder = _ppo_config(reader, task, alg_id)
        stage = {"name": alg_id, "workload": alg_id, "config": stage_config}
        if placeholder:
            if sft_config is None:
                raise Rl4lmsImportError(
                    "alg.policy.args.model_name='_' is a placeholder for a supervised checkpoint: give the task's "
                    "supervised config (import the file next to its *_supervised.yml, or --sft-config)")
            sft_reader = _Reader(sft_config, "sft")
            sft_task = _task(sft_reader)
            if sft_reader.take("alg.id") != "supervised" or sft_task != task:
                raise Rl4lmsImportError(f"the supervised config for {task!r} must have alg.id 'supervised' and a "
                                        f"{task!r} datapool")
            stages.append({"name": "sft", "workload": "sft", "config": _sft_config(sft_reader, task)})
            sft_reader.check_all_used()
            reader.notes.extend(sft_reader.notes)
            stage = {"name": alg_id, "workload": alg_id, "from_stage": "sft", "config": stage_config}
            reader.notes.append(Note("alg.policy.args.model_name", "_", alg_id, "from_stage",
                                     "the supervised checkpoint: this stage starts from the sft stage's model"))
            kind += "_on_supervised"
        stages.append(stage)
    else:
        raise Rl4lmsImportError(f"alg.id={alg_id!r} is not supported: rlgrad imports sample extraction "
                                "(evaluation.num_samples_per_input), 'supervised', 'ppo' and 'nlpo' configs")
    reader.check_all_used()
    name = sweep_name or f"rl4lms_{task}_{kind}"
    return {"sweep": name, "description": provenance(source), "stages": stages}, reader.notes


# ---------------------------------------------------------------- per config kind

def _extract_config(reader: "_Reader", task: str) -> dict:
    reader.stage = "extract"
    causal = _is_causal(reader)
    model = reader.take("alg.model_name")
    _same_model(reader, model)
    values: dict[str, Any] = {"model": model, "task": task,
                              "num_samples_per_input": reader.take("evaluation.num_samples_per_input")}
    if reader.has("datapool.num_train_samples"):
        values["num_inputs"] = reader.take("datapool.num_train_samples")
    if reader.has("datapool.train_samples_rnd_seed"):
        # rl4lms_extract_samples_from_model_runner: np.random.RandomState(seed).permutation -- choose_inputs
        values["seed"] = reader.take("datapool.train_samples_rnd_seed")
    values["generation"] = _generation(reader, "alg.generation_kwargs", causal, "generation")
    values["generation"]["max_prompt_length"] = reader.take("tokenizer.max_length")
    _truncation_side(reader, "tokenizer.truncation_side", task, "extract",
                     "rlgrad: tasks.truncation_side(task, 'task', ..., 'extract') (sampling.prompts_of passing it "
                     "to encode_prompts is pending, docs/fidelity.md)")
    metrics = reader.take("evaluation.metrics") or []
    if len(metrics) != 1:
        raise Rl4lmsImportError(f"evaluation.metrics: rlgrad scores samples with one reward, got "
                                f"{[m.get('id') for m in metrics]}")
    values.update(_reward(reader, metrics[0], "evaluation.metrics[0]"))
    return values


def _sft_config(reader: "_Reader", task: str) -> dict:
    causal = _is_causal(reader)
    model = reader.take("alg.model_name")
    _same_model(reader, model)
    values: dict[str, Any] = {"model": model, "task": task, "num_train_inputs": ALL_TRAIN_INPUTS}
    for theirs, ours in SFT_TRAINING_ARGS.items():
        if reader.has(f"alg.training_args.{theirs}"):
            values[ours] = reader.take(f"alg.training_args.{theirs}")
    if values.get("lr_scheduler", "constant") not in SFT_SCHEDULERS:
        raise Rl4lmsImportError(f"alg.training_args.lr_scheduler_type={values['lr_scheduler']!r} is not "
                                f"supported; supported: {list(SFT_SCHEDULERS)}")
    if "lr_scheduler" not in values:  # the HF Trainer's default
        values["lr_scheduler"] = "linear"
        reader.notes.append(Note("alg.training_args.lr_scheduler_type", None, reader.stage, "lr_scheduler",
                                 "absent: the HF Trainer's default 'linear'"))
    _subsample(reader, values)
    generation = reader.take("alg.generation_kwargs")
    if generation is not None:
        reader.notes.append(Note("alg.generation_kwargs", generation, reader.stage, None,
                                 "the original's decoding for its train-split evaluation suite"))
    values["max_prompt_length"] = reader.take("tokenizer.max_length")
    side = _truncation_side(reader, "tokenizer.truncation_side", task, "sft", None)
    if side is not None:
        values["truncation_side"] = side
    reader.notes.append(Note("alg.model_type", "causal" if causal else "seq2seq", reader.stage, None,
                             "rlgrad reads the model kind from the checkpoint's config"))
    return values


def _ppo_config(reader: "_Reader", task: str, alg_id: str) -> tuple[dict, bool]:
    policy = reader.take("alg.policy.id")
    if policy not in POLICIES[alg_id]:
        raise Rl4lmsImportError(f"alg.policy.id={policy!r} is not supported for alg.id {alg_id!r}; "
                                f"supported: {sorted(POLICIES[alg_id])}")
    causal = POLICIES[alg_id][policy]
    model = reader.take("alg.policy.args.model_name")
    placeholder = model in PLACEHOLDER_MODELS
    values: dict[str, Any] = {"task": task}
    if placeholder:  # from_stage fills `model` in; the checkpoint carries its tokenizer
        tokenizer = reader.take("tokenizer.model_name")
        if tokenizer is not None:
            reader.notes.append(Note("tokenizer.model_name", tokenizer, reader.stage, None,
                                     "the supervised checkpoint carries its own tokenizer"))
    else:
        values["model"] = model
        _same_model(reader, model)
    for theirs, ours in PPO_ARGS.items():
        if reader.has(f"alg.args.{theirs}"):
            values[ours] = reader.take(f"alg.args.{theirs}")
    if reader.take("alg.args.enforce_token_entropy_reg_estimate", False):
        raise Rl4lmsImportError("alg.args.enforce_token_entropy_reg_estimate=True is not supported")
    reader.take("alg.args.enforce_token_entropy_reg_estimate")
    if reader.take("alg.args.target_kl") is not None:
        raise Rl4lmsImportError("alg.args.target_kl (PPO early stopping) is not supported; "
                                "kl_div.target_kl (the adaptive KL penalty) is")
    values["kl_coef"] = reader.take("alg.kl_div.coeff")
    if reader.has("alg.kl_div.target_kl"):
        values["target_kl"] = reader.take("alg.kl_div.target_kl")
    values.update(_reward(reader, {"id": reader.take("reward_fn.id"), "args": reader.take("reward_fn.args")},
                          "reward_fn"))

    generation = _generation(reader, "alg.policy.args.generation_kwargs", causal, "generation")
    episode_length = reader.take("env.args.max_episode_length")
    if "max_new_tokens" not in generation:
        generation["max_new_tokens"] = episode_length
        reader.notes.append(Note("env.args.max_episode_length", episode_length, reader.stage,
                                 "generation.max_new_tokens", "no generation_kwargs.max_new_tokens: the episode "
                                 "length bounds the completion"))
    if episode_length is not None and generation["max_new_tokens"] > episode_length:
        raise Rl4lmsImportError(f"alg.policy.args.generation_kwargs.max_new_tokens={generation['max_new_tokens']} "
                                f"exceeds env.args.max_episode_length={episode_length}")
    env_prompt_length = reader.take("env.args.max_prompt_length")
    tokenizer_length = reader.take("tokenizer.max_length")
    generation["max_prompt_length"] = env_prompt_length if env_prompt_length is not None else tokenizer_length
    if env_prompt_length is not None and tokenizer_length != env_prompt_length:
        reader.notes.append(Note("tokenizer.max_length", tokenizer_length, reader.stage, None,
                                 "the environment's max_prompt_length cuts rollout prompts"))
    # env.py sets tokenizer.truncation_side = "left"; the environment cuts with env.args.prompt_truncation_side
    tokenizer_side = reader.take("tokenizer.truncation_side")
    if tokenizer_side is not None:
        reader.notes.append(Note("tokenizer.truncation_side", tokenizer_side, reader.stage, None,
                                 "env.py overrides it; env.args.prompt_truncation_side cuts rollout prompts"))
    if not reader.has("env.args.prompt_truncation_side"):
        _check_side(task, "ppo", "left", "env.args.prompt_truncation_side (absent: env.py's default 'left')")
    else:
        _truncation_side(reader, "env.args.prompt_truncation_side", task, "ppo",
                         "rlgrad: tasks.truncation_side(task, 'task', ..., 'ppo') (sampling.prompts_of passing it "
                         "to encode_prompts is pending, docs/fidelity.md)")
    policy_side = reader.take("alg.policy.args.prompt_truncation_side")
    if policy_side is not None:
        _check_side(task, "ppo", policy_side, "alg.policy.args.prompt_truncation_side")
        reader.notes.append(Note("alg.policy.args.prompt_truncation_side", policy_side, reader.stage, None,
                                 "the same side as the environment's (checked)"))
    values["generation"] = generation

    # the rollout buffer: n_steps x n_envs token transitions, filled by batches of n_envs prompts
    # (alg_wrappers.py); rlgrad draws K completions per prompt where RL4LMs draws one
    n_envs = reader.take("env.n_envs", 1)
    values["rollout_tokens"] = reader.take("alg.args.n_steps", 128) * n_envs
    values["num_samples_per_input"] = PPO_SAMPLES_PER_INPUT
    values["inputs_per_rollout"] = n_envs
    reader.notes.append(Note("env.n_envs", n_envs, reader.stage, "num_samples_per_input",
                             f"RL4LMs draws one completion per prompt; rlgrad {PPO_SAMPLES_PER_INPUT} (each prompt's "
                             f"reward std observed), {n_envs} prompts per batch (inputs_per_rollout)"))
    if reader.has("train_evaluation.n_iters"):
        values["num_rollouts"] = reader.take("train_evaluation.n_iters")
    if reader.has("train_evaluation.eval_every"):
        values["eval_every_rollouts"] = reader.take("train_evaluation.eval_every")
    if reader.has("train_evaluation.save_every"):
        values["checkpoint_every_rollouts"] = reader.take("train_evaluation.save_every")
    values["num_train_inputs"] = ALL_TRAIN_INPUTS  # every train input, as the reference's datapool (PPO caps it)
    _subsample(reader, values, allow_fraction=False)
    if alg_id == "nlpo":
        for theirs, ours in NLPO_FIELDS.items():
            if reader.has(f"alg.policy.args.{theirs}"):
                values[ours] = reader.take(f"alg.policy.args.{theirs}")
        if values.get("mask_type", "learned_top_p") != "learned_top_p":
            raise Rl4lmsImportError(f"alg.policy.args.mask_type={values['mask_type']!r} is not supported; "
                                    "supported: 'learned_top_p'")
    return values, placeholder


# ---------------------------------------------------------------- shared sections

def _task(reader: "_Reader") -> str:
    pool = reader.take("datapool.id")
    if pool not in DATAPOOLS:
        raise Rl4lmsImportError(f"datapool.id={pool!r} is not supported; supported: {sorted(DATAPOOLS)}")
    task, implemented = DATAPOOLS[pool]
    for argument, value in (reader.take("datapool.args") or {}).items():
        if argument not in implemented:
            raise Rl4lmsImportError(f"datapool.args.{argument} is not supported for datapool {pool!r} "
                                    f"(rlgrad's {task!r} implements {implemented or 'no arguments'})")
        if value != implemented[argument]:
            raise Rl4lmsImportError(f"datapool.args.{argument}={value!r} is not supported: rlgrad's {task!r} "
                                    f"uses {implemented[argument]!r}")
    return task


def _subsample(reader: "_Reader", values: dict, allow_fraction: bool = True) -> None:
    fraction = reader.take("datapool.frac_train_samples", -1)
    if 0 < fraction <= 1:  # RL4LMs: -1 (or anything outside (0, 1]) = all train inputs
        if not allow_fraction:
            raise Rl4lmsImportError("datapool.frac_train_samples is not supported for ppo configs")
        values["frac_train_samples"] = fraction
    elif reader.has("datapool.frac_train_samples"):
        reader.notes.append(Note("datapool.frac_train_samples", fraction, reader.stage, None,
                                 "outside (0, 1]: every train input, rlgrad's default"))
    seed = reader.take("datapool.train_samples_rnd_seed", -1)
    if seed >= 0:
        values["seed"] = seed
    elif reader.has("datapool.train_samples_rnd_seed"):
        reader.notes.append(Note("datapool.train_samples_rnd_seed", seed, reader.stage, None,
                                 "-1 draws a random seed there; rlgrad's runs are seeded (config `seed`)"))


def _generation(reader: "_Reader", section: str, causal: bool, ours: str) -> dict:
    kwargs = dict(reader.take(section) or {})
    if not kwargs.pop("do_sample", True):
        raise Rl4lmsImportError(f"{section}.do_sample=False is not supported: rlgrad samples")
    kwargs.pop("post_processing_fn", None)
    generation = {}
    for argument, value in kwargs.items():
        if argument not in GENERATION_KWARGS:
            raise Rl4lmsImportError(f"{section}.{argument} is not supported; supported: "
                                    f"{sorted(GENERATION_KWARGS)} (and do_sample: true)")
        if argument == "min_length":
            # utils_supervised.generate / the policies: a causal model's min_length is raised by the
            # prompt length (so it counts new tokens); a seq2seq decoder's counts its start token too
            generation["min_new_tokens"] = value if causal else max(value - 1, 0)
            reader.notes.append(Note(f"{section}.min_length", value, reader.stage, f"{ours}.min_new_tokens",
                                     "HF min_length counts the prompt (causal, added by the reference) or the "
                                     "decoder start token (seq2seq): "
                                     + ("= new tokens" if causal else "new tokens = min_length - 1")))
        else:
            generation[GENERATION_KWARGS[argument]] = float(value) if argument == "temperature" else value
    return generation


def _check_side(task: str, stage: str, side: str, field: str) -> None:
    from workloads.text import grue

    table = grue.PPO_PROMPT_TRUNCATION_SIDE if stage == "ppo" else grue.REFERENCE_TRUNCATION_SIDE
    if side != table[task]:
        raise Rl4lmsImportError(f"{field}={side!r} is not supported for {task!r}: rlgrad's {stage} cuts its "
                                f"prompts on the {table[task]!r} (the reference configs' side)")


def _truncation_side(reader: "_Reader", field: str, task: str, stage: str, why: str | None) -> str | None:
    """Check the original's side against the reference side rlgrad implements for the task
    and stage; note it when rlgrad does not yet apply it itself."""
    side = reader.take(field)
    if side is None:
        return None
    if side not in ("left", "right"):
        raise Rl4lmsImportError(f"{field}={side!r}; allowed: 'left', 'right'")
    _check_side(task, stage, side, field)
    if why is not None:
        reader.notes.append(Note(field, side, reader.stage, None, why))
    return side


def _is_causal(reader: "_Reader") -> bool:
    model_type = reader.take("alg.model_type")
    if model_type not in ("causal", "seq2seq"):
        raise Rl4lmsImportError(f"alg.model_type={model_type!r} is not supported (causal or seq2seq)")
    return model_type == "causal"


def _same_model(reader: "_Reader", model: str) -> None:
    tokenizer = reader.take("tokenizer.model_name")
    if tokenizer is not None and tokenizer != model:
        raise Rl4lmsImportError(f"tokenizer.model_name={tokenizer!r} differs from the model {model!r}: rlgrad "
                                "loads the model's own tokenizer")


def _reward(reader: "_Reader", entry: dict, where: str) -> dict:
    reward_id, arguments = entry.get("id"), dict(entry.get("args") or {})
    if reward_id not in REWARD_IDS:
        raise Rl4lmsImportError(f"{where}.id={reward_id!r} is not supported; supported: {sorted(REWARD_IDS)}")
    name, argument_map = REWARD_IDS[reward_id]
    reward_args = {}
    for argument, value in arguments.items():
        if argument not in argument_map:
            raise Rl4lmsImportError(f"{where}.args.{argument} is not supported for {reward_id!r}; "
                                    f"supported: {sorted(argument_map)}")
        if argument_map[argument] is not None:
            reward_args[argument_map[argument]] = value
        elif argument not in ("limit_length", "length_limit_type"):
            reader.notes.append(Note(f"{where}.args.{argument}", value, reader.stage, None, ROUGE_DROPPED_WHY))
    if name == "rouge_l_max":
        if arguments.get("length_limit_type", "words") != "words":
            raise Rl4lmsImportError(f"{where}.args.length_limit_type={arguments['length_limit_type']!r} is not "
                                    "supported (words)")
        if not arguments.get("limit_length", True):
            reward_args["length_limit"] = None
        if "limit_length" in arguments or "length_limit_type" in arguments:
            reader.notes.append(Note(f"{where}.args.limit_length/length_limit_type",
                                     [arguments.get("limit_length"), arguments.get("length_limit_type")],
                                     reader.stage, "reward_args.length_limit",
                                     "a word limit: length_limit (null = none)"))
        if "alpha" in reward_args:
            reward_args["alpha"] = float(reward_args["alpha"])
    return {"reward": name, "reward_args": reward_args}


class _Reader:
    """Reads dotted fields of a nested config and remembers which it read, so that
    every field left over (neither read nor DROPPED) is reported; collects notes."""

    def __init__(self, config: dict, stage: str):
        self.config = config
        self.stage = stage
        self.used: set[str] = set()
        self.notes: list[Note] = []

    def _lookup(self, dotted: str):
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def has(self, dotted: str) -> bool:
        return self._lookup(dotted)[0]

    def take(self, dotted: str, default=None):
        self.used.add(dotted)
        found, value = self._lookup(dotted)
        return value if found else default

    def check_all_used(self) -> None:
        dropped_noted = set()
        for field in sorted(_leaves(self.config)):
            if any(field == u or field.startswith(u + ".") for u in self.used):
                continue
            reason = next((why for f, why in DROPPED.items() if field == f or field.startswith(f + ".")), None)
            if reason is None:
                raise Rl4lmsImportError(f"field {field!r} is not supported by the rlgrad importer")
            top = next(f for f in DROPPED if field == f or field.startswith(f + "."))
            if top not in dropped_noted:
                dropped_noted.add(top)
                self.notes.append(Note(top, self._lookup(top)[1], self.stage, None, reason))


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict) or not node:
        return [prefix] if prefix else []
    return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}" if prefix else key)]


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        config = yaml.load(f, Loader=YamlLoader)  # YAML 1.2 numbers: 1e-5 is a float
    if not isinstance(config, dict):
        raise Rl4lmsImportError(f"{path}: expected a mapping of RL4LMs config sections")
    return config


def _sibling_supervised(path: str) -> str | None:
    """rl4lms_scripts/training/<task>/<model>_ppo_on_supervised.yml -> <model>_supervised.yml beside it."""
    directory, name = os.path.split(path)
    model_prefix = name.split("_", 1)[0]
    candidate = os.path.join(directory, f"{model_prefix}_supervised.yml")
    return candidate if os.path.exists(candidate) else None
