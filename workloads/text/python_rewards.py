"""Rewards as Python functions, with TRL's reward-function signature.

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

called with keyword arguments, one entry per completion (prompt-major, K per prompt), as
TRL's GRPOTrainer calls them (trl/trainer/grpo_trainer.py `_calculate_rewards`, TRL 1.16):
`prompts` the task's prompt text (untemplated), `completions` the decoded completions,
`completion_ids` their token ids, and every field of the input's row (a dataset task's
columns; a built-in task's `answer`) repeated per completion. Functions that do not use an
argument take **kwargs, as in TRL.

Several functions combine as TRL combines them: reward = sum_i w_i * r_i over the functions
that returned a number (`nansum`: None counts as missing, `reward_weights` default 1 each).
Each function's value is kept as a reward component named after the function. One deliberate
difference: a completion for which EVERY function returned None gets reward 0 here, while TRL
1.16 leaves it out of its group's baseline and gives it advantage 0 (docs/fidelity.md).

A function is named 'file.py:function' (a path; the orchestrator makes it absolute against the
sweep file's directory, and ships the file's directory to the cluster's workers as a Ray
runtime-env py_module) or 'module:function' (importable on every worker). A function that
raises, returns the wrong length, a non-number, NaN or an infinity fails the trial with one
line naming the function, the input and the problem.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
from typing import Callable

from .task_base import Reward



class RewardFunctionError(ValueError):
    """A user's reward function failed: one line naming the function, the input and the problem."""


def split_reference(reference: str) -> tuple[str, str]:
    """('file.py' or 'module', 'function') of 'file.py:function' / 'module:function'."""
    location, _, name = reference.rpartition(":")
    if not location or not name.isidentifier():
        raise ValueError(f"reward_functions: {reference!r} is not 'file.py:function' or 'module:function'")
    return location, name


def shipped_directory(directory: str) -> str | None:
    """Where Ray unpacked the py_module of `directory` on this worker (None when it did not):
    a py_module is importable by its directory's name."""
    spec = importlib.util.find_spec(os.path.basename(os.path.normpath(directory)))
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    return locations[0] if locations else None


def _module_name(location: str) -> str:
    """The name a reward file is imported under: one per file as the config names it."""
    stem = os.path.splitext(os.path.basename(location))[0]
    return f"rlgrad_reward_{stem}_{hashlib.sha1(location.encode()).hexdigest()[:8]}"


def _import_file(path: str, name: str, reference: str):
    directory = os.path.dirname(path)
    if directory not in sys.path:  # the module's own sibling imports
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ValueError(f"reward_functions: {reference!r}: importing {path} raised "
                         f"{type(error).__name__}: {error}") from None
    return module


def load_function(reference: str) -> Callable:
    location, name = split_reference(reference)
    if location.endswith(".py"):
        module = sys.modules.get(_module_name(location))  # a process imports a reward file once
        if module is None:
            path = location
            if not os.path.isfile(path):  # on a cluster node: the copy Ray shipped
                shipped = shipped_directory(os.path.dirname(location))
                path = os.path.join(shipped, os.path.basename(location)) if shipped else path
            if not os.path.isfile(path):
                raise ValueError(f"reward_functions: {reference!r}: no such file {location!r}")
            module = _import_file(path, _module_name(location), reference)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ValueError(f"reward_functions: {reference!r}: module {location!r} cannot be imported "
                             f"({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"reward_functions: {reference!r}: {location} defines no function {name!r}")
    return function


def check_reward_functions(references: list[str], weights: list[float] | None) -> None:
    """At validation: every function imports and is callable; one finite weight per function."""
    for reference in references:
        load_function(reference)
    if weights is not None:
        if len(weights) != len(references):
            raise ValueError(f"reward_weights has {len(weights)} weight(s) for {len(references)} reward function(s)")
        bad = [w for w in weights if not math.isfinite(w)]
        if bad:
            raise ValueError(f"reward_weights = {weights}: weights must be finite numbers")


def component_names(references: list[str]) -> list[str]:
    names = []
    for reference in references:
        name = split_reference(reference)[1]
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def _checked(values, name: str, input_ids: list[int], expected: int) -> list[float | None]:
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"reward function {name} returned {type(values).__name__}, not a list of "
                                  f"{expected} numbers (inputs {sorted(set(input_ids))})")
    if len(values) != expected:
        raise RewardFunctionError(f"reward function {name} returned {len(values)} rewards for {expected} "
                                  f"completions (inputs {sorted(set(input_ids))})")
    checked = []
    for value, input_id in zip(values, input_ids):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardFunctionError(f"reward function {name} returned {value!r} ({type(value).__name__}) for "
                                      f"input {input_id}: a reward is a number or None")
        if not math.isfinite(float(value)):
            raise RewardFunctionError(f"reward function {name} returned {value} for input {input_id}: "
                                      "a reward must be finite (None marks a completion it does not score)")
        checked.append(float(value))
    return checked


def build_python_reward(references: list[str], weights: list[float] | None = None):
    """A reward function (workloads.rewards interface) of the user's functions, weighted and summed."""
    functions = [load_function(r) for r in references]
    names = component_names(references)
    weights = list(weights) if weights is not None else [1.0] * len(functions)

    def reward(prompts, outputs, references_, columns=None, input_ids=None, output_ids=None) -> list[Reward]:
        n = len(outputs)
        columns = columns or [{} for _ in range(n)]
        input_ids = input_ids or list(range(n))
        keys = [k for k in columns[0] if k not in ("prompt", "completion", "completion_ids")] if columns else []
        kwargs = {k: [row.get(k) for row in columns] for k in keys}
        per_function = []
        for function, name in zip(functions, names):
            try:
                values = function(prompts=list(prompts), completions=list(outputs),
                                  completion_ids=list(output_ids or [[] for _ in range(n)]), **kwargs)
            except Exception as error:
                raise RewardFunctionError(_localised(function, name, error, prompts, outputs, output_ids, kwargs,
                                                     input_ids)) from None
            per_function.append(_checked(values, name, input_ids, n))
        rewards = []
        for j in range(n):
            values = [p[j] for p in per_function]
            total = sum(w * v for w, v in zip(weights, values) if v is not None)
            rewards.append(Reward(total, {name: (math.nan if v is None else v) for name, v in zip(names, values)}))
        return rewards

    reward.takes_columns = True
    return reward


def _localised(function, name, error, prompts, outputs, output_ids, kwargs, input_ids) -> str:
    """The failing call's line, naming the first input whose completion alone makes it fail."""
    for j in range(len(outputs)):
        try:
            function(prompts=[prompts[j]], completions=[outputs[j]],
                     completion_ids=[(output_ids or [[]] * len(outputs))[j]], **{k: [v[j]] for k, v in kwargs.items()})
        except Exception as one:
            return (f"reward function {name} raised {type(one).__name__}: {one} on input {input_ids[j]} "
                    f"(completion {outputs[j][:60]!r})")
    return f"reward function {name} raised {type(error).__name__}: {error} (inputs {sorted(set(input_ids))})"
