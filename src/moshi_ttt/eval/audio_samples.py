"""Hear the model change as it trains: a short generated continuation, logged as audio every N steps.

At the end of a validation run (every ``every_n_steps`` optimizer steps at most), the first
held-out conversation of that validation run gives a prompt: its first ``prompt_frames`` frames are
teacher-forced, then the model runs free with LMGen (TTT memory carried) up to ``frames`` frames
in all (``moshi_ttt.eval.generate``). Mimi decodes Moshi's side (left) and the user's (right);
the result goes to ``RUN_DIR/audio_samples/stepNNNNNNNN.wav`` with its text (``.json``) and to
W&B as audio captioned with Moshi's text, when a W&B logger is attached.

Every rank generates (same number of forward steps, so ZeRO-3's gathered parameters line up);
only rank 0 writes and logs. Enable with ``callbacks=[default,audio_samples]`` (conf/callbacks/audio_samples.yaml).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

from moshi_ttt.eval.audio import conversation_audio, user_codes_of, write_wav
from moshi_ttt.eval.generate import generate_and_track

logger = logging.getLogger(__name__)


class AudioSamplesCallback(L.Callback):
    def __init__(self, mimi: str | None, tokenizer: str | None, every_n_steps: int = 500, prompt_frames: int = 63,
                 frames: int = 188, temp: float = 0.8, temp_text: float = 0.7, top_k: int = 250,
                 top_k_text: int = 25, seed: int = 0, out_dir: str | None = None):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.audio_samples.every_n_steps={every_n_steps} must be >= 1")
        if not 1 <= prompt_frames < frames:
            raise ValueError(f"callbacks.audio_samples: need 1 <= prompt_frames ({prompt_frames}) < frames ({frames})")
        if not mimi or not tokenizer:
            raise ValueError("callbacks.audio_samples.mimi and .tokenizer must name the model's Mimi and tokenizer "
                             "(a path, a hub repo id, or mimi=tiny)")
        self.mimi_source, self.tokenizer_source = str(mimi), str(tokenizer)
        self.every_n_steps, self.prompt_frames, self.frames = every_n_steps, prompt_frames, frames
        self.sampling = {"temp": temp, "temp_text": temp_text, "top_k": top_k, "top_k_text": top_k_text}
        self.seed = seed
        self.out_dir = out_dir
        self._mimi = self._tokenizer = None
        self._prompt: torch.Tensor | None = None
        self._last_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Load Mimi and the tokenizer before any training: a wrong path fails here, naming the key."""
        from moshi_ttt.data.alignment import load_text_tokenizer
        from moshi_ttt.data.codec import load_mimi

        if self._mimi is not None:
            return
        try:
            self._mimi = load_mimi(self.mimi_source, device="cpu")
        except (FileNotFoundError, ValueError) as exn:
            raise ValueError(f"callbacks.audio_samples.mimi: {exn}") from exn
        try:
            self._tokenizer = load_text_tokenizer(self.tokenizer_source)
        except (FileNotFoundError, ValueError) as exn:
            raise ValueError(f"callbacks.audio_samples.tokenizer: {exn}") from exn

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and isinstance(batch, dict) and "codes" in batch:
            self._prompt = batch["codes"][0, :, : self.prompt_frames].detach().cpu()

    def _due(self, step: int) -> bool:
        return step > 0 and (self._last_step is None or step - self._last_step >= self.every_n_steps)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if trainer.sanity_checking or self._prompt is None or not self._due(step):
            return
        self._last_step = step
        sample = self.generate(pl_module.model, self._prompt)
        if trainer.is_global_zero:
            self.write(trainer, step, sample)

    @torch.no_grad()
    def generate(self, model, prompt: torch.Tensor) -> dict:
        """{audio [2, S], text, timeline} of a continuation of ``prompt`` ([17, P])."""
        was_training = model.training
        model.eval()
        try:
            vocab = self._tokenizer.get_piece_size()
            timeline = generate_and_track(
                model, prompt, self.frames, prompt_frames=min(self.prompt_frames, prompt.shape[1]),
                window_frames=self.frames, seed=self.seed, user="silence", **self.sampling,
                text_pieces=lambda t: self._tokenizer.id_to_piece(t) if 0 <= t < vocab else "")
        finally:
            model.train(was_training)
        audio = conversation_audio(self._mimi, timeline.audio_tokens, user_codes_of(timeline, prompt))
        free = [t for t in timeline.text_tokens[timeline.prompt_frames:] if t not in (0, 3) and 0 <= t < vocab]
        text = "".join(self._tokenizer.id_to_piece(t) for t in free).replace("\u2581", " ").strip()
        return {"audio": audio, "text": text, "summary": timeline.summary()}

    def write(self, trainer, step: int, sample: dict) -> Path:
        root = Path(self.out_dir or Path(trainer.default_root_dir) / "audio_samples")
        root.mkdir(parents=True, exist_ok=True)
        wav = write_wav(root / f"step{step:08d}.wav", sample["audio"])
        (root / f"step{step:08d}.json").write_text(json.dumps(
            {"step": step, "text": sample["text"], "prompt_frames": self.prompt_frames, "frames": self.frames,
             "phase": sample["summary"].get("final_phase")}, indent=2))
        caption = f"step {step}: {sample['text'][:200]}"
        for lg in trainer.loggers:
            if hasattr(lg, "log_audio"):  # Lightning's WandbLogger
                lg.log_audio("val/audio_sample", [sample["audio"].T], step=step, caption=[caption],
                             sample_rate=[24000])
        logger.info("audio sample at step %d -> %s (%s)", step, wav, caption)
        return wav
