"""Can this model, dataset or reward run here? Answered torch-free, at spec
validation, so a sweep fails before any worker starts rather than minutes into
a run; and the same checks explain a failure when a worker finds the hub gone.

One family of errors: every "cannot be had here" is a `NotAvailableError`
(a ValueError, so pydantic reports it as a validation error of the field).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from urllib.parse import urlparse

HUB_PROBE_TIMEOUT_S = 3.0


class NotAvailableError(ValueError):
    """Something a config names cannot be had here; the message says what and how to fix it."""


class ModelNotAvailableError(NotAvailableError):
    pass


class DatasetNotAvailableError(NotAvailableError):
    pass


class RewardNotAvailableError(NotAvailableError):
    pass


# --------------------------------------------------------------------------
# the Hugging Face hub: reachable, switched off, or assumed reachable
# --------------------------------------------------------------------------

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


_assume_runtime_data = False


@contextlib.contextmanager
def runtime_data_assumed():
    """Check names, types and values but not what only the machine that runs the
    sweep must have: hub access and local data such as METEOR's WordNet
    (`rlgrad import` writes files that run elsewhere)."""
    global _assume_runtime_data
    previous, _assume_runtime_data = _assume_runtime_data, True
    try:
        with hub_assumed_reachable():
            yield
    finally:
        _assume_runtime_data = previous


def runtime_data_is_assumed() -> bool:
    return _assume_runtime_data


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline_mode() -> bool:
    """The user asked the Hugging Face libraries to use their cache only."""
    return any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
               for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@functools.lru_cache(maxsize=None)
def hub_is_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's host (once per process): without network
    this answers within `timeout`, where the libraries would retry for minutes."""
    url = urlparse(hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def hub_unavailable() -> bool:
    """True when nothing can be fetched from the Hugging Face hub here."""
    if _assume_hub_reachable:
        return False
    return hub_offline_mode() or not hub_is_reachable()


def hub_state() -> str:
    """Why the hub cannot be used, in words, for error messages."""
    return "switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if hub_offline_mode() else "unreachable"


def model_in_hub_cache(hub_id: str) -> bool:
    """Whether the hub client cached this model's config on this machine."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # a malformed id
        return False


def dataset_in_hub_cache(hub_id: str) -> bool:
    """Whether `datasets` or the hub client cached this dataset on this machine."""
    home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    datasets_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(home, "datasets"))
    hub_cache = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    return (os.path.isdir(os.path.join(datasets_cache, hub_id.replace("/", "___")))
            or os.path.isdir(os.path.join(hub_cache, "datasets--" + hub_id.replace("/", "--"))))


# --------------------------------------------------------------------------
# the checks the configs run
# --------------------------------------------------------------------------

def check_pretrained_available(name: str, what: str, fix: str, error=ModelNotAvailableError) -> None:
    """Raise `error` (one sentence naming `what` and `fix`) unless `name` is a
    local directory holding a save_pretrained checkpoint, or a hub id that is
    cached here or reachable."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise error(f"{what} directory {name!r} holds no config.json (save it with save_pretrained)")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path; hub ids are "org/name"
        raise error(f"{what} {name!r}: no such directory")
    if hub_unavailable() and not model_in_hub_cache(name):
        raise error(f"{what} {name!r} is not available -- not a local directory, not in the Hugging Face cache, "
                    f"and the hub ({hub_endpoint()}) is {hub_state()}; {fix}")


def check_dataset_available(name: str, hub_id: str | None, dataset_path: str | None) -> None:
    """Raise DatasetNotAvailableError (one sentence naming the dataset and the fix)
    unless the data can be read here: a local copy that exists, a built-in
    dataset (hub_id None), or a hub dataset that is cached or reachable."""
    if dataset_path is not None:
        if not os.path.exists(dataset_path):
            raise DatasetNotAvailableError(f"dataset {name!r}: dataset_path {dataset_path!r} does not exist")
        return
    if hub_id is None:
        return
    if hub_unavailable() and not dataset_in_hub_cache(hub_id):
        raise DatasetNotAvailableError(
            f"dataset {name!r} ({hub_id}) is not available offline: not cached here and the hub ({hub_endpoint()}) "
            f"is {hub_state()}; set dataset_path to a local copy (a save_to_disk directory or "
            f"<split>.parquet/.jsonl/.csv files)"
        )
