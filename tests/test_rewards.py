"""Rewards pinned to values computed by hand on fixed strings, the learned
reward against a manual forward pass of a tiny classifier saved locally, and
the errors the configs raise at validation when a reward cannot run here."""

import math
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

def _meteor_data_installed() -> bool:
    try:
        check_reward_available("meteor")
        return True
    except RewardNotAvailableError:
        return False


def test_meteor_without_wordnet_fails_at_validation(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # an nltk_data search path with nothing in it
    with pytest.raises(pydantic.ValidationError, match=r"reward 'meteor' needs NLTK data \['wordnet', 'punkt_tab'\]"):
        ExtractConfig.model_validate({"task": "common_gen"})  # common_gen's reward is METEOR
    with pytest.raises(pydantic.ValidationError, match="nltk.downloader wordnet punkt_tab"):
        SFTConfig.model_validate({"task": "reverse", "reward": "meteor"})


@pytest.mark.skipif(not _meteor_data_installed(), reason="NLTK WordNet/punkt_tab data not installed here (offline)")
def test_meteor_values_when_wordnet_is_installed():
    meteor = get_reward("meteor")
    # identical 6 words, one chunk: F_mean = 1, penalty = 0.5 * (1/6)^3
    assert values(meteor, ["the cat sat on the mat"], [["the cat sat on the mat"]]) == \
        pytest.approx([1 - 0.5 * (1 / 6) ** 3])


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
