"""The loop every RL algorithm runs (PPO, NLPO, the GRPO family), and what they share.

An algorithm is a subclass of `RLRun`: it builds its models and optimiser, and
defines its step (`train_step`: rollout, update, monitor -- its math lives in its
own file) and what its checkpoints hold beyond the weights (`state`,
`restore_state`, `save_models`). `train` runs it:

    evaluate     step 0: the fixed evaluation set sampled, recorded (`samples`,
                 `inputs` rows with each input's reward std and gradient norm), and
                 each input's initial reward std / mean noted
    for step in 1..num_steps:
        seed     torch's stream from (seed, step, rank): a resumed run draws what the
                 uninterrupted one would have drawn
        step     the algorithm's train_step(step) -> metrics (logged by the algorithm)
        evaluate every eval_every steps
        report   every rank once; rank 0 hands over a checkpoint when one is due
    evaluate     after the last step, and the final report with the final checkpoint

A run resumes from `ctx.resume_from` (a retried worker): weights, optimiser
moments, the step and the run's state. The final checkpoint leaves the moments
out (nothing trains on from it: a later stage loads it as a model, a retry from it
only evaluates again).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..core.context import WorkloadContext
from .config import grad_norm_temperature
from .gradnorm import per_input_grad_norms
from .models import load_model_and_tokenizer, sequence_log_probs
from .sampling import Group, SamplingModel, evaluation_seed, prompts_of, sample_and_score, step_seed, table_rows
from .tasks import reward_of, task_of

STATE_FILE = "rlgrad_rl_state.json"  # step done, the run's state (initial stds, ...)
OPTIMIZER_FILE = "optimizer.pt"
EVAL_COLUMNS = ["input_id", "reward_mean", "reward_std", "reward_std_zero", "grad_norm"]


# ============================================================================
# Collectives over the worker group (no-ops on one worker).
# ============================================================================


class Ranks:
    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def sum(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` reduced over ranks (op sum, max or min), on the CPU."""
        if self.distributed:
            tensor = tensor.to(self.device)  # NCCL reduces GPU tensors only
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                        "min": dist.ReduceOp.MIN}[op])
        return tensor.cpu()

    def sum_named(self, values: dict[str, float]) -> dict[str, float]:
        """Each named value summed over ranks (every rank passes the same names)."""
        totals = self.sum(torch.tensor([float(v) for v in values.values()], dtype=torch.float64))
        return dict(zip(values, totals.tolist()))

    def max(self, value: int) -> int:
        return int(self.sum(torch.tensor([value], dtype=torch.int64), op="max").item())

    def min(self, value: int) -> int:
        return int(self.sum(torch.tensor([value], dtype=torch.int64), op="min").item())

    def gather(self, obj) -> list:
        """[obj of every rank] (just [obj] on one worker)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: list[float]) -> float:
        """The mean of every rank's values together (nan when there are none)."""
        totals = self.sum_named({"sum": sum(values), "count": len(values)})
        return totals["sum"] / totals["count"] if totals["count"] else math.nan


# ============================================================================
# The monitor's buckets of reward std.
# ============================================================================


def std_buckets(thresholds: list[float]) -> list[tuple[str, float, float]]:
    """[0.01, 0.05, 0.1] -> std_lt_0.01 [0, 0.01), std_0.01_0.05, std_0.05_0.1, std_ge_0.1 [0.1, inf)."""
    edges = [0.0, *thresholds, math.inf]
    names = [f"std_lt_{thresholds[0]}"]
    names += [f"std_{low}_{high}" for low, high in zip(thresholds, thresholds[1:])]
    names += [f"std_ge_{thresholds[-1]}"]
    return [(name, edges[i], edges[i + 1]) for i, name in enumerate(names)]


def bucket_of(std: float, buckets: list[tuple[str, float, float]]) -> str:
    return next(name for name, low, high in buckets if low <= std < high)


# ============================================================================
# What every RL run holds, and does the same way.
# ============================================================================


class RLRun:
    """The policy and its sampling, the prompt pool, the evaluation and the checkpoints.

    A subclass sets `optimizer` (and `train_model`, the policy under DDP) and defines
    `num_steps`, `train_step`, and what else a checkpoint holds."""

    name = "rl"  # the progress bar's label
    eval_every = 0  # steps between evaluations besides the first and the last
    checkpoint_every = 0

    def __init__(self, config, ctx: WorkloadContext, pool: list[int]):
        self.config, self.ctx, self.pool = config, ctx, pool
        self.device = torch.device(ctx.device)
        self.ranks = Ranks(ctx.rank, ctx.world_size, self.device)
        self.resume_from = ctx.resume_directory
        # the policy: the checkpoint a retry resumes from, or the config's model
        self.policy, self.tokenizer = load_model_and_tokenizer(self.resume_from or config.model, self.device,
                                                               config.train_dtype)
        self.policy.eval()  # dropout off: π_old and π_θ are the same function before an update
        self.task = task_of(config)
        self.reward_fn = reward_of(config, self.task)
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0  # updates done
        self.initial_std: dict[int, float] = {}  # evaluation input -> reward std at step 0
        self.initial_reward: dict[int, float] = {}  # ... and reward mean
        self.engine = None  # sampler: vllm -- the engine samples come from, refreshed after every update
        self.sampler: SamplingModel | None = None  # what generate() runs: the policy, or its sampling-dtype copy
        self.logits_processor = None  # NLPO's action mask

    # -- what the algorithm defines ------------------------------------------------

    @property
    def num_steps(self) -> int:
        raise NotImplementedError

    @property
    def evaluation_ids(self) -> list[int]:
        """The fixed evaluation set (every rank takes every world_size-th)."""
        raise NotImplementedError

    @property
    def sampling_batch(self) -> int:
        """Prompts per generate() call."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps of the run beyond step, weights and moments (JSON)."""
        return {}

    def restore_state(self, state: dict, directory: str) -> None:
        """The inverse of `state` (and of `save_models`)."""

    def save_models(self, directory: str) -> None:
        """Models a checkpoint holds beside the policy's weights."""

    def progress_fields(self, metrics: dict) -> dict[str, str]:
        return {"reward": f"{metrics['reward_mean']:.3f}"}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # -- sampling and recording ----------------------------------------------------

    def start_sampling(self, sampling_dtype: torch.dtype, engine=None) -> None:
        """After DDP has broadcast the weights: generate() on the policy or a copy in the sampling
        dtype, or the vLLM engine (which holds its own copy)."""
        self.engine = engine
        self.sampler = SamplingModel(self.policy, self.policy.dtype if engine is not None else sampling_dtype)

    def refresh_sampling(self) -> None:
        """After an update: the next samples come from the updated policy (TRL colocate: sync_weights)."""
        self.sampler.refresh()
        if self.engine is not None:
            self.engine.refresh_weights(self.policy)

    def sample_groups(self, input_ids: list[int]) -> list[Group]:
        """K scored completions for each input, in sampling batches, in order."""
        config, groups = self.config, []
        for start in range(0, len(input_ids), self.sampling_batch):
            examples = self.task.examples("train", input_ids[start : start + self.sampling_batch])
            # rollouts are cut where the reference's RL environment cuts them (stage "ppo")
            prompts = prompts_of(config, self.task, examples, self.tokenizer, self.policy.config.is_encoder_decoder,
                                 "ppo")
            scored = sample_and_score(self.sampler.model, self.tokenizer, self.reward_fn, prompts,
                                      config.num_samples_per_input, config.generation, self.logits_processor,
                                      engine=self.engine)
            groups += Group.split(examples, prompts, scored)
        return groups

    def grad_norms(self, groups: list[Group]) -> list[float | None]:
        """Each group's leave-one-out policy-gradient norm at the current policy
        (workloads.text.gradnorm), at the temperature `grad_norm_of` names; None when off."""
        if not self.config.monitor_grad_norm or not groups:
            return [None] * len(groups)
        prompts, scored = Group.joined(groups)
        return per_input_grad_norms(self.policy, prompts.ids, scored.outputs_by_input(), scored.reward_matrix,
                                    temperature=grad_norm_temperature(self.config.grad_norm_of,
                                                                      self.config.generation)).tolist()

    def record(self, step: int, shard: str, groups: list[Group], grad_norms: list | None = None,
               log_probs: list[float] | None = None, update_grad_norms: list | None = None) -> list[dict]:
        """`samples` and `inputs` rows of `groups` at `step`: gradient norms and log-probs at the
        current policy unless given (grad_norms per group, log_probs per completion); a retry
        reads the rows a previous attempt wrote. Returns the `inputs` rows."""
        if not groups:
            return []
        written = self.ctx.writer.written_inputs(shard, EVAL_COLUMNS)
        if written is not None:
            return written
        prompts, scored = Group.joined(groups)
        grad_norms = self.grad_norms(groups) if grad_norms is None else grad_norms
        if log_probs is None:
            log_probs = [value for sums in self.sequence_log_probs(prompts, scored) for value in sums]
        sample_rows, input_rows = table_rows(step, [g.example for g in groups], prompts, scored, log_probs,
                                             grad_norms, self.ctx.model_name(self.config.model),
                                             f"{self.config.task}/train", self.config.zero_std_tolerance,
                                             update_grad_norms)
        self.ctx.writer.write_samples_and_inputs(shard, sample_rows, input_rows)
        return input_rows

    def sequence_log_probs(self, prompts, scored) -> list[list[float]]:
        """The `log_prob` column: the policy's own log π(y|x) at T = 1, per group's K completions."""
        K = self.config.num_samples_per_input
        with torch.no_grad():
            sums = sequence_log_probs(self.policy, [p for p in prompts.ids for _ in range(K)], scored.outputs).tolist()
        return [sums[i : i + K] for i in range(0, len(sums), K)]

    # -- the fixed evaluation set --------------------------------------------------

    def evaluate(self, step: int) -> dict:
        """The evaluation set (this rank's share) sampled and recorded at `step`; at step 0 every
        rank notes each input's initial reward std and mean. Logs and returns the set's reward,
        and per bucket of INITIAL reward std its inputs, reward and share at std 0 now."""
        torch.manual_seed(evaluation_seed(self.config.seed, step, self.ctx.rank))
        groups = self.evaluation_groups(step)
        rows = self.record(step, f"eval-step-{step:09d}-rank-{self.ctx.rank:03d}", groups)
        if step == 0:
            for part in self.ranks.gather({r["input_id"]: (r["reward_std"], r["reward_mean"]) for r in rows}):
                for input_id, (std, reward) in part.items():
                    self.initial_std[input_id], self.initial_reward[input_id] = std, reward
        entries = [(r["input_id"], r["reward_mean"], r["reward_std_zero"]) for r in rows]
        overall = {"eval_reward_mean": self.ranks.mean([r["reward_mean"] for r in rows])}
        self.ctx.log_metrics(step, {"reward_mean": overall["eval_reward_mean"]}, split="eval")
        return {**overall, **self.by_initial_std(step, entries, ("num_inputs", "reward_mean"), "eval_")}

    def evaluation_groups(self, step: int) -> list[Group]:
        return self.sample_groups(self.ctx.my_items(self.evaluation_ids))

    def by_initial_std(self, step: int, entries: list[tuple[int, float, bool]], names: tuple[str, str],
                       prefix: str) -> dict[str, float]:
        """Per bucket of the inputs' INITIAL reward std, over all ranks, from this rank's
        (input_id, value, std 0 now): count, mean value and share at std 0 now (named `names`
        and share_zero_std); logged under split {prefix}initial_<bucket>, returned as
        {prefix}<name>_initial_<bucket>."""
        buckets = std_buckets(self.config.reward_std_thresholds)
        sums = {}
        for label, _, _ in buckets:
            mine = [(value, zero) for input_id, value, zero in entries
                    if bucket_of(self.initial_std[input_id], buckets) == label]
            sums.update({f"{label}/count": len(mine), f"{label}/value": sum(v for v, _ in mine),
                         f"{label}/zero": sum(z for _, z in mine)})
        sums = self.ranks.sum_named(sums)
        out = {}
        for label, _, _ in buckets:
            count = sums[f"{label}/count"]
            values = {names[0]: count, names[1]: sums[f"{label}/value"] / count if count else None,
                      "share_zero_std": sums[f"{label}/zero"] / count if count else None}
            self.ctx.log_metrics(step, values, split=f"{prefix}initial_{label}")
            out.update({f"{prefix}{k}_initial_{label}": v for k, v in values.items() if v is not None})
        return out

    # -- checkpoints ---------------------------------------------------------------

    def save_checkpoint(self, step: int, directory: str) -> None:
        """Weights + tokenizer (loadable by every workload), the algorithm's models, the run's state,
        and the optimiser's moments unless this is the final checkpoint."""
        self.policy.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.save_models(directory)
        if step < self.num_steps:
            torch.save(self.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump({"step": step, "initial_std": {str(k): v for k, v in self.initial_std.items()},
                       "initial_reward": {str(k): v for k, v in self.initial_reward.items()}, **self.state()}, f)

    def restore(self) -> None:
        """When resuming: the step, the run's state and (training goes on) the moments."""
        if self.resume_from is None:
            return
        with open(os.path.join(self.resume_from, STATE_FILE)) as f:
            state = json.load(f)
        if state["step"] < self.num_steps:
            self.optimizer.load_state_dict(torch.load(os.path.join(self.resume_from, OPTIMIZER_FILE),
                                                      map_location=self.device, weights_only=True))
        self.step = state["step"]
        self.initial_std = {int(k): v for k, v in state["initial_std"].items()}
        self.initial_reward = {int(k): v for k, v in state["initial_reward"].items()}
        self.restore_state(state, self.resume_from)

    def report(self, metrics: dict, checkpoint_step: int | None) -> None:
        """Every rank reports once; rank 0 hands over a checkpoint when one is due."""
        if checkpoint_step is None:
            self.ctx.report(metrics)
        else:
            self.ctx.report_checkpoint(metrics, lambda directory: self.save_checkpoint(checkpoint_step, directory))


# ============================================================================
# The loop.
# ============================================================================


def train(run: RLRun) -> dict:
    """Evaluate, train num_steps steps (resumed where the run stopped), evaluate; the final
    report carries the final checkpoint. Returns the final metrics."""
    ctx, start_step = run.ctx, run.step
    if start_step == 0:
        run.evaluate(0)
    progress = tqdm(range(start_step + 1, run.num_steps + 1), desc=f"{run.name} {ctx.model_name(run.config.model)}",
                    unit="step", disable=not (ctx.is_main and ctx.show_progress))
    metrics: dict = {}
    for step in progress:
        torch.manual_seed(step_seed(run.config.seed, step, ctx.rank))
        metrics = run.train_step(step)
        run.step = step
        progress.set_postfix(run.progress_fields(metrics))
        last = step == run.num_steps  # the final evaluation and checkpoint come after the loop
        if run.eval_every and step % run.eval_every == 0 and not last:
            run.evaluate(step)
        due = run.checkpoint_every and step % run.checkpoint_every == 0 and not last
        run.report(metrics, step if due else None)
    progress.close()
    final_step = max(run.num_steps, start_step)
    final = {**metrics, "step": final_step}
    if final_step > 0:
        final.update(run.evaluate(final_step))
    run.report(final, final_step)
    run.close()
    return final
