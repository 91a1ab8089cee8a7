"""EDA: seeded, a fresh draw per call, the four operations, WordNet required."""
import random
import subprocess
import sys

import pytest

from abd_fast.text.eda import (EDA, STOP_WORDS, normalize, random_deletion, random_insertion,
                               random_swap, synonym_replacement, synonyms)

CAPTION = "A small red star near the top, on a striped background."


def test_same_seed_same_sequence_fresh_draw_each_call():
    a, b = EDA(seed=0), EDA(seed=0)
    seq_a = [a(CAPTION) for _ in range(30)]
    assert seq_a == [b(CAPTION) for _ in range(30)]
    assert len(set(seq_a)) >= 10                                    # captions change per call
    assert seq_a != [EDA(seed=1)(CAPTION) for _ in range(30)]


def test_keyed_draws_depend_only_on_seed_and_key():
    eda = EDA(seed=3)
    first = [eda(CAPTION, key=(0, i)) for i in range(20)]
    eda(CAPTION)                                                    # advancing the stream ...
    assert first == [EDA(seed=3)(CAPTION, key=(0, i)) for i in range(20)]   # ... changes nothing
    assert first != [eda(CAPTION, key=(1, i)) for i in range(20)]   # a new epoch, new draws
    assert eda.batch([CAPTION] * 3, keys=[(0, 0), (0, 1), (0, 2)]) == first[:3]


def test_operations():
    rng = random.Random(0)
    words = normalize(CAPTION).split()
    assert words[:3] == ["a", "small", "red"] and words[-1] == "background"
    assert "little" in synonyms("small") and "small" not in synonyms("small")
    swapped = random_swap(words, 2, rng)
    assert sorted(swapped) == sorted(words) and swapped != words
    assert len(random_insertion(words, 1, rng)) >= len(words) + 1
    assert len(random_deletion(words, 0.5, rng)) < len(words)
    assert random_deletion(["star"], 0.99, rng) == ["star"]
    for _ in range(20):
        out = synonym_replacement(words, 3, rng)
        kept_stop = [w for w in words if w in STOP_WORDS]
        assert all(w in out for w in kept_stop)                     # stop words untouched
        assert out != words


def test_missing_wordnet_says_how_to_install(tmp_path):
    code = ("import nltk; nltk.data.path[:] = [%r]; from abd_fast.text.eda import EDA; EDA()"
            % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"NLTK_DATA": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "RuntimeError: EDA needs NLTK's WordNet corpus" in out.stderr
    assert "scripts/setup.sh" in out.stderr and "nltk.downloader wordnet" in out.stderr


@pytest.mark.parametrize("caption", ["", "   ", "star"])
def test_degenerate_captions(caption):
    out = EDA(seed=0)(caption)
    assert isinstance(out, str)
