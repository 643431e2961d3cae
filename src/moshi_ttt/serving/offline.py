"""An offline conversation: the user's recording in, Moshi's side streamed frame by frame out.

The user's audio goes through Mimi in streaming mode, 80 ms at a time, and every frame is one
``LMGen.step`` (with the TTT memory carried in moshi's streaming state, exactly as the live
server runs); Moshi's audio tokens are decoded by the same Mimi. LMGen's step ``s`` returns
frame ``s - max_delay``, so Moshi's frame ``f`` (audio and text) starts at ``f / 12.5`` s, on
the same clock as the user's audio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.data.audio import SAMPLE_RATE, resample

PADDING_IDS = (0, 3)  # moshi's end-of-text and text padding


def read_user_audio(path: str | Path, channel: int | None = None) -> tuple[np.ndarray, dict]:
    """Mono float32 at 24 kHz (``channel``, or all channels averaged) and what the file was;
    errors name the file."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exn:  # noqa: BLE001 - bad headers and truncated data raise several types
        raise ValueError(f"--input {path}: cannot read audio ({exn})") from exn
    if data.shape[0] == 0:
        raise ValueError(f"--input {path}: the file holds no audio samples")
    if not np.isfinite(data).all():
        raise ValueError(f"--input {path}: {int((~np.isfinite(data)).sum())} NaN/Inf samples")
    if channel is not None and not 0 <= channel < data.shape[1]:
        raise ValueError(f"--input {path}: --channel {channel} but the file has {data.shape[1]} channel(s)")
    picked = data.mean(axis=1) if channel is None else data[:, channel]
    mono = resample(np.ascontiguousarray(picked)[None], int(rate), SAMPLE_RATE)[0]
    info = {"path": str(path), "sample_rate": int(rate), "channels": int(data.shape[1]),
            "channel_used": "mix" if channel is None else channel, "seconds": data.shape[0] / rate}
    return mono.astype(np.float32), info


@dataclass
class Conversation:
    """Moshi's audio and text on the user's clock."""

    moshi: np.ndarray  # float32 [S] at 24 kHz
    user: np.ndarray  # float32 [S] at 24 kHz
    tokens: list[dict] = field(default_factory=list)  # {frame, time_s, token, piece}, padding left out
    frames: int = 0
    seconds_wall: float = 0.0

    def words(self) -> list[dict]:
        """Sentencepiece pieces joined into words (a piece starting with U+2581 opens a word)."""
        words: list[dict] = []
        for t in self.tokens:
            piece = t["piece"]
            if piece.startswith("\u2581") or not words:
                words.append({"word": piece.lstrip("\u2581"), "start_s": t["time_s"], "end_s": t["time_s"]})
            else:
                words[-1]["word"] += piece
                words[-1]["end_s"] = t["time_s"]
        for w in words:
            w["end_s"] = round(w["end_s"] + 1 / FRAME_RATE, 3)
        return [w for w in words if w["word"]]

    def stereo(self) -> np.ndarray:
        """[2, S]: Moshi left, the user right."""
        n = max(self.moshi.size, self.user.size)
        out = np.zeros((2, n), np.float32)
        out[0, : self.moshi.size] = self.moshi
        out[1, : self.user.size] = self.user
        return out

    def text_json(self) -> dict:
        words = self.words()
        return {"frame_rate": FRAME_RATE, "text": " ".join(w["word"] for w in words), "words": words,
                "tokens": self.tokens}


@torch.no_grad()
def converse(lm, mimi, tokenizer, user: np.ndarray, lm_gen_kwargs: dict | None = None, seed: int = 0,
             progress=None) -> Conversation:
    """Stream ``user`` (mono, 24 kHz) through Mimi and LMGen one frame at a time.

    ``progress``: called with (frames done, frames total) after every frame."""
    from moshi.models.lm import LMGen

    torch.manual_seed(seed)
    device = next(lm.parameters()).device
    frame_size = int(mimi.sample_rate / mimi.frame_rate)
    total = max(1, int(np.ceil(user.size / frame_size)))
    padded = np.zeros(total * frame_size, np.float32)
    padded[: user.size] = user
    gen = LMGen(lm, **(lm_gen_kwargs or {}))
    moshi_pcm, tokens = [], []
    out_frame = 0
    start = time.perf_counter()
    with gen.streaming(1), mimi.streaming(1):
        for f in range(total):
            chunk = torch.from_numpy(padded[f * frame_size : (f + 1) * frame_size]).to(device)[None, None]
            codes = mimi.encode(chunk)
            for c in range(codes.shape[-1]):
                out = gen.step(codes[:, :, c : c + 1])
                if out is None:
                    continue
                moshi_pcm.append(mimi.decode(out[:, 1:]).float().cpu().numpy()[0, 0])
                token = int(out[0, 0, 0])
                if token not in PADDING_IDS:
                    tokens.append({"frame": out_frame, "time_s": round(out_frame / FRAME_RATE, 3), "token": token,
                                   "piece": tokenizer.id_to_piece(token)})
                out_frame += 1
            if progress is not None:
                progress(f + 1, total)
    moshi = np.concatenate(moshi_pcm) if moshi_pcm else np.zeros(0, np.float32)
    return Conversation(moshi=moshi, user=user, tokens=tokens, frames=total,
                        seconds_wall=time.perf_counter() - start)
