"""Every threshold the checks judge by, in one place (``--threshold KEY=VALUE`` on the command line)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from moshi_ttt.eval.phases import DEFAULT_THRESHOLDS as PHASE


@dataclass(frozen=True)
class Thresholds:
    # TTT usage
    gate_eps: float = 1e-3  # max |tanh(gate)| below this: the TTT branch is switched off ("TTT unused")
    unused_rel_diff: float = 1e-6  # relative change of the hidden states with TTT off below this: unused
    weak_rel_diff: float = 1e-3  # ... below this: TTT barely changes the model (warn)
    # TTT state over the stream; norms are relative to sqrt(head_dim * fast-weight matrices), the
    # Frobenius norm of an identity-like map per head
    weight_norm_warn: float = 10.0
    weight_norm_fail: float = 100.0  # diverged
    late_growth: float = 2.0  # norm at the end / norm at mid-stream above this: still growing (warn)
    weight_mean_over_std: float = 1.0  # |mean| / std of the fast weights above this: drifted off centre
    eta_saturated: float = 0.5  # share of chunks whose largest inner lr sits at ttt.eta_max (warn above)
    eta_vanishing: float = 1e-8  # mean inner lr below this: the memory is not written (warn)
    # normalisation inputs and the residual stream
    drift_ratio: float = 2.0  # RMS of a norm's input, last window / first window (or its inverse)
    norm_mean_abs: float = 5.0  # |mean over channels| of a norm's input (the lab notes' threshold)
    jump_ratio: float = 2.0  # residual RMS / median of the previous jump_window frames
    jump_window: int = 50
    # predictions
    salad_entropy: float = PHASE.salad_entropy  # normalised entropy of near-uniform predictions
    entropy_rise: float = 0.2  # last window - first window
    entropy_collapse: float = 0.5  # last window / first window below this (over-confident, loops)
    loop_repetition: float = PHASE.loop_repetition  # share of repeated n-grams in a window
    ngram: int = PHASE.ngram

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULTS = Thresholds()


def parse_thresholds(items: list[str] | None) -> Thresholds:
    """``["jump_ratio=3", ...]`` -> Thresholds; an unknown key or a bad value names itself."""
    known = {f.name: f.type for f in fields(Thresholds)}
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--threshold {item!r}: expected KEY=VALUE with KEY in {sorted(known)}")
        try:
            values[key] = int(value) if known[key] in (int, "int") else float(value)
        except ValueError as exn:
            raise ValueError(f"--threshold {item!r}: {value!r} is not a number") from exn
    return Thresholds(**values)
