"""GRUE task loaders on small local copies written here with the hub datasets'
columns: prompt formats, references, split carving (IMDB), grouping
(CommonGen), context windows (DailyDialog), local-copy formats, the offline
error; then extract and SFT running on a GRUE task with a tiny model."""

import glob
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workloads.core import availability
from workloads.text import grue, tasks


def _task(name: str, path: str | None = None):
    return tasks.task_named(name, tasks.TaskOptions(dataset_path=path))


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def cell(value, header=False, span=1):
    return {"value": value, "is_header": header, "column_span": span, "row_span": 1}


# ---------------------------------------------------------------- one local copy per task

def narrative_qa_row(question, summary, answers):
    return {"document": {"id": "d", "kind": "movie", "summary": {"text": summary, "title": "t"}, "text": "..."},
            "question": {"text": question, "tokens": question.split()},
            "answers": [{"text": a, "tokens": a.split()} for a in answers]}


TOTTO_ROW = {
    "table_page_title": "Page", "table_section_title": "Films",
    "table": [[cell("Year", True), cell("Title", True, span=2)],
              [cell("2001", True), cell("Film A"), cell("Lead")]],
    "highlighted_cells": [[1, 0], [1, 2]],
    # the hub's `datasets` form of a sequence of structs: a dict of lists
    "sentence_annotations": {"original_sentence": ["o1", "o2"], "sentence_after_deletion": ["d1", "d2"],
                             "sentence_after_ambiguity": ["a1", "a2"],
                             "final_sentence": ["In 2001 they had the lead.", "The lead came in 2001."]},
}
TOTTO_CELLS = ("<table> <cell> 2001 <col_header> Year </col_header> </cell> "
               "<cell> Lead <col_header> Title </col_header> <row_header> 2001 </row_header> </cell> </table>")

DIALOG = [f"turn {i} . " for i in range(7)]


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("grue")
    paths = {task: str(root / task) for task in grue.GRUE_TASKS}
    write_jsonl(f"{paths['narrative_qa']}/train.jsonl", [
        narrative_qa_row("Who is Mark?", "Mark is a student.\nHe runs a radio show.", [" A Student ", "a DJ"])])
    write_jsonl(f"{paths['totto']}/train.jsonl", [TOTTO_ROW])
    write_jsonl(f"{paths['totto']}/test.jsonl", [{**TOTTO_ROW, "sentence_annotations": {
        k: [] for k in TOTTO_ROW["sentence_annotations"]}}])
    common_gen_train = [
        {"gem_id": "a", "concept_set_id": 0, "concepts": ["dog", "frisbee", "catch"],
         "target": "the dog catches a frisbee", "references": []},
        {"gem_id": "b", "concept_set_id": 1, "concepts": ["sun", "rise"], "target": "the sun rises", "references": []},
        {"gem_id": "c", "concept_set_id": 0, "concepts": ["dog", "frisbee", "catch"],
         "target": "a dog jumps to catch a frisbee", "references": []},
        {"gem_id": "d", "concept_set_id": 2, "concepts": ["cat", "sleep"], "target": "a cat is sleeping",
         "references": []},
        {"gem_id": "e", "concept_set_id": 3, "concepts": ["tree", "fall"], "target": "the tree falls",
         "references": []},
        {"gem_id": "f", "concept_set_id": 4, "concepts": ["boy", "read"], "target": "a boy reads", "references": []},
    ]
    write_parquet(f"{paths['common_gen']}/train.parquet", common_gen_train)
    write_parquet(f"{paths['common_gen']}/validation.parquet", [
        {"gem_id": "v", "concept_set_id": 9, "concepts": ["car", "drive"], "target": "he drives a car",
         "references": ["he drives a car", "she drives the car"]}])
    write_parquet(f"{paths['common_gen']}/test.parquet", [
        {"gem_id": "t", "concept_set_id": 10, "concepts": ["ski", "slope"], "target": "", "references": []}])
    write_parquet(f"{paths['iwslt2017']}/train.parquet", [
        {"translation": {"de": "danke schön .", "en": "thank you ."}},
        {"translation": {"de": "guten morgen , welt .", "en": "good morning , world ."}},
        {"translation": {"de": "das ist gut .", "en": "that is good ."}},
        {"translation": {"de": "ich bin hier .", "en": "i am here ."}}])
    os.makedirs(paths["cnn_daily_mail"])
    with open(f"{paths['cnn_daily_mail']}/train.csv", "w") as f:  # flat columns: csv works too
        f.write('article,highlights,id\n"The mayor spoke, at length.","Mayor spoke.",x1\n')
    write_jsonl(f"{paths['daily_dialog']}/train.jsonl", [
        {"dialog": DIALOG, "act": [1] * 7, "emotion": [0] * 7},
        {"dialog": DIALOG[:5], "act": [1] * 5, "emotion": [0] * 5}])  # too short for a context of 5
    reviews = [{"text": f"review {i} is a b c d e f", "label": i % 2} for i in range(10)]
    write_parquet(f"{paths['imdb']}/train.parquet", reviews)
    write_parquet(f"{paths['imdb']}/test.parquet", reviews[:3])
    return paths


def examples(task, split, path):
    task = _task(task, path)
    return task.examples(split, list(range(task.split_size(split))))


# ---------------------------------------------------------------- prompt formats and references

def test_narrative_qa_question_then_summary_lowercased_with_all_answers(local_copies):
    [ex] = examples("narrative_qa", "train", local_copies["narrative_qa"])
    assert ex.source == "who is mark? \\n mark is a student. he runs a radio show."
    assert ex.references == ("a student", "a dj") and ex.target == "a student"
    assert _task("narrative_qa").prompt_text(ex, True) == ex.source


def test_totto_subtable_without_then_with_titles_and_all_final_sentences(local_copies):
    [ex] = examples("totto", "train", local_copies["totto"])
    titles = "<page_title> Page </page_title> <section_title> Films </section_title> "
    assert ex.source == TOTTO_CELLS + titles + TOTTO_CELLS
    assert ex.references == ("In 2001 they had the lead.", "The lead came in 2001.")
    [test_ex] = examples("totto", "test", local_copies["totto"])
    assert test_ex.references == ("",)  # the test split has no references


def test_common_gen_one_input_per_row_with_its_single_target(local_copies):
    # custom_text_generation_pools.py CommonGen.prepare: a sample per hub row, references = [target]
    train = examples("common_gen", "train", local_copies["common_gen"])
    assert len(train) == 6  # six rows (concept set 0 twice): six inputs
    assert train[0].source == train[2].source == "generate a sentence with: dog frisbee catch."
    assert train[0].references == ("the dog catches a frisbee",)
    assert train[2].references == ("a dog jumps to catch a frisbee",)
    [val] = examples("common_gen", "validation", local_copies["common_gen"])
    assert val.references == ("he drives a car",)  # the row's `references` column is not used
    [test] = examples("common_gen", "test", local_copies["common_gen"])
    assert test.references == ("empty reference",)  # RL4LMs' stand-in for an empty target


def test_iwslt2017_and_cnn_daily_mail_prefixes(local_copies):
    ex = examples("iwslt2017", "train", local_copies["iwslt2017"])[0]
    assert (ex.source, ex.references) == ("translate English to German: thank you .", ("danke schön .",))
    [ex] = examples("cnn_daily_mail", "train", local_copies["cnn_daily_mail"])
    assert (ex.source, ex.references) == ("Summarize: The mayor spoke, at length.", ("Mayor spoke.",))


def test_daily_dialog_context_of_five_turns(local_copies):
    first, second = examples("daily_dialog", "train", local_copies["daily_dialog"])  # turns 5 and 6
    assert first.source == "<EOU>".join(DIALOG[0:5]) + " <EOU>"
    assert first.references == (DIALOG[5] + "<EOU>",)
    assert second.source == "<EOU>".join(DIALOG[1:6]) + " <EOU>"


def test_daily_dialog_truncation_side_right_in_extraction_and_sft_left_in_ppo(local_copies):
    from workloads.text.models import encode_prompts
    from workloads.text.tokenizer import build_char_tokenizer

    # tokenizer.truncation_side of gpt2_dialog_extract_samples.yml / gpt2_supervised.yml: right;
    # env.py forces "left" for the PPO environment
    assert _task("daily_dialog").truncation_side("task", False, "extract") == "right"
    assert _task("daily_dialog").truncation_side("task", False, "sft") == "right"
    assert _task("daily_dialog").truncation_side("task", False, "ppo") == "left"
    assert _task("imdb").truncation_side("task", False, "sft") == "left"
    assert _task("totto").truncation_side("task", True, "ppo") == "left"  # t5_ppo.yml leaves env.py's default
    assert _task("reverse").truncation_side("task", False) == "left"
    assert _task("daily_dialog").truncation_side("left", False, "sft") == "left"
    with pytest.raises(ValueError, match="truncation_side='middle'; allowed"):
        _task("daily_dialog").truncation_side("middle", False)
    first, _ = examples("daily_dialog", "train", local_copies["daily_dialog"])
    tok = build_char_tokenizer()
    [right] = encode_prompts(tok, [first.source], 10, False, truncation_side="right")
    [left] = encode_prompts(tok, [first.source], 10, False, truncation_side="left")
    ids = tok(first.source, add_special_tokens=False)["input_ids"]
    assert len(ids) > 10 and right == ids[:10] and left == ids[-10:]  # right keeps the context's beginning


def test_t5_prompts_keep_their_closing_eos_when_cut():
    from tokenizers import processors

    from workloads.text.models import encode_prompts
    from workloads.text.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()  # with T5's post-processor "$A </s>", as t5-base's tokenizer has
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 2)])
    eos = tok.eos_token_id
    assert encode_prompts(tok, ["abcdef", "ab"], 4, True) == [tok("abc", add_special_tokens=False)["input_ids"] +
                                                               [eos], tok("ab", add_special_tokens=False)["input_ids"]
                                                               + [eos]]
    assert tok.truncation_side == "right"  # the tokenizer's own setting is left as it was


def test_imdb_seed_42_split_positive_train_and_half_prompt(local_copies):
    import datasets

    path = local_copies["imdb"]
    shuffled = datasets.Dataset.from_parquet(f"{path}/train.parquet").shuffle(seed=42)["text"]
    train, validation = examples("imdb", "train", path), examples("imdb", "validation", path)
    full = [f"{ex.source} {ex.target}" for ex in train + validation]
    # train = positive reviews of the first 80% of datasets' seed-42 shuffle, validation = the rest
    assert full == [t for t in shuffled[:8] if int(t.split()[1]) % 2 == 1] + shuffled[8:]
    assert train[0].source == " ".join(train[0].source.split(" ")) and len(train[0].source.split(" ")) == 4
    # IMDB.prepare: the reference is the full review; IMDBForSeq2Seq (SFT): the second half
    review = f"{train[0].source} {train[0].target}"
    assert train[0].references == (review,) and train[0].train_references == (train[0].target,)
    assert _task("imdb").train_references(train[0]) == [train[0].target]
    assert len(examples("imdb", "test", path)) == 3


def test_save_to_disk_copy_and_choose_inputs(tmp_path, local_copies):
    import datasets
    import numpy as np

    rows = [{"translation": {"de": f"satz {i}", "en": f"sentence {i}"}} for i in range(20)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    path = str(tmp_path / "saved")
    chosen = _task("iwslt2017", path).choose_inputs("train", 5, 7)
    assert chosen == np.random.RandomState(7).permutation(20)[:5].tolist()  # the reference's choice
    [ex] = _task("iwslt2017", path).examples("train", [chosen[0]])
    assert ex.source == f"translate English to German: sentence {chosen[0]}" and ex.input_id == chosen[0]


def test_default_rewards():
    assert {t: _task(t).default_reward for t in grue.GRUE_TASKS} == {
        "narrative_qa": "rouge_l_max", "totto": "sacrebleu", "common_gen": "meteor", "iwslt2017": "sacrebleu",
        "cnn_daily_mail": "meteor", "daily_dialog": "meteor", "imdb": "learned"}
    assert _task("iwslt2017").resolve_reward() == ("sacrebleu", {"tokenize": "intl"})
    assert _task("imdb").resolve_reward()[1]["model"] == "lvwerra/distilbert-imdb"
    assert _task("imdb").resolve_reward("rouge_l_max", {"alpha": 0.3}) == ("rouge_l_max", {"alpha": 0.3})


# ---------------------------------------------------------------- errors

def test_missing_local_split_and_missing_columns_are_named(tmp_path, local_copies):
    with pytest.raises(grue.DatasetNotAvailableError, match=r"no 'validation' split of task 'iwslt2017'.*parquet"):
        _task("iwslt2017", local_copies["iwslt2017"]).split_size("validation")
    write_parquet(f"{tmp_path}/train.parquet", [{"text": "x"}])
    with pytest.raises(grue.DatasetNotAvailableError, match=r"lacks columns \['translation'\]"):
        _task("iwslt2017", str(tmp_path)).split_size("train")


def test_unreachable_hub_fails_fast_and_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    availability.hub_is_reachable.cache_clear()
    started = time.perf_counter()
    with pytest.raises(grue.DatasetNotAvailableError) as error:
        _task("cnn_daily_mail").split_size("train")
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert "abisee/cnn_dailymail (3.0.0)" in message and "unreachable" in message and "dataset_path" in message
    availability.hub_is_reachable.cache_clear()


# ---------------------------------------------------------------- workloads on a GRUE task

def test_extract_on_common_gen_with_a_configured_reward(tmp_path, local_copies):
    from workloads.text.extract_config import ExtractConfig
    from workloads.core.context import local_context
    from workloads.text.extract import run_extract

    config = ExtractConfig.model_validate(dict(
        model="builtin:tiny-t5", task="common_gen", dataset_path=local_copies["common_gen"], reward="rouge_l_max",
        num_inputs=5, num_samples_per_input=3, batch_size=4, shard_size=4, generation={"max_new_tokens": 6}))
    summary = run_extract(config, local_context(str(tmp_path), show_progress=False))
    samples = pq.read_table(tmp_path / "local" / "samples").to_pandas()
    assert summary["num_inputs"] == 5 and len(samples) == 5 * 3
    assert set(samples.prompt.str.slice(0, 26)) == {"generate a sentence with: "}
    assert set(dict(samples.reward_components.iloc[0])) == {"rouge_l_f", "rouge_l_precision", "rouge_l_recall"}
    assert (samples.reward == samples.reward_components.map(lambda c: dict(c)["rouge_l_f"])).all()


def test_extract_iwslt_default_reward_is_sacrebleu_intl(tmp_path, local_copies):
    from sacrebleu.metrics import BLEU

    from workloads.text.extract_config import ExtractConfig
    from workloads.core.context import local_context
    from workloads.text.extract import run_extract

    config = ExtractConfig.model_validate(dict(
        model="builtin:tiny-gpt2", task="iwslt2017", dataset_path=local_copies["iwslt2017"], num_inputs=4,
        num_samples_per_input=2, compute_grad_norm=False, generation={"max_new_tokens": 8}))
    run_extract(config, local_context(str(tmp_path), show_progress=False))
    samples = pq.read_table(tmp_path / "local" / "samples").to_pandas()
    german = {ex.source: ex.references[0] for ex in examples("iwslt2017", "train", local_copies["iwslt2017"])}
    intl = BLEU(tokenize="intl", smooth_method="exp", effective_order=False)
    for row in samples.itertuples():
        assert row.reward == pytest.approx(intl.corpus_score([row.output], [[german[row.prompt]]]).score / 100)


def test_sft_on_common_gen_evaluates_with_the_configured_reward(tmp_path, local_copies):
    from workloads.text.sft_config import SFTConfig
    from workloads.core.context import local_context
    from workloads.text.sft import run_sft

    config = SFTConfig.model_validate(dict(
        model="builtin:tiny-t5", task="common_gen", dataset_path=local_copies["common_gen"], reward="rouge_l_max",
        max_steps=2, batch_size=2, log_every_steps=1))
    metrics = run_sft(config, local_context(str(tmp_path), show_progress=False))
    assert metrics["num_train_inputs_used"] == 6 and metrics["step"] == 2
    assert 0 <= metrics["eval_rouge_l_f_mean"] <= 1 and metrics["eval_reward_mean"] == metrics["eval_rouge_l_f_mean"]


# ---------------------------------------------------------------- the GRUE sweep files

@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "search_spaces",
                                                               "grue_*.yaml"))), ids=os.path.basename)
def test_grue_sweep_files_validate_or_name_the_missing_reward_data(path):
    """Every stage validates here, except where the task's reward cannot run
    offline (the IMDB classifier off the hub): then the spec error says exactly
    that. METEOR's WordNet is prepared by the project's set-up (README), so the
    three METEOR sweeps must validate."""
    from orchestrator.spec import SpecError, load_spec
    from workloads.core.availability import hub_assumed_reachable

    try:
        with hub_assumed_reachable():  # t5-base and the datasets are the cluster's to fetch (test_spec checks offline)
            spec, _ = load_spec(path)
    except SpecError as error:
        assert "model 'lvwerra/distilbert-imdb' is not available" in str(error), str(error)
        return
    assert {stage.workload for stage in spec.stages} <= {"extract", "sft", "ppo"}
