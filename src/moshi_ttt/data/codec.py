"""Mimi, the frozen audio codec: loaded with moshi's own loaders, encoding both channels at once.

Sources (``load_mimi``):

- ``tiny``: a random-init Mimi of :data:`TINY_MIMI_CONFIG` built by ``get_mimi(None, cfg)``,
  for tests and the demo; its codebooks are given random centroids at the scale of the
  latents they quantize (a random-init codebook is all zeros and yields constant codes);
- a local ``.safetensors`` file (with ``mimi_config.json`` beside it when not the real Mimi),
  or a directory holding one (our ``save_mimi`` layout, or a copy of a Moshi hub repo);
- a hub repo id such as ``kyutai/moshiko-pytorch-bf16``: only Mimi's files are fetched,
  named by the repo's ``config.json`` as ``CheckpointInfo`` names them (``CheckpointInfo``
  itself would also fetch the 7B LM weights).

Long conversations are encoded in Mimi's streaming mode, chunk by chunk, so memory does not
grow with the conversation (Mimi is causal: streaming and one-shot encoding agree).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.quantization.core_vq import ResidualVectorQuantization
from moshi.quantization.vq import ResidualVectorQuantizer

from moshi_ttt.data.shards import FRAME_RATE, NUM_STREAMS, sha256_file

CODEBOOKS_PER_CHANNEL = (NUM_STREAMS - 1) // 2  # 8: Moshi's channel, then the user's
MIMI_WEIGHTS = "mimi.safetensors"
MIMI_CONFIG = "mimi_config.json"


def _tiny_config() -> dict:
    cfg = copy.deepcopy(loaders._mimi_config)
    dim = 64
    cfg["seanet"].update(dimension=dim, n_filters=8)
    cfg["quantizer"].update(
        dimension=32, n_q=CODEBOOKS_PER_CHANNEL, bins=64, input_dimension=dim, output_dimension=dim
    )
    cfg["transformer"].update(
        d_model=dim,
        num_heads=4,
        num_layers=2,
        dim_feedforward=128,
        input_dimension=dim,
        output_dimensions=[dim],
    )
    return cfg


# Same architecture as the real Mimi (24 kHz in, 12.5 Hz out, 8 codebooks), 0.59 M parameters and
# 64 bins per codebook, matching ``card: 64`` of conf/model/tiny.yaml.
TINY_MIMI_CONFIG = _tiny_config()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device}: CUDA is not available on this machine")
    return device


def _calibration_audio(seed: int, seconds: float = 4.0, batch: int = 4) -> torch.Tensor:
    """Tones, glides and noise bursts: a fixed, speech-like spread of inputs to scale codebooks."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * loaders.SAMPLE_RATE)) / loaders.SAMPLE_RATE
    f0 = 80 + 300 * torch.rand(batch, 1, generator=g)
    glide = 1 + 0.5 * torch.sin(2 * math.pi * torch.rand(batch, 1, generator=g) * t)
    voiced = sum(torch.sin(2 * math.pi * k * f0 * glide * t) / k for k in range(1, 6))
    envelope = (torch.sin(2 * math.pi * (0.5 + 3 * torch.rand(batch, 1, generator=g)) * t) > 0).float()
    noise = torch.randn(batch, t.numel(), generator=g) * torch.rand(batch, 1, generator=g)
    return (0.3 * voiced * envelope + 0.1 * noise).unsqueeze(1)


@torch.no_grad()
def init_random_codebooks(mimi: MimiModel, seed: int = 0) -> None:
    """Give every codebook random centroids (fixed seed) at the scale of its input residuals.

    Level by level: the residual left by the previous codebooks on a calibration signal gives
    the mean and spread of the next codebook's random centroids, so every level uses many codes.
    """
    g = torch.Generator().manual_seed(seed)
    latent = mimi._encode_to_unquantized_latent(_calibration_audio(seed).to(next(mimi.parameters()).device))
    for rvq in (m for m in mimi.quantizer.modules() if isinstance(m, ResidualVectorQuantizer)):
        residual = rvq.input_proj(latent)
        vq: ResidualVectorQuantization = rvq.vq
        for layer in vq.layers:
            vectors = layer.project_in(layer._rearrange_input(residual)).reshape(-1, layer._codebook.dim)
            mean, std = vectors.mean(0), vectors.std(0).clamp(min=1e-6)
            codebook = layer._codebook
            centroids = mean.cpu() + std.cpu() * torch.randn(codebook.embedding_sum.shape, generator=g)
            codebook.embedding_sum.copy_(
                centroids.to(codebook.embedding_sum) * codebook.cluster_usage[:, None]
            )
            codebook._initialized.fill_(1)
            codebook._cached_initialized = False
            codebook._embedding = None
            residual = residual - layer.decode(layer.encode(residual))


def build_tiny_mimi(
    config: dict | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> MimiModel:
    """A random-init Mimi built by moshi's ``get_mimi``; same seed, same weights and codes."""
    config = copy.deepcopy(config or TINY_MIMI_CONFIG)
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, config, device="cpu", num_codebooks=CODEBOOKS_PER_CHANNEL)
    init_random_codebooks(mimi, seed)
    return mimi.to(resolve_device(device)).eval()


def save_mimi(mimi: MimiModel, config: dict, directory: str | Path) -> Path:
    """``mimi.safetensors`` + ``mimi_config.json``: what ``load_mimi(directory)`` reads back."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in mimi.state_dict().items()}
    save_file(state, str(directory / MIMI_WEIGHTS))
    (directory / MIMI_CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def _locate_local(path: Path) -> tuple[Path, dict | None]:
    """(weights, config or None for the real Mimi) of a file or directory."""
    if path.is_dir():
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        names = [MIMI_WEIGHTS, config.get("mimi_name", loaders.MIMI_NAME)]
        weights = next((path / n for n in names if (path / n).exists()), None)
        if weights is None:
            raise FileNotFoundError(f"mimi={path}: no {' or '.join(names)} in this directory")
        config_file = path / MIMI_CONFIG
        if not config_file.exists() and config.get("mimi_config_name"):
            config_file = path / config["mimi_config_name"]
    else:
        weights, config_file = path, path.with_name(MIMI_CONFIG)
    if not loaders._is_safetensors(weights):
        raise ValueError(f"mimi={weights}: expected a .safetensors file")
    mimi_config = json.loads(config_file.read_text()) if config_file.exists() else None
    return weights, mimi_config


def _locate_hub(repo: str, revision: str | None) -> tuple[Path, dict | None]:
    try:
        names = {}
        try:
            names = json.loads(Path(loaders.hf_get("config.json", repo, revision=revision)).read_text())
        except Exception:  # noqa: BLE001 - legacy repos have no config.json: the real Mimi's names apply
            pass
        weights = Path(loaders.hf_get(names.get("mimi_name", loaders.MIMI_NAME), repo, revision=revision))
        mimi_config = None
        if names.get("mimi_config_name"):
            mimi_config = json.loads(
                Path(loaders.hf_get(names["mimi_config_name"], repo, revision=revision)).read_text()
            )
    except Exception as exn:  # noqa: BLE001 - hub errors come in many types; the user needs the repo
        raise FileNotFoundError(
            f"mimi={repo}: could not fetch Mimi from the hub ({type(exn).__name__}: {exn}); "
            "offline? pass a local .safetensors path or directory instead"
        ) from exn
    return weights, mimi_config


def locate_mimi(source: str | Path, revision: str | None = None) -> tuple[Path | None, dict | None]:
    """(weights or None for ``tiny``, config or None for the real Mimi's) of a Mimi source."""
    source = str(source)
    if source == "tiny":
        return None, copy.deepcopy(TINY_MIMI_CONFIG)
    path = Path(source).expanduser()
    if path.exists():
        return _locate_local(path)
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"mimi={source}: no such file or directory, and not a hub repo id (org/name)")
    return _locate_hub(source, revision)


def codebook_size(source: str | Path, revision: str | None = None) -> int:
    """Bins per codebook of a Mimi source: the LM's ``card`` must equal it."""
    _, config = locate_mimi(source, revision)
    return int((config or loaders._mimi_config)["quantizer"]["bins"])


def mimi_fingerprint(source: str | Path, seed: int = 0, revision: str | None = None) -> dict:
    """What identifies the codes a source produces (resume refuses to mix two codecs)."""
    weights, config = locate_mimi(source, revision)
    if weights is None:
        return {"source": "tiny", "seed": seed, "config": config}
    return {"source": str(source), "weights_sha256": sha256_file(weights), "config": config}


def load_mimi(
    source: str | Path = "tiny",
    device: str | torch.device = "auto",
    seed: int = 0,
    revision: str | None = None,
) -> MimiModel:
    """A frozen Mimi in eval mode that emits 8 codebooks per channel at 12.5 Hz."""
    device = resolve_device(device)
    weights, config = locate_mimi(source, revision)
    if weights is None:
        mimi = build_tiny_mimi(config, seed=seed, device=device)
    else:
        try:
            mimi = loaders.get_mimi(weights, config, device=device, num_codebooks=CODEBOOKS_PER_CHANNEL)
        except Exception as exn:  # noqa: BLE001 - shape mismatches and bad files raise several types
            raise ValueError(f"mimi={source}: cannot load {weights} ({exn})") from exn
    if mimi.frame_rate != FRAME_RATE or mimi.sample_rate != loaders.SAMPLE_RATE:
        raise ValueError(
            f"mimi={source}: {mimi.sample_rate} Hz -> {mimi.frame_rate} Hz, expected 24000 -> 12.5"
        )
    if mimi.num_codebooks != CODEBOOKS_PER_CHANNEL:
        raise ValueError(f"mimi={source}: {mimi.num_codebooks} codebooks, expected {CODEBOOKS_PER_CHANNEL}")
    for p in mimi.parameters():
        p.requires_grad_(False)
    return mimi.eval()


def num_frames(num_samples: int, frame_size: int = 1920) -> int:
    """Frames Mimi emits for ``num_samples`` samples (a partial last frame counts)."""
    return math.ceil(num_samples / frame_size)


class StereoEncoder:
    """Encodes batches of ``[2, S]`` conversations into int16 ``[16, T]`` codes.

    Both channels of every conversation go through Mimi as one batch of ``2 B`` mono signals;
    rows 0-7 of the result are channel 0 (Moshi), rows 8-15 channel 1 (the user), as in
    moshi-finetune. Shorter conversations are zero-padded on the right, which a causal codec
    ignores, and their codes are cut back to their own length.
    """

    def __init__(self, mimi: MimiModel, chunk_seconds: float | None = None):
        self.mimi = mimi
        self.device = next(mimi.parameters()).device
        self.frame_size = int(mimi.frame_size)
        if chunk_seconds is None:  # CPU convolutions are memory-bound: small chunks stay in cache
            chunk_seconds = 60.0 if self.device.type == "cuda" else 1.0
        self.chunk = max(1, round(chunk_seconds * mimi.frame_rate)) * self.frame_size

    @torch.no_grad()
    def encode(self, conversations: list[np.ndarray]) -> list[np.ndarray]:
        if not conversations:
            return []
        for i, c in enumerate(conversations):
            if c.ndim != 2 or c.shape[0] != 2 or c.shape[1] == 0:
                raise ValueError(f"conversation {i}: expected [2, S>0] audio, got {c.shape}")
        lengths = [c.shape[1] for c in conversations]
        total = num_frames(max(lengths), self.frame_size) * self.frame_size
        batch = torch.zeros(len(conversations) * 2, 1, total, dtype=torch.float32)
        for i, c in enumerate(conversations):
            batch[2 * i : 2 * i + 2, 0, : c.shape[1]] = torch.from_numpy(c)
        parts = []
        with self.mimi.streaming(batch.shape[0]):
            for start in range(0, total, self.chunk):  # only one chunk at a time on the device
                parts.append(self.mimi.encode(batch[..., start : start + self.chunk].to(self.device)).cpu())
        codes = torch.cat(parts, dim=-1).reshape(len(conversations), 2 * CODEBOOKS_PER_CHANNEL, -1)
        out = []
        for i, n in enumerate(lengths):
            out.append(codes[i, :, : num_frames(n, self.frame_size)].numpy().astype(np.int16))
        return out
