"""Recall accuracy on the long-range recall set (``moshi_ttt.data.recall``), by delay.

Each conversation states a fact early (``fact_span``) and reproduces it ``delay_frames`` later
(``recall_span``). Teacher-forced over the whole conversation, a model recalls a token when its
argmax prediction at that position equals the target. Scored tokens, per the set's layout:

- token-level set (``meta.level == "tokens"``): the fact block is text + all 16 audio codebooks;
  the model predicts the text stream and Moshi's 8 codebooks, so those are scored over
  ``recall_span``. Text padding tokens (the fixed "padding / end of padding" rhythm between
  the fact's words) are left out: they follow from the layout, not from the fact.
- audio-level set (``meta.level == "audio"``): ``recall_span`` covers the code word's text
  tokens; the text stream is scored (Moshi's audio of the word need not repeat token for token).
- ``meta.fact_streams == "text"``: the fact lives in the words only; the text stream is scored.
- ``meta.recall_frames`` (e.g. the associative-recall set's query values): only those frames of
  ``recall_span`` are scored.
- ``meta.recalls`` (the long spoken conversations): several facts per conversation, each with its
  own ``recall_span`` and ``delay_frames``, scored as above and counted at its own delay.

``chance`` is the accuracy of a predictor that picks uniformly among the vocabulary:
the scored tokens' mean of ``1 / text_card`` (text) and ``1 / card`` (audio).
"""

from __future__ import annotations

import torch

from moshi_ttt.data.alignment import END_OF_TEXT_PADDING_ID, TEXT_PADDING_ID
from moshi_ttt.eval.samples import batched, check_vocabulary, iter_samples, model_device, stack_codes
from moshi_ttt.training.loss import LossConfig, moshi_loss


def _text_pads(model) -> tuple[int, int]:
    return (int(getattr(model, "text_padding_token_id", TEXT_PADDING_ID)),
            int(getattr(model, "end_of_text_padding_id", END_OF_TEXT_PADDING_ID)))


def _stack(model, samples) -> torch.Tensor:
    """A batch padded ``max(delays)`` frames past its longest conversation, so that every sample's
    last frames are scored in every codebook whatever it is batched with (a sequence that ends
    exactly at its last frame leaves its delayed codebooks' last prediction out of the mask)."""
    extra = max(getattr(model, "delays", None) or [0])
    return stack_codes([s.codes for s in samples], max(s.frames for s in samples) + extra)


def recall_spans(meta: dict) -> list[dict]:
    """The recalled facts of a sample: ``meta["recalls"]`` (several per conversation), else the sample's
    own ``recall_span`` / ``delay_frames`` (one)."""
    return list(meta["recalls"]) if "recalls" in meta else [meta]


def _recall_samples(shards, max_samples):
    for s in iter_samples(shards, max_samples):
        spans = recall_spans(s.meta)
        if not spans or any("recall_span" not in r or "delay_frames" not in r for r in spans):
            raise ValueError(f"sample {s.key!r} of {shards} has no recall_span/delay_frames in its meta.json: "
                             "not a recall set (write one with `python -m moshi_ttt.data.recall`)")
        yield s


@torch.no_grad()
def recall_report(model, shards: str | list[str], max_samples: int | None = None, batch_size: int = 4,
                  delay_bucket: int | None = None) -> dict:
    """:func:`recall_accuracy` with details: hits/tokens overall and by delay, text and audio
    accuracy separately, and per-sample accuracy. ``delay_bucket`` groups delays into bins of
    that many frames (keyed by the bin's first delay); None keeps every delay apart."""
    model.eval()
    device = model_device(model)
    text_card, card = int(model.text_card), int(model.card)
    pads = torch.tensor(_text_pads(model), device=device)
    stats: dict[int, dict[str, int]] = {}
    per_sample = []
    n = 0
    for batch in batched(_recall_samples(shards, max_samples), batch_size):
        codes = _stack(model, batch)
        check_vocabulary(codes, model, f"{shards}: samples {batch[0].key!r}..{batch[-1].key!r}")
        out = model(codes.to(device))
        for i, sample in enumerate(batch):
            for fact in recall_spans(sample.meta):
                a, b = (int(x) for x in fact["recall_span"])
                target_text = codes[i, 0, a:b]
                text_ok = out.text_mask[i, 0, a:b] & (target_text >= 0) & ~torch.isin(target_text, pads)
                if "recall_frames" in fact:  # only these frames of the span carry recalled tokens
                    chosen = torch.zeros_like(text_ok)
                    chosen[torch.tensor([int(f) - a for f in fact["recall_frames"]], device=device)] = True
                    text_ok &= chosen
                text_hit = (out.text_logits[i, 0, a:b].argmax(-1) == target_text) & text_ok
                if sample.meta.get("level", "tokens") == "audio" or sample.meta.get("fact_streams") == "text":
                    audio_ok = audio_hit = torch.zeros(0, dtype=torch.bool, device=device)
                else:
                    dep_q, off = out.logits.shape[1], int(getattr(model, "audio_offset", 1))
                    target_audio = codes[i, off:off + dep_q, a:b]
                    audio_ok = out.mask[i, :, a:b] & (target_audio >= 0)
                    audio_hit = (out.logits[i, :, a:b].argmax(-1) == target_audio) & audio_ok
                delay = int(fact["delay_frames"])
                key = delay if not delay_bucket else delay // delay_bucket * delay_bucket
                s = stats.setdefault(key, {"text_hits": 0, "text_tokens": 0, "audio_hits": 0, "audio_tokens": 0})
                counts = {"text_hits": int(text_hit.sum()), "text_tokens": int(text_ok.sum()),
                          "audio_hits": int(audio_hit.sum()), "audio_tokens": int(audio_ok.sum())}
                for k, v in counts.items():
                    s[k] += v
                tokens = counts["text_tokens"] + counts["audio_tokens"]
                per_sample.append({"key": sample.key, "delay_frames": delay,
                                   "accuracy": (counts["text_hits"] + counts["audio_hits"]) / tokens if tokens else None,
                                   **({"kind": fact["kind"]} if "kind" in fact else {}), **counts})
        n += len(batch)
    if n == 0:
        raise ValueError(f"{shards}: no recall samples")

    def acc(s: dict) -> float:
        tokens = s["text_tokens"] + s["audio_tokens"]
        return (s["text_hits"] + s["audio_hits"]) / tokens if tokens else float("nan")

    total = {k: sum(s[k] for s in stats.values()) for k in ("text_hits", "text_tokens", "audio_hits", "audio_tokens")}
    tokens = total["text_tokens"] + total["audio_tokens"]
    chance = (total["text_tokens"] / text_card + total["audio_tokens"] / card) / tokens if tokens else float("nan")
    return {
        "overall": acc(total),
        "by_delay": {d: acc(s) for d, s in sorted(stats.items())},
        "num_samples": n,
        "chance": chance,
        "text_accuracy": total["text_hits"] / total["text_tokens"] if total["text_tokens"] else float("nan"),
        "audio_accuracy": total["audio_hits"] / total["audio_tokens"] if total["audio_tokens"] else float("nan"),
        "tokens": tokens,
        "by_delay_counts": {d: dict(s) for d, s in sorted(stats.items())},
        "samples": per_sample,
    }


def window_split(report: dict, window: int | None) -> dict:
    """Recall of the facts inside the attention window (delay < ``window`` frames) and beyond it (delay
    >= ``window``: the fact has left what attention sees), from ``recall_report``'s counts by delay
    (NaN for a side without scored tokens; everything is inside when ``window`` is None)."""
    sides = {"in_window": [0, 0], "beyond_window": [0, 0]}
    for delay, c in report["by_delay_counts"].items():
        side = sides["beyond_window" if window is not None and int(delay) >= window else "in_window"]
        side[0] += c["text_hits"] + c["audio_hits"]
        side[1] += c["text_tokens"] + c["audio_tokens"]
    return {name: hits / tokens if tokens else float("nan") for name, (hits, tokens) in sides.items()} | {
        f"{name}_tokens": tokens for name, (_, tokens) in sides.items()}


def attention_span(model) -> int | None:
    """The widest attention window of the temporal transformer as configured now (None: unbounded):
    a fact further back than this is out of every attention layer's reach."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    spans = [m.context for m in model.transformer.modules() if isinstance(m, StreamingMultiheadAttention)]
    if not spans or any(c is None for c in spans):
        return None
    return int(max(spans))


def recall_accuracy(model, shards: str | list[str], max_samples: int | None = None, batch_size: int = 4) -> dict:
    """``{"overall": float, "by_delay": {delay_frames: float}, "num_samples": int, "chance": float}``:
    the share of the recalled tokens whose teacher-forced argmax prediction is the fact's token."""
    r = recall_report(model, shards, max_samples, batch_size)
    return {k: r[k] for k in ("overall", "by_delay", "num_samples", "chance")}


@torch.no_grad()
def late_loss(model, shards, start_frame: int, max_samples: int | None = None, batch_size: int = 4) -> float:
    """Mean unweighted CE per valid token (text + Moshi's audio) over frames >= ``start_frame``,
    teacher-forced over whole conversations (NaN when no conversation reaches ``start_frame``)."""
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    model.eval()
    device = model_device(model)
    pads = _text_pads(model)
    num = den = 0.0
    for batch in batched(iter_samples(shards, max_samples), batch_size):
        codes = _stack(model, batch).to(device)
        res = moshi_loss(model(codes), codes, LossConfig(), pads, int(getattr(model, "audio_offset", 1)))
        num += float(res.token_losses[:, start_frame:].sum())
        den += float(res.token_counts[:, start_frame:].sum())
    return num / den if den else float("nan")
