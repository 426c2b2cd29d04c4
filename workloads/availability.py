"""Can this model be loaded here? Answered at spec validation, torch-free, so a
sweep fails before any worker starts rather than minutes into a run."""

from __future__ import annotations

import contextlib
import os

_assume_hub_reachable = False


@contextlib.contextmanager
def hub_assumed_reachable():
    """Check everything but whether the hub can be reached (for files written
    here to run on a cluster that has the hub, e.g. `rlgrad import`)."""
    global _assume_hub_reachable
    previous, _assume_hub_reachable = _assume_hub_reachable, True
    try:
        yield
    finally:
        _assume_hub_reachable = previous


def hub_unavailable() -> bool:
    """True when nothing can be fetched from the Hugging Face hub here."""
    if _assume_hub_reachable:
        return False
    from .grue import hub_is_reachable, hub_offline_mode

    return hub_offline_mode() or not hub_is_reachable()


class ModelNotFoundError(ValueError):
    pass


def check_model_available(name: str) -> None:
    """Raise ModelNotFoundError (one sentence naming the model) unless `name` is a
    built-in model, a local checkpoint directory, a cached or reachable hub id,
    or a `@stage/trial` reference that the orchestrator fills in."""
    from .configs import BUILTIN_MODELS

    if name.startswith("@"):
        return
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ModelNotFoundError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
        return
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ModelNotFoundError(f"model directory {name!r} holds no config.json (save it with save_pretrained)")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path; hub ids are "org/name"
        raise ModelNotFoundError(f"model {name!r}: no such directory")
    from .grue import hub_endpoint, hub_offline_mode
    from .rewards import _in_hub_cache

    if hub_unavailable() and not _in_hub_cache(name):
        state = "switched off (HF_HUB_OFFLINE)" if hub_offline_mode() else "unreachable"
        raise ModelNotFoundError(
            f"model {name!r} is not available: not a local directory, not in the Hugging Face cache, and the hub "
            f"({hub_endpoint()}) is {state}; pass a local checkpoint directory or a built-in model "
            f"({', '.join(BUILTIN_MODELS)})"
        )


class DatasetNotFoundError(ValueError):
    pass


def _dataset_in_cache(hub_id: str) -> bool:
    """Whether `datasets` or the hub client cached this dataset on this machine."""
    home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    datasets_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(home, "datasets"))
    hub_cache = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    return (os.path.isdir(os.path.join(datasets_cache, hub_id.replace("/", "___")))
            or os.path.isdir(os.path.join(hub_cache, "datasets--" + hub_id.replace("/", "--"))))


def check_dataset_available(name: str, hub_id: str | None, dataset_path: str | None) -> None:
    """Raise DatasetNotFoundError (one sentence naming the dataset and the fix)
    unless the data can be read here: a local copy that exists, a built-in
    dataset (hub_id None), or a hub dataset that is cached or reachable."""
    if dataset_path is not None:
        if not os.path.exists(dataset_path):
            raise DatasetNotFoundError(f"dataset {name!r}: dataset_path {dataset_path!r} does not exist")
        return
    if hub_id is None:
        return
    from .grue import hub_endpoint, hub_offline_mode

    if hub_unavailable() and not _dataset_in_cache(hub_id):
        state = "switched off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)" if hub_offline_mode() else "unreachable"
        raise DatasetNotFoundError(
            f"dataset {name!r} ({hub_id}) is not available offline: not cached here and the hub ({hub_endpoint()}) "
            f"is {state}; set dataset_path to a local copy (a save_to_disk directory or <split>.parquet/.jsonl/.csv files)"
        )


def check_task_data(task: str, dataset_path: str | None) -> None:
    """The data of a text task can be read here (the built-in task always can)."""
    from .grue import GRUE_TASKS

    if task in GRUE_TASKS:
        check_dataset_available(task, GRUE_TASKS[task].hub_id, dataset_path)
