"""Prepare the NLTK data METEOR needs, offline, from Debian's WordNet packages.

METEOR (the reward of CommonGen, CNN/DailyMail and DailyDialog) matches words
by WordNet synonym, which NLTK reads from `<nltk_data>/corpora/wordnet/`.
NLTK's downloader needs network access; Debian's `wordnet-base` and
`wordnet-sense-index` packages install the same WordNet 3.0 database under
/usr/share/wordnet. NLTK's corpus reader wants 15 files there
(`WordNetCorpusReader._FILES`); the packages hold 14 of them and lack
`lexnames`, the table of the 45 lexicographer files whose rows the
lexnames(5WN) man page of those packages lists. This module copies the 14
files and writes `lexnames`:

    apt-get install -y wordnet-base wordnet-sense-index
    python -m workloads.text.nltk_data            # -> ~/nltk_data (NLTK's first search path)
    python -m workloads.text.nltk_data --dest DIR # -> DIR; then export NLTK_DATA=DIR

NLTK's path checks refuse symbolic links that leave its data directory and
multiply-linked files, so the files are copied (about 35 MB).
The punkt sentence model that `nltk.word_tokenize` uses is not packaged by
Debian; see workloads/text/rewards.py (`meteor_tokens`) for how METEOR
tokenises without it.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys

DEBIAN_WORDNET_DIR = "/usr/share/wordnet"
LEXNAMES_MAN_PAGE = "/usr/share/man/man5/lexnames.5WN.gz"
DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")

# The files NLTK's WordNetCorpusReader opens (nltk/corpus/reader/wordnet.py, _FILES), less lexnames.
WORDNET_FILES = ("cntlist.rev", "index.sense", "index.adj", "index.adv", "index.noun", "index.verb",
                 "data.adj", "data.adv", "data.noun", "data.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc")

# lexnames(5WN), WordNet 3.0: file number, lexicographer file, syntactic category
# (1 noun, 2 verb, 3 adjective, 4 adverb). NLTK reads the first two columns and
# asserts that the numbers count up from 0.
LEXICOGRAPHER_FILES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def lexnames_text() -> str:
    """The `lexnames` file: 45 tab-separated rows `NN<TAB>name<TAB>category`."""
    return "".join(f"{i:02d}\t{name}\t{CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXICOGRAPHER_FILES))


def lexnames_from_man_page(path: str = LEXNAMES_MAN_PAGE) -> list[tuple[int, str]]:
    """(number, name) rows of the table in the installed lexnames(5WN) man page."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        rows = [re.match(r"^(\d\d)\t(\S+)", line) for line in f]
    return [(int(m.group(1)), m.group(2)) for m in rows if m]


def default_destination() -> str:
    """Where NLTK looks first: the first NLTK_DATA entry if set, else ~/nltk_data."""
    configured = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    return configured[0] if configured else os.path.join(os.path.expanduser("~"), "nltk_data")


def prepare_wordnet(dest: str | None = None, wordnet_dir: str = DEBIAN_WORDNET_DIR) -> str:
    """Build `<dest>/corpora/wordnet` from the Debian WordNet files; returns that directory.

    Raises FileNotFoundError naming the missing files and the packages that hold them."""
    dest = dest or default_destination()
    missing = [f for f in WORDNET_FILES if not os.path.isfile(os.path.join(wordnet_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"WordNet files {missing} not found in {wordnet_dir}: install them with "
            f"`apt-get install -y {' '.join(DEBIAN_PACKAGES)}` (Debian/Ubuntu), or pass --wordnet-dir")
    target = os.path.join(dest, "corpora", "wordnet")
    os.makedirs(target, exist_ok=True)
    for name in WORDNET_FILES:
        copy = os.path.join(target, name)
        if os.path.lexists(copy):
            os.remove(copy)
        shutil.copyfile(os.path.join(wordnet_dir, name), copy)
    with open(os.path.join(target, "lexnames"), "w", encoding="utf-8") as f:
        f.write(lexnames_text())
    return target


def check_wordnet(dest: str) -> str:
    """Load WordNet from `dest` the way METEOR does and return its version ('3.0')."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    import warnings

    added = dest not in nltk.data.path
    if added:  # NLTK's path checks only open corpora under its search path
        nltk.data.path.insert(0, dest)
    try:
        with warnings.catch_warnings():  # "multilingual functions are not available": METEOR needs English only
            warnings.simplefilter("ignore")
            reader = WordNetCorpusReader(nltk.data.find("corpora/wordnet", paths=[dest]), None)
            if not reader.synsets("dog"):  # data files open lazily: still under the search path
                raise RuntimeError(f"WordNet in {dest} loads but finds no synset for 'dog'")
            return reader.get_version()
    finally:
        if added:
            nltk.data.path.remove(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.text.nltk_data", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default=None, help="nltk_data directory to fill (default: first NLTK_DATA "
                                                      "entry, else ~/nltk_data)")
    parser.add_argument("--wordnet-dir", default=DEBIAN_WORDNET_DIR, help="where the WordNet 3.0 database files are")
    args = parser.parse_args(argv)
    dest = args.dest or default_destination()
    try:
        target = prepare_wordnet(dest, args.wordnet_dir)
        version = check_wordnet(dest)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"[rlgrad] {error}", file=sys.stderr)
        return 1
    print(f"[rlgrad] WordNet {version} for NLTK prepared in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
