"""Import the original project's experiment plans (apple/ml-rlgrad
sft_vs_rft/experiment_plans/*.json) as rlgrad sweep specs.

A plan is {"name", "description", ..., "configurations": [{"base_config": {...},
"options": {field: [values, ...]}}]}: every configuration is the cartesian
product of its options applied over its base config. Here each configuration
becomes one stage of workload `controlled`:

  * options with one value are folded into the stage's config,
    options with several values become `search.grid`;
  * the original's field names are mapped onto ControlledConfig's
    (FIELD_MAP); fields that only steered the original trainer's logging,
    plotting, W&B or GPU placement are dropped (IGNORED_FIELDS); anything else
    is an error naming the field;
  * `load_model_from_checkpoint` (the original's "ADD PATH TO CHECKPOINT" step)
    becomes `from_stage: pretrain`: the pretrain plan's stage if one is given,
    otherwise a pretrain stage built from the finetune config with the
    reference pretrain plans' settings (1,000 epochs of label-set CE, Adam 1e-4).

The result is a plain dict in the sweep-file format (see search_spaces/);
`yaml.safe_dump` it to get a runnable file.
"""

from __future__ import annotations

import copy
import json

from .import_notes import Note, provenance

# original field -> ControlledConfig field (dotted for nested ones)
FIELD_MAP = {
    "dataset": "dataset",
    "num_train_samples": "num_train_samples",
    "num_test_samples": "num_test_samples",
    "samples_rnd_seed": "samples_rnd_seed",
    "num_labels_per_sample": "num_labels_per_sample",
    "use_multiple_labels_per_sample": "use_label_sets",
    "frac_samples_to_modify_labels": "frac_samples_to_modify_labels",
    "model_type": "model.type",
    "mlp_hidden_layer_sizes": "model.hidden_sizes",
    "init_rnd_seed": "init_rnd_seed",
    "opt_method": "opt_method",
    "reward_type": "reward_type",
    "min_reward": "min_reward",
    "optimizer": "optimizer",
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "kl_regularization_coeff": "kl_regularization_coeff",
    "kl_reg_ref_unif": "kl_reference",  # true -> "uniform", false -> "initial"
    "logits_temperature": "temperature",
    "batch_size": "batch_size",
    "epochs": "num_epochs",
    "validate_every": "log_every_epochs",
}

# Fields of the original trainer's bookkeeping with no rlgrad counterpart:
# rlgrad always logs metrics to Parquet, checkpoints through Ray and places
# work on GPUs through `scaling`.
IGNORED_FIELDS = {
    "experiment_name", "random_seed", "gpu_ids", "trainer_checkpoint", "outputs_dir", "disable_console_log",
    "save_logs", "train_batch_log_interval", "epoch_log_interval", "save_metric_plots", "use_tensorboard",
    "use_wandb", "wandb_project_name", "wandb_entity_name", "wandb_resume_id", "wandb_track_model",
    "wandb_exclude_files", "score_metric_name", "is_train_metric", "score_largest", "return_best_score",
    "save_checkpoints", "num_checkpoints", "save_checkpoints_by_score", "early_stop", "early_stop_min_delta",
    "early_stop_patience", "early_stop_cooldown", "early_stop_restore_best_weights",
}
# Handled specially below.
SPECIAL_FIELDS = {"load_model_from_checkpoint", "save_every_num_val", "change_label_per_class"}
IGNORED_PLAN_KEYS = {"name", "description", "skip", "largest", "multiprocess", "num_parallel", "gpu_ids_pool"}

MODEL_TYPES = {"mlp": "mlp", "resnet18": "resnet18", "bert-mini": "bert-mini"}
PLACEHOLDER_CHECKPOINT = "ADD PATH TO CHECKPOINT"


class PlanImportError(ValueError):
    """A plan that cannot be expressed as a controlled sweep; the message names the field."""


def _merge(config: dict, options: dict) -> tuple[dict, dict]:
    """(base config with single-valued options applied, {field: values} of the multi-valued ones)."""
    merged, grid = dict(config), {}
    for field, values in options.items():
        if not isinstance(values, list) or not values:
            raise PlanImportError(f"options.{field}: expected a non-empty list of values, got {values!r}")
        if len(values) == 1:
            merged[field] = values[0]
        else:
            grid[field] = list(values)
    return merged, grid


def _map_value(field: str, value, where: str):
    if field == "kl_reg_ref_unif":
        return "uniform" if value else "initial"
    if field == "model_type":
        if value not in MODEL_TYPES:
            raise PlanImportError(f"{where}.model_type = {value!r}: rlgrad builds {sorted(MODEL_TYPES)}")
        return MODEL_TYPES[value]
    if field in ("init_rnd_seed", "samples_rnd_seed") and value < 0:
        raise PlanImportError(f"{where}.{field} = {value}: a random (-1) seed is not supported; give a seed >= 0")
    return value


def _set_dotted(config: dict, dotted: str, value) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


IGNORED_WHY = "the original trainer's bookkeeping (logging, plots, W&B, checkpoints, early stopping, GPU ids)"


def _configuration_to_stage(configuration: dict, name: str, where: str,
                            notes: list | None = None) -> tuple[dict, str | None]:
    """A stage dict and the checkpoint path it loads ('' / None: none, placeholder: from a pretrain stage)."""
    unknown_keys = set(configuration) - {"base_config", "options"}
    if unknown_keys:
        raise PlanImportError(f"{where}: unknown key(s) {sorted(unknown_keys)}; a configuration has base_config and options")
    merged, grid = _merge(configuration.get("base_config", {}), configuration.get("options", {}))
    for field in list(merged) + list(grid):
        if field not in FIELD_MAP and field not in IGNORED_FIELDS and field not in SPECIAL_FIELDS:
            raise PlanImportError(f"{where}: unknown field {field!r}; it has no counterpart in ControlledConfig "
                                  f"(known: {', '.join(sorted(FIELD_MAP))})")
    for field in SPECIAL_FIELDS | {"model_type"}:
        if field in grid:
            raise PlanImportError(f"{where}.options.{field}: several values cannot be searched; split the plan")

    if merged.get("change_label_per_class"):
        raise PlanImportError(f"{where}.change_label_per_class = true: not supported (the original experiment ignores it too)")
    model_type = _map_value("model_type", merged.get("model_type", "mlp"), where)

    notes = notes if notes is not None else []
    config: dict = {}
    for field, value in merged.items():
        if field in IGNORED_FIELDS:
            notes.append(Note(f"{where}.{field}", value, name, None, IGNORED_WHY))
        if field not in FIELD_MAP:
            continue
        if field == "mlp_hidden_layer_sizes" and model_type != "mlp":
            # the original carries MLP sizes in every plan; only the MLP uses them
            notes.append(Note(f"{where}.{field}", value, name, None, f"used only by the MLP; model is {model_type}"))
            continue
        mapped = _map_value(field, value, where)
        _set_dotted(config, FIELD_MAP[field], mapped)
        if mapped != value or field == "kl_reg_ref_unif":
            notes.append(Note(f"{where}.{field}", value, name, FIELD_MAP[field], f"= {mapped!r}"))
    # the original saves a checkpoint every `save_every_num_val` validations
    if "save_every_num_val" in merged:
        config["checkpoint_every_epochs"] = int(merged["save_every_num_val"]) * int(merged.get("validate_every", 1))
        notes.append(Note(f"{where}.save_every_num_val", merged["save_every_num_val"], name, "checkpoint_every_epochs",
                          f"a checkpoint every save_every_num_val x validate_every = {config['checkpoint_every_epochs']} "
                          "epochs"))

    search_grid = {}
    for field, values in grid.items():
        if field in IGNORED_FIELDS:
            continue
        search_grid[FIELD_MAP[field]] = [_map_value(field, v, where) for v in values]
        config.pop(FIELD_MAP[field], None)  # the base value is overridden by every grid point

    stage = {"name": name, "workload": "controlled", "config": config}
    if search_grid:
        stage["search"] = {"grid": search_grid}
    # the MLP runs on CPU; ResNet18 and BERT-mini ran on a GPU in the reference plans
    stage["scaling"] = ({"num_workers": 1, "use_gpu": False} if model_type == "mlp"
                        else {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1})
    if merged.get("load_model_from_checkpoint") == PLACEHOLDER_CHECKPOINT:
        notes.append(Note(f"{where}.load_model_from_checkpoint", PLACEHOLDER_CHECKPOINT, name, "from_stage",
                          "the pretrain stage's checkpoint"))
    return stage, merged.get("load_model_from_checkpoint") or None


def _pretrain_stage_for(finetune: dict) -> dict:
    """The reference pretrain plans' stage for a finetune stage: same data, model and seeds."""
    keep = ("dataset", "num_train_samples", "num_test_samples", "samples_rnd_seed", "num_labels_per_sample",
            "model", "init_rnd_seed", "batch_size", "temperature")
    config = {k: copy.deepcopy(v) for k, v in finetune["config"].items() if k in keep}
    config.update(use_label_sets=True, frac_samples_to_modify_labels=0.0, opt_method="supervised",
                  reward_type="labels", optimizer="adam", learning_rate=1e-4, weight_decay=0.0,
                  num_epochs=1000, log_every_epochs=10, checkpoint_every_epochs=100)
    return {"name": "pretrain", "workload": "controlled", "config": config, "scaling": copy.deepcopy(finetune["scaling"])}


def _plan_stages(plan: dict, default_name: str, notes: list | None = None) -> list[tuple[dict, str | None]]:
    unknown = set(plan) - IGNORED_PLAN_KEYS - {"configurations", "repetitions"}
    if unknown:
        raise PlanImportError(f"plan: unknown key(s) {sorted(unknown)}")
    if plan.get("repetitions", 1) != 1:
        raise PlanImportError(f"plan.repetitions = {plan['repetitions']}: repeat runs by searching over init_rnd_seed instead")
    configurations = plan.get("configurations") or []
    if not configurations:
        raise PlanImportError("plan.configurations: empty")
    stages = []
    for i, configuration in enumerate(configurations):
        name = default_name if len(configurations) == 1 else f"{default_name}_{i}"
        stages.append(_configuration_to_stage(configuration, name, f"configurations[{i}]", notes))
    return stages


def _is_pretrain(stage: dict) -> bool:
    return bool(stage["config"].get("use_label_sets"))


def plan_to_spec(plan: dict, sweep_name: str, pretrain_plan: dict | None = None) -> dict:
    return plan_to_spec_with_notes(plan, sweep_name, pretrain_plan)[0]


def plan_to_spec_with_notes(plan: dict, sweep_name: str, pretrain_plan: dict | None = None,
                            source: str | None = None) -> tuple[dict, list[Note]]:
    """The sweep spec (a dict in the YAML format) of an original experiment plan, and
    the notes of every value translated or dropped.

    A finetune plan whose configs load a checkpoint gets a pretrain stage in
    front -- `pretrain_plan`'s when given, otherwise one built with the
    reference pretrain settings -- and starts from it with `from_stage`."""
    notes: list[Note] = []
    stages: list[dict] = []
    if pretrain_plan is not None:
        pre = _plan_stages(pretrain_plan, "pretrain", notes)
        if len(pre) != 1 or not _is_pretrain(pre[0][0]):
            raise PlanImportError("pretrain_plan: expected one configuration with use_multiple_labels_per_sample true")
        stages.append(pre[0][0])

    probe = _plan_stages(plan, "stage")
    default_name = "pretrain" if all(_is_pretrain(s) for s, _ in probe) else "finetune"
    for stage, checkpoint in _plan_stages(plan, default_name, notes):
        if checkpoint and checkpoint != PLACEHOLDER_CHECKPOINT:
            stage["config"]["init_checkpoint"] = checkpoint  # a real path: keep it
        elif checkpoint:
            if not stages:
                stages.append(_pretrain_stage_for(stage))
                notes.append(Note("load_model_from_checkpoint", PLACEHOLDER_CHECKPOINT, "pretrain", "workload",
                                  "no pretrain plan given: a pretrain stage with the reference pretrain plans' "
                                  "settings (1,000 epochs of label-set CE, Adam 1e-4)"))
            stage["from_stage"] = stages[0]["name"]
            stage = {k: stage[k] for k in ("name", "workload", "from_stage", "config", "search", "scaling") if k in stage}
        stages.append(stage)
    for key in sorted(set(plan) & IGNORED_PLAN_KEYS):
        notes.append(Note(f"plan.{key}", plan[key], stages[-1]["name"], None, "the plan runner's bookkeeping"))

    description = " ".join(s for s in (plan.get("name", ""), plan.get("description", "")) if s).strip()
    if source is not None:
        description = f"{provenance(source)}: {description}" if description else provenance(source)
    return ({"sweep": sweep_name, "description": description or "imported from an ml-rlgrad plan", "stages": stages},
            notes)


def plan_sweep_name(path: str) -> str:
    """controlled_<model>_<dataset>_<variant> from sft_vs_rft_<model>_<dataset>_<variant>_experiments_plan.json."""
    import os

    base = os.path.basename(path)
    for suffix in (".json", "_experiments_plan"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    base = base[len("sft_vs_rft_"):] if base.startswith("sft_vs_rft_") else base
    return f"controlled_{base}"


def import_plan_file(path: str, sweep_name: str | None = None, pretrain_plan_path: str | None = None) -> dict:
    return import_plan_file_with_notes(path, sweep_name, pretrain_plan_path)[0]


def import_plan_file_with_notes(path: str, sweep_name: str | None = None,
                                pretrain_plan_path: str | None = None) -> tuple[dict, list[Note]]:
    """plan_to_spec of a plan JSON file; the sweep is named controlled_<model>_<dataset>_<variant>
    after the file unless given."""
    with open(path, encoding="utf-8") as f:
        plan = json.load(f)
    pretrain_plan = None
    if pretrain_plan_path is not None:
        with open(pretrain_plan_path, encoding="utf-8") as f:
            pretrain_plan = json.load(f)
    return plan_to_spec_with_notes(plan, sweep_name or plan_sweep_name(path), pretrain_plan, source=path)
