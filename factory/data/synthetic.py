"""Synthetic long-range retrieval text: key-value recall and passkey.

Every generator is driven by a caller-owned ``random.Random`` so that a seed fixes
the output, and every distance is measured in tokens of the caller's tokenizer:
the number of tokens between the end of the fact and the start of the question.
Filler comes from a corpus, cut at paragraph boundaries (and at a word boundary for
the last piece) so that token counts add up.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

TokenCounter = Callable[[str], int]

# The held-out play of the embedded corpus: the tiny teacher never trained on it.
DEFAULT_FILLER = Path(__file__).resolve().parents[2] / "assets" / "corpus" / "tempest.txt"

PASSKEY_QUESTION = "What is the pass key? The pass key is"
_SYLLABLE_C = "bdfgklmnprstvz"
_SYLLABLE_V = "aeiou"


def token_counter(tokenizer) -> TokenCounter:
    """Token count of a text under an HF tokenizer, without special tokens."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


@dataclass(frozen=True)
class Sample:
    """A prompt, the answer that should follow it, and where the fact sits."""

    prompt: str
    answer: str
    fact_end: int  # character offset in prompt just after the queried fact
    question_start: int  # character offset in prompt where the question begins


class Filler:
    """Corpus paragraphs with cached token counts, sliced to a token budget."""

    def __init__(self, text: str, count_tokens: TokenCounter):
        paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
        self.paras = [p + "\n\n" for p in paras if p]
        if not self.paras:
            raise ValueError("filler text is empty: need at least one non-blank paragraph")
        self.count = count_tokens
        self.sizes = [count_tokens(p) for p in self.paras]

    def take(self, rng: random.Random, n_tokens: int) -> str:
        """About ``n_tokens`` tokens of consecutive corpus text from a random start."""
        out, used, i = [], 0, rng.randrange(len(self.paras))
        while used < n_tokens:
            para, size = self.paras[i], self.sizes[i]
            if used + size > n_tokens:
                out.append(self._head(para, n_tokens - used))
                break
            out.append(para)
            used += size
            i = (i + 1) % len(self.paras)
        return "".join(out)

    def _head(self, para: str, budget: int) -> str:
        """Longest word prefix of ``para`` that fits ``budget`` tokens (binary search)."""
        # Words keep their leading whitespace, matching how the pre-tokenizer splits.
        words = re.findall(r"\s*\S+", para.rstrip())
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count("".join(words[:mid]).lstrip() + "\n\n") <= budget:
                lo = mid
            else:
                hi = mid - 1
        return "".join(words[:lo]).lstrip() + "\n\n" if lo else ""


def random_key(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLE_C) + rng.choice(_SYLLABLE_V) for _ in range(syllables))


def random_digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def kv_fact(key: str, value: str) -> str:
    return f"Key {key} has value {value}."


def kv_question(key: str) -> str:
    return f"What value does key {key} have? Key {key} has value"


def passkey_fact(key: str) -> str:
    return f"The pass key is {key}. Remember it."


def _assemble(rng, filler: Filler, prefix_tokens: int, block: str, fact_end_in_block: int,
              gap_tokens: int, question: str) -> tuple[str, int, int]:
    """prefix filler + block + filler + question; returns (text, fact_end, question_start)."""
    prefix = filler.take(rng, prefix_tokens) if prefix_tokens > 0 else ""
    gap = filler.take(rng, gap_tokens) if gap_tokens > 0 else ""
    text = prefix + block + gap
    return text + question, len(prefix) + fact_end_in_block, len(text)


def passkey_sample(rng: random.Random, filler: Filler, distance: int,
                   prefix_tokens: int | None = None, digits: int = 5) -> Sample:
    """Passkey at ``distance`` tokens before the question; answer is " NNNNN"."""
    key = random_digits(rng, digits)
    block = passkey_fact(key) + "\n\n"
    sep = filler.count("\n\n")
    prefix = rng.randint(8, 64) if prefix_tokens is None else prefix_tokens
    prompt, fact_end, q = _assemble(rng, filler, prefix, block, len(block) - 2,
                                    distance - sep, PASSKEY_QUESTION)
    return Sample(prompt, " " + key, fact_end, q)


def kv_sample(rng: random.Random, filler: Filler, distance: int, n_pairs: int = 4,
              prefix_tokens: int | None = None, digits: int = 4) -> Sample:
    """``n_pairs`` key-value facts in a block; the queried one sits ``distance`` tokens
    before the question, the others act as distractors. Answer is " VVVV"."""
    keys = _distinct_keys(rng, n_pairs)
    values = [random_digits(rng, digits) for _ in keys]
    block = "".join(kv_fact(k, v) + "\n" for k, v in zip(keys, values)) + "\n"
    ends = [block.index(kv_fact(k, v)) + len(kv_fact(k, v)) for k, v in zip(keys, values)]
    after = [filler.count(block[e:]) for e in ends]
    # Only facts whose block tail fits inside the distance can be asked for exactly.
    fits = [i for i in range(n_pairs) if after[i] <= distance] or [n_pairs - 1]
    target = rng.choice(fits)
    prefix = rng.randint(8, 64) if prefix_tokens is None else prefix_tokens
    prompt, fact_end, q = _assemble(rng, filler, prefix, block, ends[target],
                                    distance - after[target], kv_question(keys[target]))
    return Sample(prompt, " " + values[target], fact_end, q)


def _distinct_keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        key = random_key(rng)
        if key not in keys:
            keys.append(key)
    return keys


def make_samples(task: str, rng: random.Random, filler: Filler, distance: int, n: int) -> list[Sample]:
    """``n`` samples of one task ("kv" or "passkey") at one distance."""
    makers = {"kv": kv_sample, "passkey": passkey_sample}
    if task not in makers:
        raise ValueError(f"unknown retrieval task {task!r}: expected one of {sorted(makers)}")
    return [makers[task](rng, filler, distance) for _ in range(n)]


# ---- training documents -------------------------------------------------------------


def passkey_document(rng: random.Random, filler: Filler, length: int, max_distance: int) -> str:
    """A ~``length``-token passkey document with the answer written out."""
    distance = rng.randint(16, max(16, min(max_distance, length - 60)))
    prefix = rng.randint(0, max(0, length - distance - 40))
    s = passkey_sample(rng, filler, distance, prefix_tokens=prefix)
    return _with_tail(rng, filler, s.prompt + s.answer + ".\n\n", length)


def kv_document(rng: random.Random, filler: Filler, length: int, max_distance: int) -> str:
    """Key-value facts, a filler gap, then questions each answered in place. Up to ten
    answers a document: dense supervision is what makes a small model learn to retrieve."""
    n_pairs = rng.randint(2, max(2, min(10, length // 48)))  # what fits the length
    keys = _distinct_keys(rng, n_pairs)
    values = [random_digits(rng, 4) for _ in keys]
    block = "".join(kv_fact(k, v) + "\n" for k, v in zip(keys, values)) + "\n"
    asked = rng.sample(range(n_pairs), rng.randint(1, n_pairs))
    questions = "".join(kv_question(keys[i]) + " " + values[i] + ".\n" for i in asked)
    room = length - filler.count(block) - filler.count(questions) - 8
    gap = rng.randint(16, max(16, min(max_distance, room)))
    prefix = rng.randint(0, max(0, room - gap))
    text = (filler.take(rng, prefix) if prefix else "") + block + filler.take(rng, gap)
    return _with_tail(rng, filler, text + questions + "\n", length)


def copy_document(rng: random.Random, filler: Filler, length: int, max_distance: int) -> str:
    """A list of random keys and numbers, filler, then the same list again. Only
    looking back can predict the repeat, so it teaches copying (induction heads)
    with dozens of supervised tokens a document."""
    items = [random_key(rng) if rng.random() < 0.5 else random_digits(rng, rng.randint(2, 5))
             for _ in range(rng.randint(4, max(4, min(40, length // 12))))]
    listing = "List: " + " ".join(items) + ".\n\n"
    room = length - 2 * filler.count(listing) - 8
    gap = rng.randint(0, max(0, min(max_distance, room)))
    prefix = rng.randint(0, max(0, room - gap))
    text = (filler.take(rng, prefix) if prefix else "") + listing + filler.take(rng, gap)
    return _with_tail(rng, filler, text + "Again, the " + listing, length)


def _with_tail(rng: random.Random, filler: Filler, text: str, length: int) -> str:
    # Pad with corpus text so every document fills its window; callers truncate.
    return text + filler.take(rng, max(0, length - filler.count(text)) + 8)


KINDS = ("corpus", "passkey", "kv", "copy")
_MAKERS = {"passkey": passkey_document, "kv": kv_document, "copy": copy_document}


def training_documents(rng: random.Random, filler: Filler, n_docs: int, length: int = 512,
                       mix: Sequence[float] = (0.5, 0.2, 0.2, 0.1), max_distance: int = 480) -> list[str]:
    """Plain-text documents of about ``length`` tokens: corpus passages, passkey, key-value
    and copy documents drawn with probabilities ``mix`` (in ``KINDS`` order)."""
    return [training_document(rng, filler, rng.choices(KINDS, weights=mix)[0], length, max_distance)
            for _ in range(n_docs)]


def training_document(rng: random.Random, filler: Filler, kind: str, length: int = 512,
                      max_distance: int = 480) -> str:
    """One document of ``kind`` (see ``KINDS``), answers written out."""
    if kind == "corpus":
        return filler.take(rng, length + 8)
    if kind not in _MAKERS:
        raise ValueError(f"unknown document kind {kind!r}: expected one of {KINDS}")
    return _MAKERS[kind](rng, filler, length, max_distance)


def encode_sample(tokenizer, sample: Sample) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the number of answer tokens."""
    prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
    return prompt + answer, len(answer)
