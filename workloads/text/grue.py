"""The seven GRUE text tasks of the paper's experiment family 1, loaded from the
Hugging Face hub or from a local copy, in the prompt formats of the reference
configs (apple/ml-rlgrad rl4lms_scripts/, built on allenai/RL4LMs datapools).

    task            hub dataset (config)                        prompt                                    references
    narrative_qa    deepmind/narrativeqa                        "<question> \\n <summary>", lowercased    both answers, lowercased
    totto           google-research-datasets/totto              highlighted subtable, linearized twice    every final_sentence
                                                                (without, then with page/section titles)
    common_gen      GEM/common_gen                              "generate a sentence with: c1 c2 c3."     the row's target (one input per row)
    iwslt2017       IWSLT/iwslt2017 (iwslt2017-de-en)           "translate English to German: <en>"       the German sentence
    cnn_daily_mail  abisee/cnn_dailymail (3.0.0)                "Summarize: <article>"                    the highlights
    daily_dialog    li2017dailydialog/daily_dialog              last 5 turns joined by <EOU>, then " <EOU>"  the next turn + "<EOU>"
    imdb            stanfordnlp/imdb                            first half of the review's words          the full review (SFT: the second half)

Every example carries all its references; `target` is the first one SFT
trains on (`train_references`, where SFT's differ: IMDB). Prompt length limits (512 tokens, 64 for IMDB, ...) are applied by
the workloads when they tokenize (`generation.max_prompt_length`).

Where the data comes from:
  * `dataset_path` (a local copy): a directory saved with `save_to_disk`
    (a DatasetDict, or one Dataset per split in <path>/<split>/), or files
    <path>/<split>.parquet | .jsonl | .json | .csv with the hub dataset's
    columns (csv only for flat columns: cnn_daily_mail, imdb);
  * otherwise the hub id above. Without network the hub is probed once with a
    short timeout, and a missing dataset fails at once (instead of after the
    `datasets` library's half-minute of retries) with an error that says how to
    point at a local copy. With HF_DATASETS_OFFLINE=1 (or HF_HUB_OFFLINE=1)
    the Hugging Face cache is used without probing.

This module is torch-free; `datasets` (slow to import) is imported when data
is first loaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..core.availability import (DatasetNotAvailableError, check_dataset_available, hub_endpoint, hub_is_reachable,
                                 hub_offline_mode)
from ..core.local_data import load_local_split
from .task_base import Task, TextExample

EOU = "<EOU>"  # DailyDialog's end-of-utterance marker (RL4LMs)
DAILY_DIALOG_CONTEXT_TURNS = 5
IMDB_SHUFFLE_SEED = 42  # the reference datapool shuffles IMDB with seed 42 before splitting
IMDB_TRAIN_FRACTION = 0.8  # of the hub's train split; the rest is our validation split
IMDB_TEST_SIZE = 5000  # the reference datapool keeps 5,000 shuffled test reviews
SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------
# prompt and reference formats, one pair of functions per task:
#   index(table, split) -> one key per input (which rows it is built from)
#   build(table, key)   -> (prompt, references)
# --------------------------------------------------------------------------

def _one_input_per_row(table, split: str) -> list[int]:
    return list(range(len(table)))


def _narrative_qa(table, row: int) -> tuple[str, list[str]]:
    # UnifiedQA's text format, which RL4LMs reads: question, a literal "\n", the
    # story summary, all lowercased; answers lowercased and stripped
    item = table[row]
    summary = " ".join(item["document"]["summary"]["text"].splitlines())  # one line, as in the TSV
    prompt = f"{item['question']['text']} \\n {summary}".lower()
    answers = [a["text"] for a in _records(item["answers"])]
    return prompt, [a.lower().strip() for a in answers]


def _totto(table, row: int) -> tuple[str, list[str]]:
    item = table[row]
    cells = _highlighted_cells_with_headers(item["table"], item["highlighted_cells"])
    # the reference datapool's 'subtable' representation: the subtable without
    # titles immediately followed by the subtable with them
    prompt = _linearize(cells, None, None) + _linearize(cells, item["table_page_title"], item["table_section_title"])
    annotations = _records(item["sentence_annotations"])
    references = [a["final_sentence"] for a in annotations] or [""]  # the test split has no references
    return prompt, references


def _common_gen(table, row: int) -> tuple[str, list[str]]:
    # apple/ml-rlgrad rl4lms/data_pools/custom_text_generation_pools.py CommonGen.prepare:
    # one sample per hub row (a concept set appears once per human target), its
    # single target as the reference; prefix + concepts joined by " " + ".", the
    # concept_end_token of the reference configs
    item = table[row]
    prompt = "generate a sentence with: " + " ".join(item["concepts"]) + "."
    return prompt, [item["target"] or "empty reference"]  # RL4LMs' stand-in for an empty target


def _iwslt2017(table, row: int) -> tuple[str, list[str]]:
    pair = table[row]["translation"]
    return "translate English to German: " + pair["en"], [pair["de"]]


def _cnn_daily_mail(table, row: int) -> tuple[str, list[str]]:
    item = table[row]
    return "Summarize: " + item["article"], [item["highlights"]]


def _daily_dialog_index(table, split: str) -> list[tuple[int, int]]:
    # one input per turn that has a full context of 5 earlier turns
    return [(row, turn) for row, dialog in enumerate(table["dialog"])
            for turn in range(DAILY_DIALOG_CONTEXT_TURNS, len(dialog))]


def _daily_dialog(table, key: tuple[int, int]) -> tuple[str, list[str]]:
    row, turn = key
    dialog = table[row]["dialog"]
    context = EOU.join(dialog[turn - DAILY_DIALOG_CONTEXT_TURNS : turn]) + " " + EOU
    return context, [dialog[turn] + EOU]


def _imdb_index(table, split: str) -> list[int]:
    # the reference datapool: shuffle with seed 42 (datasets' Dataset.shuffle
    # draws this very permutation), train = first 80% restricted to positive
    # reviews, validation = the other 20%, test = the first 5,000 test reviews
    order = np.random.default_rng(IMDB_SHUFFLE_SEED).permutation(len(table)).tolist()
    if split == "test":
        return order[:IMDB_TEST_SIZE]
    cut = int(len(order) * IMDB_TRAIN_FRACTION)
    if split == "validation":
        return order[cut:]
    labels = table["label"]
    return [row for row in order[:cut] if labels[row] == 1]


def _imdb(table, row: int) -> tuple[str, list[str]]:
    # custom_text_generation_pools.py IMDB.prepare (extraction, PPO): prompt = the
    # first half of the review's space-separated words, reference = the full review
    text = table[row]["text"]
    words = text.split(" ")
    return " ".join(words[: int(len(words) * 0.5)]), [text]


def _imdb_train_references(table, row: int) -> list[str]:
    # custom_text_generation_pools.py IMDBForSeq2Seq.prepare (datapool imdb_seq2seq of
    # training/imdb/gpt2_supervised.yml): reference = the second half of the words
    words = table[row]["text"].split(" ")
    return [" ".join(words[int(len(words) * 0.5):])]


@dataclass(frozen=True)
class GrueTask:
    hub_id: str
    hub_config: str | None
    columns: tuple[str, ...]  # the hub columns the loader reads (a local copy needs them)
    build: Callable
    index: Callable = _one_input_per_row
    source_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"), ("test", "test"))
    train_references: Callable | None = None  # SFT's references, where the reference's SFT datapool differs

    def source_split(self, split: str) -> str:
        """The split of the hub dataset (or local copy) that our `split` is carved from."""
        mapping = dict(self.source_splits)
        if split not in mapping:
            raise ValueError(f"unknown split {split!r}; allowed: {list(mapping)}")
        return mapping[split]


GRUE_TASKS: dict[str, GrueTask] = {
    "narrative_qa": GrueTask("deepmind/narrativeqa", None, ("document", "question", "answers"), _narrative_qa),
    "totto": GrueTask("google-research-datasets/totto", None,
                      ("table", "highlighted_cells", "table_page_title", "table_section_title",
                       "sentence_annotations"), _totto),
    "common_gen": GrueTask("GEM/common_gen", None, ("concepts", "target"), _common_gen),
    "iwslt2017": GrueTask("IWSLT/iwslt2017", "iwslt2017-de-en", ("translation",), _iwslt2017),
    "cnn_daily_mail": GrueTask("abisee/cnn_dailymail", "3.0.0", ("article", "highlights"), _cnn_daily_mail),
    "daily_dialog": GrueTask("li2017dailydialog/daily_dialog", None, ("dialog",), _daily_dialog,
                             _daily_dialog_index),
    "imdb": GrueTask("stanfordnlp/imdb", None, ("text", "label"), _imdb, _imdb_index,
                     (("train", "train"), ("validation", "train"), ("test", "test")), _imdb_train_references),
}

# tokenizer.truncation_side of the reference's extract_samples/*.yml and
# training/*/*_supervised.yml configs: how extraction and SFT cut a long prompt
# (utils_supervised.py generate(); tokenize_causal / tokenize_seq2seq).
REFERENCE_TRUNCATION_SIDE: dict[str, str] = {
    "narrative_qa": "right", "totto": "right", "common_gen": "right", "iwslt2017": "right",
    "cnn_daily_mail": "right", "daily_dialog": "right", "imdb": "left",
}

# env.args.prompt_truncation_side of the reference's PPO / NLPO configs
# (training/*/*_ppo*.yml, *_nlpo*.yml): how the RL environment cuts a long
# prompt (observation.py init_from_sample). env.py's default is "left"; the T5
# configs set "right" except ToTTo's, which leave the default.
PPO_PROMPT_TRUNCATION_SIDE: dict[str, str] = {
    "narrative_qa": "right", "totto": "left", "common_gen": "right", "iwslt2017": "right",
    "cnn_daily_mail": "right", "daily_dialog": "left", "imdb": "left",
}


# The reward each task is finetuned with in the paper (RL4LMs reward ids in
# brackets), as (name in workloads.rewards, arguments).
DEFAULT_REWARDS: dict[str, tuple[str, dict]] = {
    "narrative_qa": ("rouge_l_max", {}),  # [rouge_l_max, stemming, alpha 0.5, 100-word limit]
    "totto": ("sacrebleu", {}),  # [sacre_bleu, default 13a tokenizer]
    "common_gen": ("meteor", {}),
    "iwslt2017": ("sacrebleu", {"tokenize": "intl"}),
    "cnn_daily_mail": ("meteor", {}),
    "daily_dialog": ("meteor", {}),
    "imdb": ("learned", {"model": "lvwerra/distilbert-imdb", "label_index": 1, "batch_size": 100}),
}


# --------------------------------------------------------------------------
# the task, as workloads/text/tasks.py registers it
# --------------------------------------------------------------------------

NAMES = tuple(GRUE_TASKS)


class GrueTextTask(Task):
    def __init__(self, name: str, options):
        super().__init__(name, options)
        self.spec = GRUE_TASKS[name]
        self.default_reward, self.default_reward_args = DEFAULT_REWARDS[name]
        self.dataset_path = options.dataset_path

    def check_data(self) -> None:
        check_dataset_available(self.name, self.spec.hub_id, self.dataset_path)

    def examples(self, split: str, indices: list[int]) -> list[TextExample]:
        table, keys = _split_inputs(self.name, split, self.dataset_path)
        examples = []
        for index in indices:
            if not 0 <= index < len(keys):
                raise IndexError(f"input {index} out of range for split {split!r} of {self.name!r} ({len(keys)} inputs)")
            prompt, references = self.spec.build(table, keys[index])
            train_references = (tuple(self.spec.train_references(table, keys[index]))
                                if self.spec.train_references else None)
            examples.append(TextExample(index, prompt, (train_references or references)[0], tuple(references),
                                        train_references))
        return examples

    def split_size(self, split: str) -> int:
        return len(_split_inputs(self.name, split, self.dataset_path)[1])

    def choose_inputs(self, split: str, num_inputs: int, seed: int) -> list[int]:
        """The reference extraction's choice: the first `num_inputs` of a
        numpy RandomState(seed) permutation of the split (paper: seed 7)."""
        size = self.split_size(split)
        if num_inputs > size:
            raise ValueError(f"asked for {num_inputs} inputs but split {split!r} of {self.name!r} has {size}")
        return np.random.RandomState(seed).permutation(size)[:num_inputs].tolist()

    def reference_truncation_side(self, encoder_decoder: bool, stage: str) -> str:
        table = PPO_PROMPT_TRUNCATION_SIDE if stage == "ppo" else REFERENCE_TRUNCATION_SIDE
        return table[self.name]


def make_task(name: str, options) -> GrueTextTask:
    return GrueTextTask(name, options)


@functools.lru_cache(maxsize=32)
def _split_inputs(task: str, split: str, dataset_path: str | None):
    """(table, one key per input) of a split, loaded once per process."""
    spec = GRUE_TASKS[task]
    table = load_table(task, spec.source_split(split), dataset_path)
    missing = [c for c in spec.columns if c not in table.column_names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise DatasetNotAvailableError(
            f"the {task!r} data ({dataset_path or spec.hub_id}, split {split!r}) lacks columns {missing}; "
            f"it has {table.column_names}. A local copy needs the hub dataset's columns {list(spec.columns)}."
        )
    return table, spec.index(table, split)


OPTIONAL_COLUMNS: set[str] = set()


# --------------------------------------------------------------------------
# loading: a local copy or the hub (offline-aware)
# --------------------------------------------------------------------------

def load_table(task: str, split: str, dataset_path: str | None = None):
    """One split of the task's dataset as a `datasets.Dataset`."""
    if dataset_path:
        return _load_local(task, split, dataset_path)
    return _load_from_hub(task, split)


def _load_local(task: str, split: str, path: str):
    try:
        table = load_local_split(path, split)
    except DatasetNotAvailableError as error:
        raise DatasetNotAvailableError(f"{error} (task {task!r})") from error
    if table is None:
        raise DatasetNotAvailableError(
            f"no {split!r} split of task {task!r} in dataset_path {path!r}: expected a save_to_disk directory "
            f"or files {split}.parquet / {split}.jsonl / {split}.json / {split}.csv "
            f"with the columns {list(GRUE_TASKS[task].columns)}"
        )
    return table


def _load_from_hub(task: str, split: str):
    spec = GRUE_TASKS[task]
    name = spec.hub_id + (f" ({spec.hub_config})" if spec.hub_config else "")
    how_to_fix = (
        f"Point the config's `dataset_path` at a local copy: a directory saved with "
        f"load_dataset({spec.hub_id!r}{', ' + repr(spec.hub_config) if spec.hub_config else ''}).save_to_disk(path), "
        f"or {split}.parquet / {split}.jsonl / {split}.csv files with its columns {list(spec.columns)}; "
        f"or set HF_DATASETS_OFFLINE=1 to read a copy in the Hugging Face cache."
    )
    if not hub_offline_mode() and not hub_is_reachable():
        raise DatasetNotAvailableError(
            f"dataset {name} of task {task!r} is not available: the Hugging Face hub "
            f"({hub_endpoint()}) is unreachable. {how_to_fix}"
        )
    import datasets

    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
    except Exception as error:  # the library raises many types: connection, file-not-found, script errors
        raise DatasetNotAvailableError(
            f"dataset {name} of task {task!r} could not be loaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). {how_to_fix}"
        ) from error


# --------------------------------------------------------------------------
# helpers: nested hub columns, ToTTo's table linearization
# --------------------------------------------------------------------------

def _records(column) -> list[dict]:
    """A list of records whatever the storage: the hub's `datasets` sequences of
    structs come back as a dict of lists, parquet/json files as a list of dicts."""
    if isinstance(column, dict):
        keys = list(column)
        return [dict(zip(keys, values)) for values in zip(*(column[k] for k in keys))]
    return list(column)


def _highlighted_cells_with_headers(table: list[list[dict]], highlighted: list) -> list[tuple[dict, list, list]]:
    """ToTTo's baseline preprocessing: each highlighted cell with the header
    cells found by its heuristics -- row headers are header cells left of it in
    its row; column headers are header cells of earlier rows whose column span
    (counting multi-column cells) overlaps its own."""
    spans = []  # per row: [start, end) of each cell in real columns
    for row in table:
        start, row_spans = 0, []
        for cell in row:
            row_spans.append((start, start + cell["column_span"]))
            start += cell["column_span"]
        spans.append(row_spans)
    result = []
    for row_index, col_index in highlighted:
        row = table[row_index]
        row_headers = [cell for cell in row[:col_index] if cell["is_header"]]
        start, end = spans[row_index][col_index]
        col_headers = [cell for r in range(row_index) for cell, (s, e) in zip(table[r], spans[r])
                       if s < end and e > start and cell["is_header"]]
        result.append((row[col_index], row_headers, col_headers))
    return result


def _linearize(cells: list[tuple[dict, list, list]], page_title: str | None, section_title: str | None) -> str:
    text = ""
    if page_title:
        text += f"<page_title> {page_title} </page_title> "
    if section_title:
        text += f"<section_title> {section_title} </section_title> "
    text += "<table> "
    for cell, row_headers, col_headers in cells:
        text += f"<cell> {cell['value']} "
        text += "".join(f"<col_header> {h['value']} </col_header> " for h in col_headers)
        text += "".join(f"<row_header> {h['value']} </row_header> " for h in row_headers)
        text += "</cell> "
    return text + "</table>"
