"""Two-channel conversations spoken by a TTS onto a stereo timeline, with the time of every word.

The default voice is espeak-ng, one word at a time (``WordSynth``): each word is synthesised alone
(and cached per voice), trimmed of its silence, and laid on the speaker's channel, so the
alignment of every word is where we put it, not an estimate. espeak-ng is a Debian package
(``apt-get install espeak-ng``), not a Python one. ``CommandTTS`` plugs in any other TTS as a
command line that speaks a whole turn into a wav file (a real voice, natural prosody); its word
times are spread over the turn's voiced span by word length, an estimate as a forced aligner's is.
Both have ``speak(words, rng, word_gap) -> (audio, [(start, end) sample of each word])``.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
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

    def speak(self, words: tuple[str, ...], rng: np.random.Generator,
              word_gap: tuple[float, float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The turn's audio, word after word with a random pause between, and each word's samples."""
        pieces, spans, t = [], [], 0
        for w in words:
            clip = self(w)
            spans.append((t, t + len(clip)))
            gap = round(float(rng.uniform(*word_gap)) * SAMPLE_RATE)
            pieces += [clip, np.zeros(gap, dtype=np.float32)]
            t += len(clip) + gap
        return np.concatenate(pieces[:-1]), spans


class CommandTTS:
    """Speaks a whole turn with an external command, e.g. ``my_tts --text {text} --out {wav}``.

    The template is split like a shell line (no shell runs it); in each argument ``{text}`` becomes
    the turn's text, ``{wav}`` the file to write (any rate, mono or stereo; read with soundfile) and
    ``{speaker}`` 0 for Moshi's voice, 1 for the user's. Each distinct turn is spoken once. Word times
    are the voiced span (silence trimmed) split in proportion to the words' lengths.
    """

    PLACEHOLDERS = ("{text}", "{wav}")

    def __init__(self, template: str, speaker: int):
        self.args = shlex.split(template)
        missing = [p for p in self.PLACEHOLDERS if not any(p in a for a in self.args)]
        if not self.args or missing:
            raise ValueError(f"--tts {template!r}: a TTS command needs {' and '.join(self.PLACEHOLDERS)} "
                             f"(missing {', '.join(missing)}), e.g. \"my_tts --text {{text}} --out {{wav}}\"")
        self.template, self.speaker = template, int(speaker)
        self._cache: dict[str, np.ndarray] = {}

    def _run(self, text: str) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="moshi-ttt-tts-") as tmp:
            wav = os.path.join(tmp, "turn.wav")
            values = {"{text}": text, "{wav}": wav, "{speaker}": str(self.speaker)}
            args = [_substitute(a, values) for a in self.args]
            try:
                proc = subprocess.run(args, capture_output=True, check=False)
            except OSError as exn:
                raise RuntimeError(f"--tts {self.template!r}: cannot run {args[0]!r} ({exn})") from exn
            if proc.returncode != 0 or not os.path.exists(wav):
                raise RuntimeError(f"--tts {self.template!r} failed on {text!r} (exit {proc.returncode}"
                                   f"{'' if os.path.exists(wav) else ', no wav written'}): "
                                   f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
            audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        audio = resample(audio.mean(axis=1)[None], rate, SAMPLE_RATE)[0]
        return _trim(audio)

    def speak(self, words: tuple[str, ...], rng: np.random.Generator,
              word_gap: tuple[float, float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        text = " ".join(words)
        if text not in self._cache:
            self._cache[text] = self._run(text)
        audio = self._cache[text]
        sizes = np.array([len(WordSynth.spoken_form(w)) + 1 for w in words], dtype=np.float64)
        edges = np.round(np.concatenate([[0.0], np.cumsum(sizes)]) / sizes.sum() * len(audio)).astype(int)
        return audio, [(int(a), int(max(b, a + 1))) for a, b in zip(edges[:-1], edges[1:])]


def _substitute(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace(key, value)
    return arg


def make_voices(tts: str | None = None) -> tuple:
    """The two voices (Moshi's, the user's): espeak-ng's (``tts`` None or ``espeak``), else a command
    template for :class:`CommandTTS`."""
    if tts in (None, "", "espeak", "espeak-ng"):
        return WordSynth(DEFAULT_VOICES[0]), WordSynth(DEFAULT_VOICES[1])
    return CommandTTS(tts, 0), CommandTTS(tts, 1)


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
        audio, spans = self.synths[channel].speak(words, self.rng, self.word_gap)
        s0 = round(start * SAMPLE_RATE)
        self.clips.append((channel, s0, audio * self.gains[channel]))
        placed = [Word(w, (s0 + a) / SAMPLE_RATE, (s0 + b) / SAMPLE_RATE, SPEAKER_LABELS[channel])
                  for w, (a, b) in zip(words, spans)]
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

    def render(self, tail_seconds: float = 0.5, noise_db: float = -60.0,
               max_seconds: float | None = None) -> tuple[np.ndarray, list[Word]]:
        """Stereo float32 ``[2, S]`` and the words sorted by start time; ``max_seconds`` cuts the
        conversation there (a word that would end later is left out of the words)."""
        seconds = self.end + tail_seconds if max_seconds is None else min(self.end + tail_seconds, max_seconds)
        total = round(seconds * SAMPLE_RATE)
        audio = self.rng.standard_normal(size=(2, total), dtype=np.float32)
        audio *= 10 ** (noise_db / 20)
        for channel, s0, clip in self.clips:
            if s0 < total:
                audio[channel, s0 : s0 + len(clip)] += clip[: total - s0]
        np.clip(audio, -1.0, 1.0, out=audio)
        words = [w for w in self.words if w.end <= total / SAMPLE_RATE]
        return audio, sorted(words, key=lambda w: (w.start, w.speaker))


def alignment_json(words: list[Word], meta: dict | None = None) -> dict:
    """The moshi-finetune alignment file body (plus our optional ``meta``); times kept exact."""
    body: dict = {"alignments": [[w.text, [w.start, w.end], w.speaker] for w in words]}
    if meta:
        body["meta"] = meta
    return body
