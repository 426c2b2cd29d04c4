"""Rewards pinned to values computed by hand on fixed strings, the learned
reward against a manual forward pass of a tiny classifier saved locally, and
the errors the configs raise at validation when a reward cannot run here."""

import math
import os
import subprocess
import sys

import pydantic
import pytest

from workloads.core import availability
from workloads.text import grue
from workloads.text.extract_config import ExtractConfig
from workloads.text.sft_config import SFTConfig
from workloads.text.rewards import RewardNotAvailableError, check_reward_available, get_reward


def values(reward_fn, outputs, references, prompts=None):
    return [r.value for r in reward_fn(prompts or [""] * len(outputs), outputs, references)]


# ---------------------------------------------------------------- ROUGE-L

def test_rouge_l_hand_computed():
    rouge = get_reward("rouge_l_max")
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = F = 5/6
    # LCS("the cat", "the black cat sat") = 2: P = 1, R = 1/2, F = 2PR/(P+R) = 2/3
    assert values(rouge, ["the cat sat on the mat", "the cat"],
                  [["the cat is on the mat"], "the black cat sat"]) == pytest.approx([5 / 6, 2 / 3])
    # max over references; case and punctuation do not count
    assert values(rouge, ["The Cat!"], [["a dog", "the cat", "cat"]]) == [1.0]
    assert values(rouge, ["zebra"], [["a dog"]]) == [0.0]


def test_rouge_l_stemming_alpha_and_length_limit():
    # stemmed: [dog, run] vs [the, dog, run]: LCS 2, P = 1, R = 2/3, F = 0.8
    # unstemmed: [dogs, running] vs [the, dogs, run]: LCS 1, P = 1/2, R = 1/3, F = 0.4
    assert values(get_reward("rouge_l_max"), ["dogs running"], [["the dogs run"]]) == pytest.approx([0.8])
    assert values(get_reward("rouge_l_max", stemming=False), ["dogs running"], [["the dogs run"]]) == \
        pytest.approx([0.4])
    # alpha = 1 weighs recall only: F = P R / R = P;  alpha = 0: F = R
    assert values(get_reward("rouge_l_max", alpha=1.0), ["the cat"], ["the black cat sat"]) == pytest.approx([1.0])
    assert values(get_reward("rouge_l_max", alpha=0.0), ["the cat"], ["the black cat sat"]) == pytest.approx([0.5])
    # only the first 2 words count: "a b" vs "a b": 1.0 although the output goes on
    assert values(get_reward("rouge_l_max", length_limit=2), ["a b x y z"], ["a b"]) == [1.0]


# ---------------------------------------------------------------- SacreBLEU

def test_sacrebleu_hand_computed():
    bleu = get_reward("sacrebleu")
    # "the cat sat on the mat" vs "the cat sat on a mat" (both 6 tokens, BP = 1):
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> geometric mean (1/12)^(1/4)
    [value] = values(bleu, ["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert value == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-9)
    # a shorter output: "the cat sat on" (4) vs reference of 6: precisions 1, BP = exp(1 - 6/4)
    [value] = values(bleu, ["the cat sat on"], ["the cat sat on a mat"])
    assert value == pytest.approx(math.exp(1 - 6 / 4), rel=1e-9)
    # several references: the matching one counts in full
    assert values(bleu, ["the cat sat on the mat"], [["entirely other words here now", "the cat sat on the mat"]]) \
        == pytest.approx([1.0])


def test_sacrebleu_tokenize_argument():
    # "intl" splits the German quotation marks off the word, 13a does not
    output, reference = "„Hallo“ sagte er heute", "„ Hallo “ sagte er heute"
    assert values(get_reward("sacrebleu", tokenize="intl"), [output], [reference]) == pytest.approx([1.0])
    assert values(get_reward("sacrebleu"), [output], [reference])[0] < 0.9


# ---------------------------------------------------------------- METEOR
# WordNet comes from the project's set-up (README test command): Debian's
# wordnet-base + wordnet-sense-index, prepared for NLTK by
# `python -m workloads.text.nltk_data`. These tests fail, not skip, without it.

def _require_meteor_data():
    try:
        check_reward_available("meteor")
    except RewardNotAvailableError as error:
        pytest.fail(f"METEOR data missing -- run the README's set-up: {error}")


def test_meteor_without_wordnet_fails_at_validation(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # an nltk_data search path with nothing in it
    with pytest.raises(pydantic.ValidationError, match=r"reward 'meteor' needs NLTK data \['wordnet'\]"):
        ExtractConfig.model_validate({"task": "common_gen"})  # common_gen's reward is METEOR
    with pytest.raises(pydantic.ValidationError, match="python -m workloads.text.nltk_data"):
        SFTConfig.model_validate({"task": "reverse", "reward": "meteor"})
    with pytest.raises(pydantic.ValidationError, match=r"needs NLTK data \['wordnet', 'punkt_tab'\]"):
        SFTConfig.model_validate({"task": "reverse", "reward": "meteor", "reward_args": {"tokenize": "word_tokenize"}})
    with pytest.raises(pydantic.ValidationError, match=r"tokenize='spacy'; allowed: \['auto', 'word_tokenize'"):
        SFTConfig.model_validate({"task": "reverse", "reward": "meteor", "reward_args": {"tokenize": "spacy"}})


def test_meteor_hand_computed_values():
    _require_meteor_data()
    meteor = get_reward("meteor")
    # P, R = matched fractions; F = PR / (0.9 P + 0.1 R); score = F (1 - 0.5 (chunks / matches)^3)
    cases = [
        # identical 6 words, one chunk: F = 1, penalty 0.5 (1/6)^3
        ("the cat sat on the mat", ["the cat sat on the mat"], 1 - 0.5 * (1 / 6) ** 3),
        # "kid" ~ "child" by WordNet synonym (without WordNet: 2 matches in 2 chunks, F = 2/3, score 1/3)
        ("the kid ran", ["the child ran"], 1 - 0.5 * (1 / 3) ** 3),
        # "cats" ~ "cat" by Porter stem; matching is case-insensitive
        ("The Cats ran", ["the cat ran"], 1 - 0.5 * (1 / 3) ** 3),
        # 2 of 3 matched, one chunk: P = R = 2/3, F = 2/3, penalty 0.5 (1/2)^3
        ("the cat slept", ["the cat sat"], 2 / 3 * (1 - 0.5 / 8)),
        # P = 1, R = 1/3: F = (1/3) / (0.9 + 0.1/3) = 5/14, one chunk of 2: penalty 1/16
        ("the cat", ["the cat sat on a mat"], 5 / 14 * 15 / 16),
        # swapped order: 2 matches in 2 chunks, penalty 0.5
        ("cat the", ["the cat"], 0.5),
        # max over references
        ("the cat slept", ["a dog", "the cat sat", "zebra"], 2 / 3 * (1 - 0.5 / 8)),
    ]
    got = values(meteor, [c[0] for c in cases], [c[1] for c in cases])
    assert got == pytest.approx([c[2] for c in cases], rel=1e-12)
    # the arguments reach the formula: alpha = 0.5 makes F the harmonic mean of P = 1, R = 1/3: 1/2
    assert values(get_reward("meteor", alpha=0.5), ["the cat"], ["the cat sat on a mat"]) == \
        pytest.approx([0.5 * 15 / 16])


# NLTK's own pinned outputs of nltk.word_tokenize (made with the punkt_tab English
# model): nltk/tokenize/__init__.py's module docstring and nltk/test/tokenize.doctest.
WORD_TOKENIZE_EXAMPLES = [
    ("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks.",
     ["Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy", "me", "two", "of", "them",
      ".", "Thanks", "."]),
    ("On a $50,000 mortgage of 30 years at 8 percent, the monthly payment would be $366.88.",
     ["On", "a", "$", "50,000", "mortgage", "of", "30", "years", "at", "8", "percent", ",", "the", "monthly",
      "payment", "would", "be", "$", "366.88", "."]),
    ("\"We beat some pretty good teams to get here,\" Slocum said.",
     ["``", "We", "beat", "some", "pretty", "good", "teams", "to", "get", "here", ",", "''", "Slocum", "said", "."]),
    ("Well, we couldn't have this predictable, cliche-ridden, \"Touched by an Angel\" (a show creator John Masius "
     "worked on) wanna-be if she didn't.",
     ["Well", ",", "we", "could", "n't", "have", "this", "predictable", ",", "cliche-ridden", ",", "``", "Touched",
      "by", "an", "Angel", "''", "(", "a", "show", "creator", "John", "Masius", "worked", "on", ")", "wanna-be", "if",
      "she", "did", "n't", "."]),
    ("I cannot cannot work under these conditions!", ["I", "can", "not", "can", "not", "work", "under", "these",
                                                      "conditions", "!"]),
    ("The company spent 40.75% of its income last year.",
     ["The", "company", "spent", "40.75", "%", "of", "its", "income", "last", "year", "."]),
    ("He arrived at 3:00 pm.", ["He", "arrived", "at", "3:00", "pm", "."]),
    ("There were 300,000, but that wasn't enough.",
     ["There", "were", "300,000", ",", "but", "that", "was", "n't", "enough", "."]),
    ("It's more'n enough.", ["It", "'s", "more", "'n", "enough", "."]),
]


@pytest.mark.parametrize("text,expected", WORD_TOKENIZE_EXAMPLES)
def test_meteor_tokens_match_word_tokenize(text, expected):
    from workloads.text.rewards import meteor_tokens, punkt_available

    assert meteor_tokens(text, "punkt_free") == expected
    if punkt_available():  # where punkt_tab is installed, auto is word_tokenize itself
        import nltk

        assert nltk.word_tokenize(text) == expected == meteor_tokens(text, "auto")


def test_word_tokenize_examples_are_nltks_own():
    """The expected tokens above are the installed NLTK's own pinned outputs, not made up here."""
    import os

    import nltk

    root = os.path.dirname(nltk.__file__)
    pinned = ""
    for path in (os.path.join(root, "tokenize", "__init__.py"), os.path.join(root, "test", "tokenize.doctest")):
        with open(path, encoding="utf-8") as f:
            pinned += " ".join(f.read().split())  # the doctests wrap long lists (NORMALIZE_WHITESPACE)
    for _, expected in WORD_TOKENIZE_EXAMPLES:
        assert repr(expected) in pinned


def test_meteor_tokens_without_punkt_differ_only_on_abbreviations():
    from workloads.text.rewards import meteor_tokens

    # the one documented difference: Punkt's English model knows "Mr." is an abbreviation
    assert meteor_tokens("Mr. Smith left. He slept.", "punkt_free") == ["Mr", ".", "Smith", "left", ".", "He",
                                                                         "slept", "."]
    assert meteor_tokens("hi<EOU>how are you ? <EOU>", "punkt_free") == ["hi", "<", "EOU", ">", "how", "are", "you",
                                                                          "?", "<", "EOU", ">"]


def test_wordnet_prepared_from_debian_packages(tmp_path):
    """python -m workloads.text.nltk_data builds a WordNet NLTK reads, with the 45 lexnames rows of lexnames(5WN)."""
    from workloads.text import nltk_data

    if not os.path.isfile(nltk_data.LEXNAMES_MAN_PAGE):
        pytest.fail(f"{nltk_data.LEXNAMES_MAN_PAGE} missing: apt-get install -y wordnet-base wordnet-sense-index")
    rows = nltk_data.lexnames_from_man_page()
    assert len(rows) == 45 and rows == list(enumerate(nltk_data.LEXICOGRAPHER_FILES))
    assert nltk_data.lexnames_text().splitlines()[18] == "18\tnoun.person\t1"
    assert nltk_data.main(["--dest", str(tmp_path)]) == 0
    assert nltk_data.check_wordnet(str(tmp_path)) == "3.0"
    assert sorted(os.listdir(tmp_path / "corpora" / "wordnet")) == sorted([*nltk_data.WORDNET_FILES, "lexnames"])
    assert nltk_data.main(["--dest", str(tmp_path / "x"), "--wordnet-dir", str(tmp_path / "nowhere")]) == 1


# ---------------------------------------------------------------- learned

@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A 2-label DistilBERT built from a config, saved with a word-level tokenizer."""
    import torch
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification

    path = tmp_path_factory.mktemp("classifier")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"this film was great awful and the plot".split()]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(words), dim=16, hidden_dim=32, n_layers=1, n_heads=2,
                              max_position_embeddings=12, num_labels=2)
    DistilBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def manual_probability(path, text, label):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tokenizer(text)["input_ids"]
    ids = ids[:1] + ids[1:-1][-10:] + ids[-1:]  # left truncation to the 12 positions: keep [CLS], the end, [SEP]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.softmax(logits, dim=-1)[label].item()


def test_learned_reward_is_the_classifier_probability(tiny_classifier):
    prompts = ["this film", "the plot", "this film was great and the plot was awful and"]
    outputs = [" was great", " was awful and awful", " great"]
    reward = get_reward("learned", {"model": tiny_classifier, "label_index": 1, "batch_size": 2})
    got = reward(prompts, outputs, [""] * 3)
    expected = [manual_probability(tiny_classifier, p + o, 1) for p, o in zip(prompts, outputs)]
    assert [r.value for r in got] == pytest.approx(expected, abs=1e-6)  # batched + padded == one by one
    assert got[0].components == {"label_1_probability": got[0].value}
    without_prompt = get_reward("learned", model=tiny_classifier, label_index=0, include_prompt=False)
    assert values(without_prompt, outputs[:1], [""], prompts[:1]) == \
        pytest.approx([manual_probability(tiny_classifier, outputs[0], 0)], abs=1e-6)


def test_learned_reward_validation(monkeypatch, tiny_classifier, tmp_path):
    # a local classifier validates; an unavailable hub id does not
    ExtractConfig.model_validate({"task": "imdb", "reward": "learned", "dataset_path": str(tmp_path),
                                  "reward_args": {"model": tiny_classifier, "label_index": 1}})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    availability.hub_is_reachable.cache_clear()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(pydantic.ValidationError,
                       match=r"model 'lvwerra/distilbert-imdb' is not available .* unreachable"):
        ExtractConfig.model_validate({"task": "imdb", "dataset_path": str(tmp_path)})  # default reward: lvwerra/distilbert-imdb
    availability.hub_is_reachable.cache_clear()
    with pytest.raises(pydantic.ValidationError, match="needs argument"):
        SFTConfig.model_validate({"task": "imdb", "reward": "learned", "dataset_path": str(tmp_path)})


# ---------------------------------------------------------------- names, arguments, torch-free validation

def test_unknown_rewards_and_arguments_are_named():
    with pytest.raises(RewardNotAvailableError, match=r"unknown reward 'bleurt'; registered: \["):
        get_reward("bleurt")
    with pytest.raises(RewardNotAvailableError, match=r"no argument\(s\) \['max_n'\]"):
        check_reward_available("rouge_l_max", {"max_n": 4})
    with pytest.raises(pydantic.ValidationError, match="unknown tokenize 'bogus'"):
        ExtractConfig.model_validate({"task": "iwslt2017", "reward": "sacrebleu", "reward_args": {"tokenize": "bogus"}})
    with pytest.raises(pydantic.ValidationError, match="unknown task 'squad'"):
        ExtractConfig.model_validate({"task": "squad"})


def test_validation_imports_no_torch():
    code = ("import sys; from workloads.text.extract_config import ExtractConfig; "
            "ExtractConfig.model_validate({'task': 'narrative_qa', 'dataset_path': '.'}); "
            "ExtractConfig.model_validate({'task': 'totto', 'dataset_path': '.', 'reward': 'sacrebleu', "
            "'reward_args': {'tokenize': 'intl'}}); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
