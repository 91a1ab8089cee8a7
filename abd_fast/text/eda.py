"""EDA (Wei & Zou, 2019): easy data augmentation of captions, as CleanCLIP and ABD use it.

Four operations, one chosen at random per caption per draw: synonym replacement (SR),
random insertion (RI), random swap (RS), each touching n = max(1, int(alpha * words)) words,
and random deletion (RD) of each word with probability p; alpha = p = 0.1. Synonyms come
from WordNet through NLTK; stop words are never replaced nor used for insertion. The
caption is first normalized as in the reference code (lower case, letters and spaces).

    eda = EDA(seed=0)
    eda("a photo of a small red star.")             # a fresh draw on every call
    eda("a photo of a small red star.", key=(epoch, sample_id))   # a function of the key

With `key`, the draw depends only on (seed, key): the same in every worker and rank, new in
every epoch; without it, the EDA object's own seeded stream advances call by call.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache

# The reference implementation's stop-word list (NLTK's English list, trimmed).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves what which who whom
this that these those am is are was were be been being have has had having do does did
doing a an the and but if or because as until while of at by for with about against between
into through during before after above below to from up down in out on off over under again
further then once here there when where why how all any both each few more most other some
such no nor not only own same so than too very s t can will just don should now
""".split())

INSTALL_HINT = (
    "EDA needs NLTK's WordNet corpus, which was not found. Run scripts/setup.sh (it installs "
    "WordNet offline from the Debian packages wordnet-base and wordnet-sense-index into "
    "<venv>/nltk_data/corpora/wordnet), or, with network access, "
    "`python -m nltk.downloader wordnet` (or set NLTK_DATA to a folder that holds "
    "corpora/wordnet).")


def _wordnet():
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
    except (LookupError, OSError, ImportError) as e:
        raise RuntimeError(INSTALL_HINT) from e
    return wordnet


def normalize(caption: str) -> str:
    """Lower case, apostrophes dropped, every other non-letter a space, spaces collapsed."""
    text = caption.replace("’", "").replace("'", "").replace("-", " ").replace("\t", " ")
    text = re.sub(r"[^a-z ]", " ", text.lower())
    return re.sub(" +", " ", text).strip()


@lru_cache(maxsize=65536)
def synonyms(word: str) -> tuple[str, ...]:
    """WordNet synonyms of `word` (lemmas of all its synsets, normalized), itself excluded."""
    out = {}
    for syn in _wordnet().synsets(word):
        for lemma in syn.lemmas():
            s = normalize(lemma.name().replace("_", " "))
            if s and s != word:
                out[s] = None
    return tuple(out)


def synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
    new = list(words)
    candidates = list(dict.fromkeys(w for w in words if w not in STOP_WORDS))
    rng.shuffle(candidates)
    replaced = 0
    for w in candidates:
        syns = synonyms(w)
        if syns:
            s = rng.choice(syns)
            new = [s if x == w else x for x in new]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(new).split()


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    new = list(words)
    for _ in range(n):
        for _ in range(10):  # a word with synonyms, tried up to 10 times (reference code)
            w = new[rng.randrange(len(new))] if new else ""
            syns = synonyms(w) if w and w not in STOP_WORDS else ()
            if syns:
                new.insert(rng.randrange(len(new) + 1), rng.choice(syns))
                break
    return " ".join(new).split()


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    new = list(words)
    if len(new) < 2:
        return new
    for _ in range(n):
        i = rng.randrange(len(new))
        for _ in range(3):
            j = rng.randrange(len(new))
            if j != i:
                new[i], new[j] = new[j], new[i]
                break
    return new


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [words[rng.randrange(len(words))]]


class EDA:
    """Seeded EDA augmenter: `eda(caption)` or `eda(caption, key=...)` -> augmented caption.

    alpha_sr / alpha_ri / alpha_rs: fraction of words changed by SR / RI / RS; p_rd: deletion
    probability. Raises RuntimeError with install instructions when WordNet is missing."""

    def __init__(self, seed: int = 0, alpha_sr: float = 0.1, alpha_ri: float = 0.1,
                 alpha_rs: float = 0.1, p_rd: float = 0.1):
        _wordnet()
        self.seed = seed
        self.alpha_sr, self.alpha_ri, self.alpha_rs, self.p_rd = alpha_sr, alpha_ri, alpha_rs, p_rd
        self.rng = random.Random(f"eda/{seed}")

    def __call__(self, caption: str, key=None) -> str:
        rng = self.rng if key is None else random.Random(f"eda/{self.seed}/{key}")
        words = normalize(caption).split()
        if not words:
            return caption
        op = rng.randrange(4)
        if op == 0:
            n = max(1, int(self.alpha_sr * len(words)))
            out = synonym_replacement(words, n, rng)
        elif op == 1:
            out = random_insertion(words, max(1, int(self.alpha_ri * len(words))), rng)
        elif op == 2:
            out = random_swap(words, max(1, int(self.alpha_rs * len(words))), rng)
        else:
            out = random_deletion(words, self.p_rd, rng)
        return " ".join(out)

    def batch(self, captions: list[str], keys=None) -> list[str]:
        """Augment a list of captions; keys (e.g. [(epoch, id), ...]) as in __call__."""
        if keys is None:
            return [self(c) for c in captions]
        return [self(c, key=k) for c, k in zip(captions, keys)]

