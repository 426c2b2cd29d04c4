"""Import the original project's RL4LMs-style GRUE configs (apple/ml-rlgrad
rl4lms_scripts/extract_samples/*.yml and rl4lms_scripts/training/**/*.yml)
as rlgrad sweep specs of one stage:

    config kind                                       stage workload
    `evaluation.num_samples_per_input` (extraction)   extract
    `alg.id: supervised`                              sft
    `alg.id: ppo`                                     ppo

Field names are mapped onto our configs' (the configs beside each workload, workloads/text/*_config.py): the datapool
id onto the task, reward_fn / metric ids and their arguments onto `reward` and
`reward_args`, HF generation kwargs onto `generation`, PPO's alg.kl_div onto
kl_coef / target_kl, and so on. A datapool argument must equal the prompt
format rlgrad's task implements (workloads/grue.py). Fields that only steer the
original's logging, checkpoint housekeeping or device placement are dropped
(IGNORED); any other field -- or a value rlgrad cannot honour, such as a cosine
learning-rate schedule or beam search -- is an error naming the field.

PPO's rollout keeps the reference's size and minibatching: `n_steps` x `n_envs`
token transitions per iteration become rollout_tokens, filled by batches of
`n_envs` prompts (inputs_per_rollout), and `batch_size` stays a count of token
transitions (minibatch_size). One deliberate difference: K = 4 completions per
prompt (RL4LMs draws one), so that each prompt's reward std is observed;
  * `train_evaluation.n_iters` (iterations of rollout + update) is num_rollouts.

The result is a plain dict in the sweep-file format; `yaml.safe_dump` it to get
a runnable file. `import_rl4lms_file(path)` reads one YAML file.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

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

# HF generate() kwargs -> GenerationConfig field
GENERATION_KWARGS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                     "min_length": "min_new_tokens", "max_new_tokens": "max_new_tokens"}

SFT_TRAINING_ARGS = {"per_device_train_batch_size": "batch_size", "num_train_epochs": "num_epochs",
                     "max_steps": "max_steps", "weight_decay": "weight_decay", "learning_rate": "learning_rate",
                     "logging_steps": "log_every_steps"}

PPO_ARGS = {"learning_rate": "learning_rate", "n_epochs": "ppo_epochs", "batch_size": "minibatch_size",
            "ent_coef": "ent_coef", "gamma": "gamma", "gae_lambda": "gae_lambda", "clip_range": "clip_range",
            "vf_coef": "vf_coef", "max_grad_norm": "max_grad_norm"}

PPO_SAMPLES_PER_INPUT = 4
ALL_TRAIN_INPUTS = 10_000_000  # SFT: above any GRUE split size, so every train input is used
PLACEHOLDER_MODELS = {"_", "", None}  # "REPLACE WITH SUPERVISED FINETUNED MODEL"

# Fields with no rlgrad counterpart: logging, checkpoint housekeeping, device placement,
# the original's own evaluation suites (rlgrad evaluates with the stage's reward).
IGNORED = {
    "tokenizer.padding_side", "tokenizer.pad_token_as_eos_token", "tokenizer.model_name",
    "alg.model_type", "alg.args.verbose", "alg.training_args.save_total_limit",
    "alg.policy.args.apply_model_parallel", "env.args.context_start_token",
    "evaluation.eval_batch_size", "train_evaluation.eval_batch_size", "train_evaluation.metrics",
    "train_evaluation.generation_kwargs", "generation_kwargs.post_processing_fn", "generation_kwargs.do_sample",
}


class Rl4lmsImportError(ValueError):
    """An RL4LMs config that rlgrad cannot express; the message names the field."""


def import_rl4lms_file(path: str) -> dict:
    with open(path) as f:
        config = yaml.load(f, Loader=YamlLoader)  # YAML 1.2 numbers: 1e-5 is a float
    sweep_name = os.path.splitext(os.path.basename(path))[0]
    return rl4lms_to_spec(config, sweep_name)


def rl4lms_to_spec(config: dict, sweep_name: str) -> dict:
    """A one-stage sweep spec (plain dict) equivalent to one RL4LMs config."""
    reader = _Reader(config)
    task = _task(reader)
    alg_id = reader.take("alg.id")
    if reader.has("evaluation.num_samples_per_input") and alg_id is None:
        name, workload, stage_config = "extract", "extract", _extract_config(reader, task)
    elif alg_id == "supervised":
        name, workload, stage_config = "sft", "sft", _sft_config(reader, task)
    elif alg_id == "ppo":
        name, workload, stage_config = "ppo", "ppo", _ppo_config(reader, task)
    else:
        raise Rl4lmsImportError(f"alg.id={alg_id!r} is not supported: rlgrad imports sample extraction "
                                "(evaluation.num_samples_per_input), 'supervised' and 'ppo' configs")
    reader.check_all_used()
    return {
        "sweep": sweep_name,
        "description": f"imported from an RL4LMs {workload} config ({task})",
        "stages": [{"name": name, "workload": workload, "config": stage_config}],
    }


# ---------------------------------------------------------------- per config kind

def _extract_config(reader: "_Reader", task: str) -> dict:
    model = reader.take("alg.model_name")
    values: dict[str, Any] = {"model": model, "task": task,
                              "num_samples_per_input": reader.take("evaluation.num_samples_per_input")}
    if reader.has("datapool.num_train_samples"):
        values["num_inputs"] = reader.take("datapool.num_train_samples")
    if reader.has("datapool.train_samples_rnd_seed"):
        values["seed"] = reader.take("datapool.train_samples_rnd_seed")
    values["generation"] = _generation(reader, "alg.generation_kwargs")
    _prompt_settings(reader, values["generation"], _is_causal(reader))
    metrics = reader.take("evaluation.metrics") or []
    if len(metrics) != 1:
        raise Rl4lmsImportError(f"evaluation.metrics: rlgrad scores samples with one reward, got "
                                f"{[m.get('id') for m in metrics]}")
    values.update(_reward(metrics[0], "evaluation.metrics[0]"))
    return values


def _sft_config(reader: "_Reader", task: str) -> dict:
    values: dict[str, Any] = {"model": reader.take("alg.model_name"), "task": task,
                              "num_train_inputs": ALL_TRAIN_INPUTS}
    for theirs, ours in SFT_TRAINING_ARGS.items():
        if reader.has(f"alg.training_args.{theirs}"):
            values[ours] = reader.take(f"alg.training_args.{theirs}")
    schedule = reader.take("alg.training_args.lr_scheduler_type", "constant")
    if schedule != "constant":
        raise Rl4lmsImportError(f"alg.training_args.lr_scheduler_type={schedule!r} is not supported: "
                                "rlgrad SFT keeps the learning rate constant")
    _subsample(reader, values)
    reader.take("alg.generation_kwargs")  # the original's sampling for its own evaluation suite
    generation: dict = {}
    _prompt_settings(reader, generation, _is_causal(reader))
    values["max_prompt_length"] = generation["max_prompt_length"]
    return values


def _ppo_config(reader: "_Reader", task: str) -> dict:
    model = reader.take("alg.policy.args.model_name")
    if model in PLACEHOLDER_MODELS:
        raise Rl4lmsImportError(
            "alg.policy.args.model_name is a placeholder for a supervised checkpoint: in rlgrad put this PPO "
            "stage after an sft stage with `from_stage: sft` (see search_spaces/grue_*.yaml, stage ppo_on_sft)")
    policy = reader.take("alg.policy.id")
    if policy not in ("causal_lm_actor_critic_policy", "seq2seq_lm_actor_critic_policy"):
        raise Rl4lmsImportError(f"alg.policy.id={policy!r} is not supported (rlgrad PPO is an actor-critic "
                                "policy over a causal or seq2seq LM)")
    values: dict[str, Any] = {"model": model, "task": task}
    for theirs, ours in PPO_ARGS.items():
        if reader.has(f"alg.args.{theirs}"):
            values[ours] = reader.take(f"alg.args.{theirs}")
    if reader.take("alg.args.enforce_token_entropy_reg_estimate", False):
        raise Rl4lmsImportError("alg.args.enforce_token_entropy_reg_estimate=True is not supported")
    if reader.take("alg.args.target_kl") is not None:
        raise Rl4lmsImportError("alg.args.target_kl (PPO early stopping) is not supported; "
                                "kl_div.target_kl (the adaptive KL penalty) is")
    values["kl_coef"] = reader.take("alg.kl_div.coeff")
    if reader.has("alg.kl_div.target_kl"):
        values["target_kl"] = reader.take("alg.kl_div.target_kl")
    values.update(_reward({"id": reader.take("reward_fn.id"), "args": reader.take("reward_fn.args")}, "reward_fn"))
    if not reader.take("env.args.terminate_on_eos", True):
        raise Rl4lmsImportError("env.args.terminate_on_eos=False is not supported: rlgrad completions end at EOS")

    generation = _generation(reader, "alg.policy.args.generation_kwargs")
    episode_length = reader.take("env.args.max_episode_length")
    generation.setdefault("max_new_tokens", episode_length)
    if episode_length is not None and generation["max_new_tokens"] > episode_length:
        raise Rl4lmsImportError(f"alg.policy.args.generation_kwargs.max_new_tokens={generation['max_new_tokens']} "
                                f"exceeds env.args.max_episode_length={episode_length}")
    _prompt_settings(reader, generation, policy == "causal_lm_actor_critic_policy")
    env_prompt_length = reader.take("env.args.max_prompt_length")
    if env_prompt_length is not None:
        generation["max_prompt_length"] = min(generation["max_prompt_length"], env_prompt_length)
    values["generation"] = generation

    # the rollout buffer: n_steps x n_envs token transitions, filled by batches of n_envs prompts
    # (alg_wrappers.py); rlgrad draws K completions per prompt where RL4LMs draws one
    n_envs = reader.take("env.n_envs", 1)
    values["rollout_tokens"] = reader.take("alg.args.n_steps", 128) * n_envs
    values["num_samples_per_input"] = PPO_SAMPLES_PER_INPUT
    values["inputs_per_rollout"] = n_envs
    if reader.has("train_evaluation.n_iters"):
        values["num_rollouts"] = reader.take("train_evaluation.n_iters")
    if reader.has("train_evaluation.eval_every"):
        values["eval_every_rollouts"] = reader.take("train_evaluation.eval_every")
    if reader.has("train_evaluation.save_every"):
        values["checkpoint_every_rollouts"] = reader.take("train_evaluation.save_every")
    _subsample(reader, values, allow_fraction=False)
    return values


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
    seed = reader.take("datapool.train_samples_rnd_seed", -1)
    if seed >= 0:
        values["seed"] = seed


def _generation(reader: "_Reader", section: str) -> dict:
    kwargs = dict(reader.take(section) or {})
    if not kwargs.pop("do_sample", True):
        raise Rl4lmsImportError(f"{section}.do_sample=False is not supported: rlgrad samples")
    kwargs.pop("post_processing_fn", None)
    generation = {}
    for argument, value in kwargs.items():
        if argument not in GENERATION_KWARGS:
            raise Rl4lmsImportError(f"{section}.{argument} is not supported; supported: "
                                    f"{sorted(GENERATION_KWARGS)} (and do_sample: true)")
        generation[GENERATION_KWARGS[argument]] = float(value) if argument == "temperature" else value
    return generation


def _prompt_settings(reader: "_Reader", generation: dict, causal: bool) -> None:
    """tokenizer.max_length is the prompt limit; the truncation side must be the one
    rlgrad uses: causal prompts keep their end (left), encoder prompts their start (right)."""
    generation["max_prompt_length"] = reader.take("tokenizer.max_length")
    expected = "left" if causal else "right"
    for field in ("tokenizer.truncation_side", "alg.policy.args.prompt_truncation_side",
                  "env.args.prompt_truncation_side"):
        side = reader.take(field)
        if side is not None and side != expected:
            raise Rl4lmsImportError(f"{field}={side!r} is not supported: rlgrad truncates "
                                    f"{'causal' if causal else 'encoder'} prompts on the {expected}")


def _is_causal(reader: "_Reader") -> bool:
    model_type = reader.take("alg.model_type")
    if model_type is not None and model_type not in ("causal", "seq2seq"):
        raise Rl4lmsImportError(f"alg.model_type={model_type!r} is not supported (causal or seq2seq)")
    return model_type == "causal"


def _reward(entry: dict, where: str) -> dict:
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
    if name == "rouge_l_max":
        if arguments.get("length_limit_type", "words") != "words":
            raise Rl4lmsImportError(f"{where}.args.length_limit_type={arguments['length_limit_type']!r} is not "
                                    "supported (words)")
        if not arguments.get("limit_length", True):
            reward_args["length_limit"] = None
        if "alpha" in reward_args:
            reward_args["alpha"] = float(reward_args["alpha"])
    return {"reward": name, "reward_args": reward_args}


class _Reader:
    """Reads dotted fields of a nested config and remembers which it read, so
    that every field left over (neither read nor IGNORED) is reported."""

    def __init__(self, config: dict):
        self.config = config
        self.used: set[str] = set()

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
        for field in sorted(_leaves(self.config)):
            covered = any(field == u or field.startswith(u + ".") for u in self.used)
            ignored = any(field == i or field.startswith(i + ".") or field.endswith("." + i) for i in IGNORED)
            if not (covered or ignored):
                raise Rl4lmsImportError(f"field {field!r} is not supported by the rlgrad importer")


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict) or not node:
        return [prefix] if prefix else []
    return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}" if prefix else key)]
