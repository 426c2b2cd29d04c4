"""Sampling and scoring, the one module every LM workload draws its samples with
(extract, the PPO rollouts and monitor, and later workloads).

    prompts_of(task, examples, ...)          -> Prompts: texts, token ids, references
    sample_and_score(model, ..., K, gen)     -> ScoredSamples: K outputs per prompt,
                                                their texts, rewards and the [P, K] reward matrix
    table_rows(step, examples, prompts, scored, log_probs, grad_norms, ...)
                                             -> rows of the `samples` and `inputs` tables

Samples are prompt-major everywhere: rows i*K .. i*K+K-1 belong to prompt i.
Per-input statistics (reward mean, std with 1/K and 1/(K-1)) come from
`workloads.text.gradnorm.reward_stats`, the same function the gradient-norm
estimator uses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .gradnorm import reward_stats
from .models import encode_prompts, generate_outputs
from .rewards import Reward


# Seeds of the random streams samples are drawn from. A run's streams are apart by
# SEED_STRIDE per seed, so seeds s and s+1 never share a stream within a run; inside
# a run, steps and evaluation passes are apart by primes, each rank (or shard) by 1.
SEED_STRIDE = 1_000_003
STEP_STRIDE = 1009
EVALUATION_STRIDE = 7919


def step_seed(seed: int, step: int, rank: int) -> int:
    """torch's stream for an RL step on a rank: a resumed run draws what the uninterrupted one would."""
    return seed * SEED_STRIDE + step * STEP_STRIDE + rank


def evaluation_seed(seed: int, step: int, rank: int) -> int:
    """torch's stream for the evaluation pass at `step` on a rank."""
    return seed * SEED_STRIDE + EVALUATION_STRIDE * step + rank


def choice_seed(seed: int, step: int) -> int:
    """The prompt draw of a step (random.Random): the same on every rank."""
    return seed * SEED_STRIDE + step


def shard_seed(seed: int, first_input: int) -> int:
    """An extraction shard's stream, whichever worker (or retry) runs it."""
    return seed * SEED_STRIDE + first_input


def engine_seed(seed: int, rank: int) -> int:
    """A vLLM engine's one seed (it takes no per-request seeds on a CPU)."""
    return seed * SEED_STRIDE + rank


@dataclass
class Prompts:
    texts: list[str]  # what the model is conditioned on (before any chat template)
    ids: list[list[int]]  # their token ids (templated), cut to max_prompt_length
    references: list[list[str]]  # every reference of each input: what its reward compares against
    columns: list[dict]  # each input's row: what a Python reward function receives
    input_ids: list[int]  # each input's id in its split

    def subset(self, indices: list[int]) -> "Prompts":
        return Prompts(*([getattr(self, f)[i] for i in indices] for f in PROMPT_FIELDS))

    @classmethod
    def concat(cls, parts: list["Prompts"]) -> "Prompts":
        return cls(*([x for p in parts for x in getattr(p, f)] for f in PROMPT_FIELDS))


PROMPT_FIELDS = ("texts", "ids", "references", "columns", "input_ids")


@dataclass
class ScoredSamples:
    num_samples_per_input: int  # K
    outputs: list[list[int]]  # P*K output token ids, prompt-major, each cut after its EOS
    texts: list[str]  # the outputs decoded (special tokens dropped)
    rewards: list[Reward]  # P*K rewards with their components
    reward_matrix: torch.Tensor  # [P, K] float64

    @classmethod
    def of(cls, num_samples: int, outputs: list[list[int]], texts: list[str], rewards: list[Reward]) -> "ScoredSamples":
        matrix = torch.tensor([r.value for r in rewards], dtype=torch.float64).view(-1, num_samples)
        return cls(num_samples, outputs, texts, rewards, matrix)

    def outputs_by_input(self) -> list[list[list[int]]]:
        """[P][K] output ids: the shape the gradient-norm estimator takes."""
        K = self.num_samples_per_input
        return [self.outputs[i * K : (i + 1) * K] for i in range(len(self.reward_matrix))]

    def subset(self, indices: list[int]) -> "ScoredSamples":
        """The samples of prompts `indices` (prompt-major, K each)."""
        K = self.num_samples_per_input
        rows = [i * K + k for i in indices for k in range(K)]
        return ScoredSamples.of(K, [self.outputs[j] for j in rows], [self.texts[j] for j in rows],
                                [self.rewards[j] for j in rows])

    @classmethod
    def concat(cls, parts: list["ScoredSamples"], num_samples: int) -> "ScoredSamples":
        return cls.of(num_samples, [o for p in parts for o in p.outputs], [t for p in parts for t in p.texts],
                      [r for p in parts for r in p.rewards])


@dataclass
class Group:
    """One prompt's K completions, scored: the unit the RL algorithms sample, train on and record."""

    input_id: int
    example: object
    prompts: Prompts  # a Prompts of this one prompt
    scored: ScoredSamples  # its K completions

    @property
    def rewards(self) -> torch.Tensor:
        return self.scored.reward_matrix[0]

    @property
    def std(self) -> float:
        """The reward std over the K completions (1/K); 0 exactly when all K rewards are equal."""
        return reward_stats(self.scored.reward_matrix)[1][0].item()

    def zero_std(self, tolerance: float = 0.0) -> bool:
        return is_zero_std(self.std, tolerance)

    @staticmethod
    def split(examples, prompts: Prompts, scored: ScoredSamples) -> list["Group"]:
        """A sampled batch as one Group per prompt, in order."""
        return [Group(ex.input_id, ex, prompts.subset([i]), scored.subset([i])) for i, ex in enumerate(examples)]

    @staticmethod
    def joined(groups: list["Group"]) -> tuple[Prompts, ScoredSamples]:
        """Groups back as one batch (prompt-major)."""
        K = groups[0].scored.num_samples_per_input
        return Prompts.concat([g.prompts for g in groups]), ScoredSamples.concat([g.scored for g in groups], K)


def prompts_of(config, task, examples, tokenizer, encoder_decoder: bool, stage: str) -> Prompts:
    """The prompts of `examples` of `task` for a workload `stage` ('extract' | 'ppo'): in the config's
    chat template and system prompt, cut to generation.max_prompt_length on the side the reference
    cuts them for that stage."""
    gen = config.generation
    texts = [task.prompt_text(ex, encoder_decoder) for ex in examples]
    side = task.truncation_side(gen.truncation_side, encoder_decoder, stage)
    ids = encode_prompts(tokenizer, texts, gen.max_prompt_length, encoder_decoder, side,
                         config.chat_template, config.system_prompt)
    return Prompts(texts, ids, [task.references(ex) for ex in examples], [task.columns(ex) for ex in examples],
                   [ex.input_id for ex in examples])


class SamplingModel:
    """The model generate() runs for a policy that trains: the policy itself when the
    sampling dtype is its own, else a frozen copy in the sampling dtype (bf16 sampling beside
    float32 training, as TRL / veRL sample with a bf16 engine). `refresh()` after every
    update copies the policy's weights into the copy, so samples always come from the
    current policy, rounded to the sampling dtype."""

    def __init__(self, policy, dtype: torch.dtype):
        self.policy = policy
        self.model = policy
        if policy.dtype != dtype:
            self.model = copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)

    def refresh(self) -> None:
        if self.model is self.policy:
            return
        with torch.no_grad():  # tied weights appear once in parameters(), in both models alike
            for mine, theirs in zip(self.model.parameters(), self.policy.parameters(), strict=True):
                mine.copy_(theirs)


def sample_outputs(model, tokenizer, prompt_ids: list[list[int]], num_samples: int,
                   gen: GenerationConfig, logits_processor_factory=None, engine=None) -> list[list[int]]:
    """K samples for each prompt from ONE generate() call (num_return_sequences=K), prompt-major;
    from `engine` instead when given (a `workloads.text.vllm_sampler.VLLMSampler`, config
    `sampler: vllm`), which returns the same structure."""
    if engine is not None:
        if logits_processor_factory is not None:
            raise ValueError("the vLLM sampler takes no logits processor (NLPO's action mask): use sampler: hf")
        return engine.sample(prompt_ids, num_samples, gen)
    return generate_outputs(
        model, tokenizer, prompt_ids, num_return_sequences=num_samples, do_sample=True,
        temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
        min_new_tokens=gen.min_new_tokens, max_new_tokens=gen.max_new_tokens,
        logits_processor_factory=logits_processor_factory,
    )


def score_outputs(tokenizer, reward_fn, prompts: Prompts, outputs: list[list[int]],
                  num_samples: int) -> tuple[list[str], list[Reward]]:
    """(texts, rewards) of prompt-major samples: one batch_decode and ONE reward call for all of them
    (a reward that `takes_columns` also gets each input's row, its id and the output ids)."""
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)

    def repeated(values: list) -> list:
        return [v for v in values for _ in range(num_samples)]

    extras = {}
    if getattr(reward_fn, "takes_columns", False):
        extras = {"columns": repeated(prompts.columns), "input_ids": repeated(prompts.input_ids),
                  "output_ids": outputs}
    rewards = reward_fn(repeated(prompts.texts), texts, repeated(prompts.references), **extras)
    return texts, rewards


def sample_and_score(model, tokenizer, reward_fn, prompts: Prompts, num_samples: int,
                     gen: GenerationConfig, logits_processor_factory=None, engine=None) -> ScoredSamples:
    """K samples for every prompt (from `engine` when given), decoded and scored."""
    outputs = sample_outputs(model, tokenizer, prompts.ids, num_samples, gen, logits_processor_factory, engine)
    texts, rewards = score_outputs(tokenizer, reward_fn, prompts, outputs, num_samples)
    return ScoredSamples.of(num_samples, outputs, texts, rewards)


def is_zero_std(std: float, tolerance: float = 0.0) -> bool:
    """Whether a group counts as zero-std: its reward std (1/K) at most `tolerance` (config
    zero_std_tolerance; 0 = all K rewards equal)."""
    return std <= tolerance


def table_rows(step: int, examples, prompts: Prompts, scored: ScoredSamples, log_probs: list[float],
               grad_norms: list[float | None], model: str, dataset: str,
               zero_std_tolerance: float = 0.0,
               update_grad_norms: list[float | None] | None = None) -> tuple[list[dict], list[dict]]:
    """(`samples` rows, `inputs` rows) of scored prompts at a training step (0 for a fixed model)."""
    K = scored.num_samples_per_input
    reward_mean, reward_std, reward_std_unbiased = reward_stats(scored.reward_matrix)
    sample_rows, input_rows = [], []
    for i, ex in enumerate(examples):
        for k in range(K):
            j = i * K + k
            sample_rows.append({
                "step": step, "input_id": ex.input_id, "sample_idx": k, "prompt": prompts.texts[i],
                "output": scored.texts[j], "reward": scored.rewards[j].value,
                "reward_components": scored.rewards[j].components, "log_prob": log_probs[j],
                "num_tokens": len(scored.outputs[j]), "prompt_token_ids": prompts.ids[i],
                "output_token_ids": scored.outputs[j], "model": model, "dataset": dataset,
            })
        input_rows.append({
            "step": step, "input_id": ex.input_id, "prompt": prompts.texts[i], "num_samples": K,
            "reward_mean": reward_mean[i].item(), "reward_std": reward_std[i].item(),
            "reward_std_unbiased": reward_std_unbiased[i].item(), "reward_std_zero": is_zero_std(reward_std[i].item(), zero_std_tolerance),
            "grad_norm": grad_norms[i], "update_grad_norm": update_grad_norms[i] if update_grad_norms else None,
            "model": model, "dataset": dataset,
        })
    return sample_rows, input_rows
