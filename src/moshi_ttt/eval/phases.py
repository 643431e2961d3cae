"""The four phases of long-context collapse (lab notes, ../shared/seeds/003), as token statistics.

The notes saw Moshi's text go through: 1. coherent speech; 2. repetitive loops ("I'm sure it's
fine I'm sure it's fine ...", 2-5 word phrases, ~10 distinct tokens); 3. fragmentation (single
frequent words and pieces in no order: "a of is the in b of f in is ..."); 4. word salad / semantic
collapse (a fresh random word each time, drawn from near-uniform predictive distributions).

A window (e.g. 10 s of generation) is judged on its *content* text tokens (the inner monologue
without the padding tokens) and on the model's predictive entropy, normalised by the log of the
vocabulary size (0 = certain, 1 = uniform). Rules, first match wins (thresholds: PhaseThresholds):

- ``silent``: fewer than ``min_tokens`` content tokens: nothing to judge (Moshi listening, or
  not talking); not one of the four phases.
- ``loops``: a span that repeats one phrase of at most ``max_loop_period`` tokens (at least twice)
  covers ``loop_coverage`` of the window, or ``loop_repetition`` of its n-grams already occurred
  earlier in the window.
- ``word_salad``: the mean normalised entropy of the predictions that produced the content tokens
  is at least ``salad_entropy`` (the model samples from near-uniform distributions). Without
  entropies this rule cannot fire: token statistics alone do not tell fluent, varied speech from a
  fresh random word each time.
- ``fragmentation``: lexical diversity (moving-average type-token ratio over ``diversity_span``
  tokens, length-independent) below ``fragment_diversity``: a few tokens recur in no fixed order.
- ``coherent``: everything else (varied tokens, confident predictions, no loops).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

PHASES = ("coherent", "loops", "fragmentation", "word_salad")
SILENT = "silent"
SEVERITY = {SILENT: -1, "coherent": 0, "loops": 1, "fragmentation": 2, "word_salad": 3}


@dataclass(frozen=True)
class PhaseThresholds:
    min_tokens: int = 6
    ngram: int = 3
    max_loop_period: int = 8
    loop_coverage: float = 0.5
    loop_repetition: float = 0.5
    salad_entropy: float = 0.7
    diversity_span: int = 20
    fragment_diversity: float = 0.65

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_THRESHOLDS = PhaseThresholds()


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """Share of the n-grams that already occurred earlier in ``tokens`` (0 when it has none)."""
    grams = _ngrams(list(tokens), n)
    seen: set = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def distinct_n(tokens: Sequence[int], n: int = 1) -> float:
    """Distinct n-grams / n-grams (NaN when there is none)."""
    grams = _ngrams(list(tokens), n)
    return len(set(grams)) / len(grams) if grams else float("nan")


def moving_ttr(tokens: Sequence[int], span: int = 20) -> float:
    """Moving-average type-token ratio: the mean distinct-1 of every ``span``-token stretch (plain
    distinct-1 for shorter sequences), so windows of different lengths compare."""
    tokens = list(tokens)
    if not tokens:
        return float("nan")
    if len(tokens) <= span:
        return len(set(tokens)) / len(tokens)
    counts: dict[int, int] = {}
    for t in tokens[:span]:
        counts[t] = counts.get(t, 0) + 1
    total = len(counts)
    for i in range(span, len(tokens)):
        old, new = tokens[i - span], tokens[i]
        counts[old] -= 1
        if counts[old] == 0:
            del counts[old]
        counts[new] = counts.get(new, 0) + 1
        total += len(counts)
    return total / (len(tokens) - span + 1) / span


def longest_loop(tokens: Sequence[int], max_period: int = 8) -> tuple[int, int]:
    """(length, period) of the longest span that repeats a phrase of ``period`` <= ``max_period``
    tokens at least twice (``x[i] == x[i - period]`` throughout); (0, 0) when there is none."""
    tokens = list(tokens)
    best = (0, 0)
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - p] else 0
            if run >= p and run + p > best[0]:
                best = (run + p, p)
    return best


def token_stats(tokens: Sequence[int], thresholds: PhaseThresholds = DEFAULT_THRESHOLDS) -> dict:
    """The statistics the classifier reads, for one window of (content) tokens."""
    tokens = [int(t) for t in tokens]
    length, period = longest_loop(tokens, thresholds.max_loop_period)
    return {
        "tokens": len(tokens),
        "unique": len(set(tokens)),
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "diversity": moving_ttr(tokens, thresholds.diversity_span),
        "repetition_rate": repetition_rate(tokens, thresholds.ngram),
        "longest_loop": length,
        "loop_period": period,
        "loop_coverage": length / len(tokens) if tokens else 0.0,
    }


def classify(stats: dict, entropy: float | None = None, thresholds: PhaseThresholds = DEFAULT_THRESHOLDS) -> str:
    """The phase of a window from :func:`token_stats` and its mean normalised entropy (or None)."""
    th = thresholds
    if stats["tokens"] < th.min_tokens:
        return SILENT
    if stats["loop_coverage"] >= th.loop_coverage or stats["repetition_rate"] >= th.loop_repetition:
        return "loops"
    if entropy is not None and not math.isnan(entropy) and entropy >= th.salad_entropy:
        return "word_salad"
    if stats["diversity"] < th.fragment_diversity:
        return "fragmentation"
    return "coherent"


def classify_window(tokens: Sequence[int], entropy: float | None = None,
                    thresholds: PhaseThresholds = DEFAULT_THRESHOLDS) -> str:
    """The phase of one window of content tokens (see the module docstring for the rules)."""
    return classify(token_stats(tokens, thresholds), entropy, thresholds)
