"""Generated tokens made audible: Mimi decodes Moshi's and the user's codebooks into a stereo WAV.

Frames whose codes are not all valid (the user's "no input" token -1, padding) become silence.
Decoding runs in Mimi's streaming mode, a chunk at a time, so minutes of audio cost no more
memory than a chunk (Mimi is causal: streamed and one-shot decoding agree).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHUNK_FRAMES = 125  # 10 s per decode call


@torch.no_grad()
def decode_codes(mimi, codes, chunk_frames: int = CHUNK_FRAMES) -> np.ndarray:
    """[8, T] codes -> float32 [T * 1920] audio at 24 kHz; frames with an invalid code are silent."""
    codes = torch.as_tensor(codes, dtype=torch.long)
    if codes.dim() != 2 or codes.shape[0] != mimi.num_codebooks:
        raise ValueError(f"expected [{mimi.num_codebooks}, T] codes, got {tuple(codes.shape)}")
    card = int(mimi.quantizer.cardinality)
    valid = ((codes >= 0) & (codes < card)).all(0)
    frame_size = int(mimi.sample_rate / mimi.frame_rate)
    device = next(mimi.parameters()).device
    clean = torch.where(valid[None], codes, torch.zeros_like(codes))
    pieces = []
    with mimi.streaming(1):
        for a in range(0, codes.shape[1], chunk_frames):
            pieces.append(mimi.decode(clean[None, :, a : a + chunk_frames].to(device))[0, 0].float().cpu())
    pcm = torch.cat(pieces) if pieces else torch.zeros(0)
    mask = valid.repeat_interleave(frame_size)[: pcm.numel()].float()
    return (pcm * mask).numpy()


def conversation_audio(mimi, moshi_codes, user_codes=None) -> np.ndarray:
    """[2, S] float32: Moshi's decoded codebooks left, the user's right (silence where absent)."""
    moshi = decode_codes(mimi, moshi_codes)
    user = decode_codes(mimi, user_codes) if user_codes is not None else np.zeros_like(moshi)
    n = max(moshi.size, user.size)
    out = np.zeros((2, n), np.float32)
    out[0, : moshi.size], out[1, : user.size] = moshi, user
    return out


def user_codes_of(timeline, prompt_codes) -> torch.Tensor:
    """The user's codebooks on a generation's clock: the prompt conversation's while it lasts (its
    prompt only, when the user went silent after it), then -1 (silence)."""
    prompt_codes = torch.as_tensor(prompt_codes, dtype=torch.long)
    dep_q = len(timeline.audio_tokens)
    T = timeline.num_frames
    out = torch.full((prompt_codes.shape[0] - 1 - dep_q, T), -1, dtype=torch.long)
    last = min(T, prompt_codes.shape[1])
    if timeline.config.get("user") == "silence":
        last = min(last, timeline.prompt_frames)
    out[:, :last] = prompt_codes[1 + dep_q :, :last]
    return out


def write_wav(path: str | Path, stereo: np.ndarray, sample_rate: int = 24000) -> Path:
    from moshi_ttt.data.audio import write_stereo

    path = Path(path)
    write_stereo(path, stereo, sample_rate)
    return path
