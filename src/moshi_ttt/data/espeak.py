"""Two-channel conversations spoken by espeak-ng, one word at a time, so word timings are exact.

Each word is synthesised alone (and cached per voice), trimmed of its silence, and laid on the
speaker's channel of a stereo timeline: the alignment of every word is where we put it, not an
estimate. espeak-ng is a Debian package (``apt-get install espeak-ng``), not a Python one.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from moshi_ttt.data.alignment import MAIN_SPEAKER, OTHER_SPEAKER, Word
from moshi_ttt.data.audio import SAMPLE_RATE, resample
from moshi_ttt.data.dialogue import Turn

SPEAKER_LABELS = (MAIN_SPEAKER, OTHER_SPEAKER)  # channel 0 = Moshi, channel 1 = the user


def require_espeak() -> str:
    """The espeak-ng binary, or an error that says how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng is not installed; the demo dataset is spoken by it. Install it with "
            "`apt-get install espeak-ng` (as root; `make demo-data` does this when it is missing)."
        )
    return exe


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice with variant, e.g. "en-us+m3"
    speed: int = 165  # words per minute
    pitch: int = 50  # 0-99


DEFAULT_VOICES = (Voice("en-us+m3", 160, 40), Voice("en-gb+f2", 170, 60))


class WordSynth:
    """Speaks single words with one voice; each distinct word is synthesised once."""

    def __init__(self, voice: Voice):
        self.exe = require_espeak()
        self.voice = voice
        self._cache: dict[str, np.ndarray] = {}

    @staticmethod
    def spoken_form(word: str) -> str:
        return re.sub(r"[^a-z0-9']+", "", word.lower())

    def __call__(self, word: str) -> np.ndarray:
        """Float32 mono audio at 24 kHz, without leading or trailing silence."""
        key = self.spoken_form(word)
        if not key:
            raise ValueError(f"word {word!r} has nothing to speak")
        if key not in self._cache:
            cmd = [
                self.exe,
                "-v",
                self.voice.name,
                "-s",
                str(self.voice.speed),
                "-p",
                str(self.voice.pitch),
                "--stdout",
                key,
            ]
            proc = subprocess.run(cmd, capture_output=True, check=False)
            if proc.returncode != 0 or not proc.stdout:
                raise RuntimeError(
                    f"espeak-ng failed on {key!r} with voice {self.voice.name}: "
                    f"{proc.stderr.decode(errors='replace').strip()}"
                )
            audio, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
            audio = resample(audio[None], rate, SAMPLE_RATE)[0]
            self._cache[key] = _trim(audio)
        return self._cache[key]


def _trim(audio: np.ndarray, threshold: float = 0.02, margin: int = 120) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > threshold * max(np.abs(audio).max(), 1e-6))
    if loud.size == 0:
        return audio
    return audio[max(0, loud[0] - margin) : loud[-1] + margin + 1]


class Timeline:
    """A stereo conversation under construction: turns are appended, words are timed exactly."""

    def __init__(
        self,
        synths: tuple[WordSynth, WordSynth],
        rng: np.random.Generator,
        lead_seconds: float = 0.5,
        word_gap: tuple[float, float] = (0.04, 0.12),
        turn_gap: tuple[float, float] = (0.25, 0.8),
        overlap_prob: float = 0.1,
    ):
        self.synths = synths
        self.rng = rng
        self.word_gap = word_gap
        self.turn_gap = turn_gap
        self.overlap_prob = overlap_prob
        self.clips: list[tuple[int, int, np.ndarray]] = []  # (channel, start sample, audio)
        self.words: list[Word] = []
        self.end = lead_seconds  # end of the last turn, seconds
        self.channel_end = [lead_seconds, lead_seconds]  # a voice never overlaps itself
        self.gains = (float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.6, 0.9)))

    @property
    def seconds(self) -> float:
        return self.end

    def _speak(self, channel: int, words: tuple[str, ...], start: float) -> list[Word]:
        t = start
        placed = []
        for w in words:
            clip = self.synths[channel](w) * self.gains[channel]
            s0 = round(t * SAMPLE_RATE)
            self.clips.append((channel, s0, clip))
            placed.append(Word(w, s0 / SAMPLE_RATE, (s0 + len(clip)) / SAMPLE_RATE, SPEAKER_LABELS[channel]))
            t = (s0 + len(clip)) / SAMPLE_RATE + float(self.rng.uniform(*self.word_gap))
        self.words.extend(placed)
        self.channel_end[channel] = max(self.channel_end[channel], placed[-1].end)
        return placed

    def add_turn(self, turn: Turn, backchannel: Turn | None = None, overlap: bool = True) -> list[Word]:
        """Speak ``turn`` after the previous one (sometimes a little over it); returns its words."""
        gap = float(self.rng.uniform(*self.turn_gap))
        if overlap and self.words and self.rng.random() < self.overlap_prob:
            gap = -float(self.rng.uniform(0.0, 0.3))  # full duplex: a speaker may start early
        own_gap = float(self.rng.uniform(*self.word_gap))
        start = max(self.end + gap, self.channel_end[turn.speaker] + own_gap)
        placed = self._speak(turn.speaker, turn.words, start)
        if backchannel is not None and len(placed) >= 6 and backchannel.speaker != turn.speaker:
            mid = placed[len(placed) // 2]
            self._speak(
                backchannel.speaker,
                backchannel.words,
                max(mid.start, self.channel_end[backchannel.speaker] + own_gap),
            )
        self.end = max(self.end, *self.channel_end)
        return placed

    def render(self, tail_seconds: float = 0.5, noise_db: float = -60.0) -> tuple[np.ndarray, list[Word]]:
        """Stereo float32 ``[2, S]`` and the words sorted by start time."""
        total = round((self.end + tail_seconds) * SAMPLE_RATE)
        audio = self.rng.normal(0.0, 10 ** (noise_db / 20), size=(2, total)).astype(np.float32)
        for channel, s0, clip in self.clips:
            audio[channel, s0 : s0 + len(clip)] += clip[: total - s0]
        return np.clip(audio, -1.0, 1.0), sorted(self.words, key=lambda w: (w.start, w.speaker))


def alignment_json(words: list[Word], meta: dict | None = None) -> dict:
    """The moshi-finetune alignment file body (plus our optional ``meta``); times kept exact."""
    body: dict = {"alignments": [[w.text, [w.start, w.end], w.speaker] for w in words]}
    if meta:
        body["meta"] = meta
    return body
