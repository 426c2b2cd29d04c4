"""The character tokenizer of the built-in models (builtin:tiny-gpt2, builtin:tiny-t5).

Built locally, so the built-in models need no hub. One token per character of
VOCAB_CHARS (the `reverse` task's alphabet plus plain punctuation).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Characters the tokenizer knows: the task's alphabet plus enough of plain text
# that a prompt with other characters still tokenizes (anything else is <unk>).
VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?'\"-=()"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus <pad>=0, <bos>=1, <eos>=2, <unk>=3.

    No special tokens are added automatically: the workloads append EOS to
    targets themselves, so causal and seq2seq code see exactly the ids they build.
    """
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK])}
    for char in VOCAB_CHARS:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char alone
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
