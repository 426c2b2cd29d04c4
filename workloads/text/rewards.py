"""Rewards: a registry of batched reward functions, selectable by name with arguments.

A reward function takes parallel lists (prompts, outputs, references) and
returns one `Reward` per output: a float and its named components (stored in
the `samples` table). `references` holds, per output, either one reference
string or the list of all the input's references; rewards with several
references take the best (max) over them, as the reference implementation does.

    name          arguments                                              used by (paper, RL4LMs id)
    reverse       -                                                      built-in offline task
    math_answer   format_weight=0.0                                      arithmetic_d*, word_problems_d* (verifiable)
    exact_match   case_sensitive=False                                   task: dataset (its default)
    reasoning_gym dataset, config={}                                     rg:<name> (reasoning-gym's score_answer)
    math_verify   -                                                      Hugging Face's math-verify, for LaTeX answers
    rouge_l_max   stemming=True, alpha=0.5, length_limit=100             NarrativeQA (rouge_l_max)
    sacrebleu     tokenize="13a" ("intl" for IWSLT), lowercase=False     ToTTo, IWSLT 2017 (sacre_bleu)
    meteor        alpha=0.9, beta=3.0, gamma=0.5, tokenize="auto"         CommonGen, CNN/DM, DailyDialog (meteor)
    learned       model, label_index=1, batch_size=100,                  IMDB: lvwerra/distilbert-imdb (learned_reward)
                  include_prompt=True

`check_reward_available(name, args)` says, without importing torch and without
running anything, whether `get_reward(name, args)` can work here: unknown
names and arguments, METEOR without NLTK's WordNet data, a learned reward whose
model is neither a local directory, nor cached, nor on a reachable hub. The
workload configs call it when they are validated, so a sweep fails before any
worker starts. This module imports torch, nltk and sacrebleu only inside the
reward functions that need them.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..core.availability import RewardNotAvailableError, check_pretrained_available, runtime_data_is_assumed
from .task_base import Reward




RewardFn = Callable[[list[str], list[str], list], list[Reward]]


def _reference_list(references: str | Sequence[str]) -> list[str]:
    return [references] if isinstance(references, str) else list(references)


# --------------------------------------------------------------------------
# reverse: the built-in task
# --------------------------------------------------------------------------

def reverse_reward(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
    """Built-in task reward, in [0, 1] and continuous so reward std varies per input.

    char_accuracy = #{i : output[i] == target[i]} / max(len(output), len(target))
      -- positional, so a shifted or too long/short answer loses credit;
    length_match  = 1 - |len(output) - len(target)| / max(len(output), len(target))
    The reward is char_accuracy (1 exactly when output == target); with several
    targets, that of the best one.
    """
    rewards = []
    for output, targets in zip(outputs, references, strict=True):
        candidates = []
        for target in _reference_list(targets):
            longest = max(len(output), len(target))
            if longest == 0:
                char_accuracy = length_match = 1.0
            else:
                char_accuracy = sum(a == b for a, b in zip(output, target)) / longest
                length_match = 1.0 - abs(len(output) - len(target)) / longest
            candidates.append(Reward(char_accuracy, {"char_accuracy": char_accuracy, "length_match": length_match,
                                                     "exact_match": float(output == target)}))
        rewards.append(max(candidates, key=lambda r: r.value))
    return rewards


def build_reverse() -> RewardFn:
    return reverse_reward


# --------------------------------------------------------------------------
# math_answer: verifiable 0/1 reward of the math tasks
# --------------------------------------------------------------------------

def build_math_answer(format_weight: float = 0.0) -> RewardFn:
    """reward = correct + format_weight * format, where
         correct = 1 when the final answer parsed from the output (math_tasks.parse_final_answer)
                   equals the reference's, else 0;
         format  = 1 when that answer was given explicitly ("Answer: N", \\boxed{N}, "#### N").
    Both are stored as components; with format_weight 0 (default) the reward is correctness alone."""
    from .math_tasks import answer_reward

    def math_answer(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
        rewards = []
        for output, targets in zip(outputs, references, strict=True):
            correct, formatted = max(answer_reward(output, t) for t in _reference_list(targets))
            rewards.append(Reward(correct + format_weight * formatted, {"correct": correct, "format": formatted}))
        return rewards

    return math_answer


def _check_math_answer(args: dict) -> None:
    weight = args.get("format_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise RewardNotAvailableError(f"reward 'math_answer': format_weight must be a number >= 0, got {weight!r}")


# --------------------------------------------------------------------------
# exact_match: the default reward of a dataset task
# --------------------------------------------------------------------------

def normalized_answer(text: str, case_sensitive: bool) -> str:
    """Outer whitespace and one trailing full stop dropped, inner whitespace runs made one space."""
    text = " ".join(text.split()).removesuffix(".").strip()
    return text if case_sensitive else text.casefold()


def build_exact_match(case_sensitive: bool = False) -> RewardFn:
    """1 when the output equals a reference after `normalized_answer`, else 0 (max over references)."""

    def exact_match(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
        rewards = []
        for output, targets in zip(outputs, references, strict=True):
            mine = normalized_answer(output, case_sensitive)
            value = float(any(mine == normalized_answer(t, case_sensitive) for t in _reference_list(targets)))
            rewards.append(Reward(value, {"exact_match": value}))
        return rewards

    return exact_match


# --------------------------------------------------------------------------
# rouge_l_max: ROUGE-L F-measure, max over references (NarrativeQA)
# --------------------------------------------------------------------------

NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str, stemming: bool, length_limit: int | None) -> list[str]:
    """ROUGE's word tokens, as py-rouge (used by RL4LMs) makes them: lowercase,
    every run of non-alphanumeric characters is a separator, words longer than
    3 characters Porter-stemmed, only the first `length_limit` words kept."""
    tokens = NON_ALPHANUMERIC.sub(" ", text.lower()).split()
    if stemming:
        stemmer = _porter_stemmer()
        tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]
    return tokens if length_limit is None else tokens[:length_limit]


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    """|LCS(a, b)| by the usual dynamic programme, one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(output_tokens: list[str], reference_tokens: list[str], alpha: float) -> tuple[float, float, float]:
    """(F, precision, recall) of ROUGE-L:
         P = |LCS| / |output|,  R = |LCS| / |reference|,
         F = P * R / ((1 - alpha) * P + alpha * R)     (alpha = 0.5: harmonic mean 2PR / (P + R))
    """
    lcs = longest_common_subsequence(output_tokens, reference_tokens)
    if lcs == 0:
        return 0.0, 0.0, 0.0
    precision, recall = lcs / len(output_tokens), lcs / len(reference_tokens)
    return precision * recall / ((1 - alpha) * precision + alpha * recall), precision, recall


def build_rouge_l_max(stemming: bool = True, alpha: float = 0.5, length_limit: int | None = 100) -> RewardFn:
    def rouge_l_max(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
        rewards = []
        for output, targets in zip(outputs, references, strict=True):
            output_tokens = rouge_tokens(output, stemming, length_limit)
            best = max(rouge_l(output_tokens, rouge_tokens(t, stemming, length_limit), alpha)
                       for t in _reference_list(targets))  # the reference with the best F
            f_measure, precision, recall = best
            rewards.append(Reward(f_measure, {"rouge_l_f": f_measure, "rouge_l_precision": precision,
                                              "rouge_l_recall": recall}))
        return rewards

    return rouge_l_max


def _porter_stemmer():
    from nltk.stem.porter import PorterStemmer

    # py-rouge's compatibility mode uses Porter's original algorithm
    return PorterStemmer(PorterStemmer.ORIGINAL_ALGORITHM)


# --------------------------------------------------------------------------
# sacrebleu: SacreBLEU of one output against all its references (ToTTo, IWSLT)
# --------------------------------------------------------------------------

def build_sacrebleu(tokenize: str = "13a", lowercase: bool = False) -> RewardFn:
    """BLEU as the reference computes it per sample: a corpus of one output with
    all its references, exponential smoothing, no effective order, scaled to [0, 1]:

        BLEU = BP * exp( (1/4) Σ_{n=1..4} log p_n ),  BP = min(1, exp(1 - ref_len / out_len))

    p_n = clipped n-gram precision (a zero count smoothed to 1 / 2^k for the k-th zero)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method="exp", effective_order=False)

    def sacrebleu_reward(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
        rewards = []
        for output, targets in zip(outputs, references, strict=True):
            # sacrebleu wants reference *streams*: stream j holds reference j of every output
            score = bleu.corpus_score([output], [[t] for t in _reference_list(targets)])
            rewards.append(Reward(score.score / 100, {"sacrebleu": score.score / 100, "brevity_penalty": score.bp}))
        return rewards

    return sacrebleu_reward


# --------------------------------------------------------------------------
# meteor: METEOR (NLTK), max over references (CommonGen, CNN/DM, DailyDialog)
# --------------------------------------------------------------------------

METEOR_NLTK_DATA = {"wordnet": "corpora/wordnet"}
PUNKT_ENGLISH = "tokenizers/punkt_tab/english/"
METEOR_TOKENIZERS = ("auto", "word_tokenize", "punkt_free")


def punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find(PUNKT_ENGLISH)
        return True
    except LookupError:
        return False


@functools.lru_cache(maxsize=4)
def _meteor_tokenizer(tokenize: str) -> Callable[[str], list[str]]:
    from nltk.tokenize import NLTKWordTokenizer, word_tokenize
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    if tokenize == "word_tokenize" or (tokenize == "auto" and punkt_available()):
        return word_tokenize  # the reference: HF `meteor` tokenises with nltk.word_tokenize
    # punkt_free: what word_tokenize does -- split into sentences, then Treebank-style
    # words per sentence -- with Punkt's algorithm run without the trained English
    # model (no learned abbreviations, collocations or sentence starters)
    sentences, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
    return lambda text: [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]


def meteor_tokens(text: str, tokenize: str = "auto") -> list[str]:
    """METEOR's word tokens.

    The reference (RL4LMs' MeteorMetric -> HF `meteor` -> nltk.word_tokenize)
    needs NLTK's trained English Punkt model (punkt_tab), which no Debian or
    PyPI package ships and which cannot be downloaded offline. `tokenize`:
      word_tokenize  nltk.word_tokenize (needs punkt_tab);
      punkt_free     the same pipeline -- Punkt sentence split, then NLTK's
                     Treebank word tokenizer per sentence -- with an untrained
                     Punkt. Identical tokens wherever the text has no
                     abbreviation the English model knows: "Mr. Smith" gives
                     ["Mr", ".", "Smith"] here, ["Mr.", "Smith"] with punkt_tab
                     (tests/test_rewards.py pins NLTK's own word_tokenize examples);
      auto           word_tokenize where punkt_tab is installed, else punkt_free.
    """
    return _meteor_tokenizer(tokenize)(text)


def build_meteor(alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5, tokenize: str = "auto") -> RewardFn:
    """METEOR as Hugging Face's `meteor` metric computes it (RL4LMs' metric,
    apple/ml-rlgrad rl4lms/envs/text_generation/metric.py MeteorMetric):
    NLTK word tokens (see `meteor_tokens`), unigram matches by exact form
    (lowercased), Porter stem and WordNet synonym; with P, R the matched
    fractions of output and reference,

        F_mean  = P * R / (alpha * P + (1 - alpha) * R)
        penalty = gamma * (chunks / matches) ** beta
        METEOR  = F_mean * (1 - penalty),   max over references."""
    from nltk.translate.meteor_score import meteor_score

    tokens = _meteor_tokenizer(tokenize)

    def meteor(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
        rewards = []
        for output, targets in zip(outputs, references, strict=True):
            value = meteor_score([tokens(t) for t in _reference_list(targets)], tokens(output),
                                 alpha=alpha, beta=beta, gamma=gamma)
            rewards.append(Reward(value, {"meteor": value}))
        return rewards

    return meteor


def _check_meteor(args: dict) -> None:
    try:
        import nltk
    except ImportError as error:
        raise RewardNotAvailableError("reward 'meteor' needs the nltk package: pip install nltk") from error
    tokenize = args.get("tokenize", "auto")
    if tokenize not in METEOR_TOKENIZERS:
        raise RewardNotAvailableError(f"reward 'meteor': tokenize={tokenize!r}; allowed: {list(METEOR_TOKENIZERS)}")
    if runtime_data_is_assumed():  # `rlgrad import`: the data is checked where the sweep runs
        return
    missing = []
    for name, resource in METEOR_NLTK_DATA.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            try:
                nltk.data.find(resource + ".zip")
            except LookupError:
                missing.append(name)
    if tokenize == "word_tokenize" and not punkt_available():
        missing.append("punkt_tab")
    if missing:
        raise RewardNotAvailableError(
            f"reward 'meteor' needs NLTK data {missing}, which is not installed here (searched {nltk.data.path}). "
            f"Offline on Debian: `apt-get install -y wordnet-base wordnet-sense-index && python -m "
            f"workloads.text.nltk_data` prepares WordNet in ~/nltk_data; where a network is reachable: "
            f"`python -m nltk.downloader {' '.join(missing)}`; or copy an nltk_data directory and set NLTK_DATA."
        )


# --------------------------------------------------------------------------
# learned: the probability a sequence classifier gives one label (IMDB)
# --------------------------------------------------------------------------

def build_learned(model: str, label_index: int = 1, batch_size: int = 100, include_prompt: bool = True) -> RewardFn:
    """reward = softmax(classifier(prompt + output))[label_index]

    Any sequence-classification model (hub id or local directory); the
    classifier's tokenizer truncates from the left, so the end of the text --
    the generated continuation -- is always scored (as the reference does)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = os.path.isdir(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local)
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    classifier = AutoModelForSequenceClassification.from_pretrained(model, local_files_only=local).to(device).eval()
    if not 0 <= label_index < classifier.config.num_labels:
        raise RewardNotAvailableError(f"label_index {label_index} out of range: {model!r} has "
                                      f"{classifier.config.num_labels} labels")
    max_length = min(tokenizer.model_max_length, getattr(classifier.config, "max_position_embeddings", 10**9))

    @torch.no_grad()
    def learned(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
        texts = [p + o for p, o in zip(prompts, outputs, strict=True)] if include_prompt else list(outputs)
        probabilities: list[float] = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", truncation=True,
                                padding=True, max_length=max_length).to(device)
            logits = classifier(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            probabilities += torch.softmax(logits.float(), dim=-1)[:, label_index].tolist()
        return [Reward(p, {f"label_{label_index}_probability": p}) for p in probabilities]

    return learned


def _check_learned(args: dict) -> None:
    model = args.get("model")
    if not isinstance(model, str) or not model:
        raise RewardNotAvailableError("reward 'learned' needs `model`: a hub id or a local directory "
                                      "of a sequence-classification model")
    if not isinstance(args.get("label_index", 1), int) or args.get("label_index", 1) < 0:
        raise RewardNotAvailableError("reward 'learned': label_index must be an integer >= 0")
    if not isinstance(args.get("batch_size", 1), int) or args.get("batch_size", 1) < 1:
        raise RewardNotAvailableError("reward 'learned': batch_size must be an integer >= 1")
    check_pretrained_available(model, "reward 'learned': model", "pass a local directory holding the classifier "
                               "and its tokenizer (save_pretrained)", error=RewardNotAvailableError)


# --------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardSpec:
    build: Callable[..., RewardFn]  # build(**args) -> reward function
    check: Callable[[dict], None] | None = None  # raises RewardNotAvailableError when it cannot run here


def _check_rouge(args: dict) -> None:
    if not 0 <= args.get("alpha", 0.5) <= 1:
        raise RewardNotAvailableError("reward 'rouge_l_max': alpha must lie in [0, 1]")
    if args.get("stemming", True):
        _require_package("nltk", "rouge_l_max with stemming")


def _check_sacrebleu(args: dict) -> None:
    _require_package("sacrebleu", "sacrebleu")
    from sacrebleu.metrics import BLEU

    tokenize = args.get("tokenize", "13a")
    if tokenize not in BLEU.TOKENIZERS:
        raise RewardNotAvailableError(f"reward 'sacrebleu': unknown tokenize {tokenize!r}; "
                                      f"allowed: {sorted(BLEU.TOKENIZERS)}")


def _build_math_verify() -> RewardFn:
    from .math_verify_reward import build_math_verify

    return build_math_verify()


def _check_math_verify(args: dict) -> None:
    import importlib.util

    if importlib.util.find_spec("math_verify") is None:
        raise RewardNotAvailableError("reward 'math_verify' needs the math-verify package: "
                                      "pip install -e '.[math-verify]' (math-verify==0.9.0)")


def _build_reasoning_gym(dataset: str, config: dict | None = None) -> RewardFn:
    from .reasoning_gym_task import build_reasoning_gym

    return build_reasoning_gym(dataset, config)


def _check_reasoning_gym(args: dict) -> None:
    from .reasoning_gym_task import check_reasoning_gym

    check_reasoning_gym(args)


REWARDS: dict[str, RewardSpec] = {
    "reverse": RewardSpec(build_reverse),
    "math_answer": RewardSpec(build_math_answer, _check_math_answer),
    "exact_match": RewardSpec(build_exact_match),
    "reasoning_gym": RewardSpec(_build_reasoning_gym, _check_reasoning_gym),
    "math_verify": RewardSpec(_build_math_verify, _check_math_verify),
    "rouge_l_max": RewardSpec(build_rouge_l_max, _check_rouge),
    "sacrebleu": RewardSpec(build_sacrebleu, _check_sacrebleu),
    "meteor": RewardSpec(build_meteor, _check_meteor),
    "learned": RewardSpec(build_learned, _check_learned),
}


def check_reward_available(name: str, args: dict | None = None) -> None:
    """Raise RewardNotAvailableError (one clear sentence) unless reward `name`
    with `args` can be built here. Torch-free; no model is loaded."""
    args = dict(args or {})
    if name not in REWARDS:
        raise RewardNotAvailableError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    spec = REWARDS[name]
    parameters = inspect.signature(spec.build).parameters
    unknown = sorted(set(args) - set(parameters))
    if unknown:
        raise RewardNotAvailableError(f"reward {name!r} has no argument(s) {unknown}; its arguments: "
                                      f"{list(parameters) or 'none'}")
    required = [p for p, v in parameters.items() if v.default is inspect.Parameter.empty and p not in args]
    if required:
        raise RewardNotAvailableError(f"reward {name!r} needs argument(s) {required}")
    if spec.check is not None:
        spec.check(args)


def get_reward(name: str, args: dict | None = None, **more_args) -> RewardFn:
    """The reward function registered under `name`, built with its arguments,
    given as a dict or as keywords (the built-in task's reward has the task's
    name and no arguments)."""
    args = {**(args or {}), **more_args}
    check_reward_available(name, args)
    return REWARDS[name].build(**args)


def _require_package(package: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise RewardNotAvailableError(f"reward {what!r} needs the {package} package: pip install {package}")
