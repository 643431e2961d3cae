"""Part STREAM: streaming inference with moshi's LMGen, eager and CUDA-graphed, against real time."""

from __future__ import annotations

import contextlib
import time

import torch

from .common import (
    STREAM,
    VARIANTS,
    Events,
    Job,
    Row,
    Settings,
    build_variant,
    compose,
    error,
    fmt_gib,
    free_memory,
    is_oom,
    peak_gib,
    reset_peak,
    sync,
)


def real_time_fps() -> float:
    """Frames of audio per second (Mimi's frame rate)."""
    from moshi_ttt.constants import FRAME_RATE

    return FRAME_RATE


def open_adapters(model) -> int:
    """Give every zero-initialised adapter tensor (output projections, slot gates) small random
    values, as training would: at init a TTT branch adds exactly nothing, so a memory that streams
    wrongly could not change a single token. Returns how many tensors were opened."""
    opened = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
                opened += 1
    return opened


def stream(model, s: Settings, user: torch.Tensor, graphs: bool) -> tuple[float, torch.Tensor]:
    """Greedy LMGen over ``user`` frames ([N, 1, K, 1]); (frames/s over the frames after the
    warm-up, [1 + dep_q, frames out] tokens). ``graphs``: moshi's default CUDA graphs (LMGen
    graphs its text and depth steps on CUDA), else inside ``no_cuda_graph``."""
    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_cuda_graph

    gen = LMGen(model, use_sampling=False)
    outputs = []
    with contextlib.nullcontext() if graphs else no_cuda_graph(), gen.streaming(1):
        for i in range(s.stream_warmup):  # graph capture happens here
            outputs.append(gen.step(user[i]))
        sync(s.device)
        t0 = time.perf_counter()
        for i in range(s.stream_warmup, len(user)):
            outputs.append(gen.step(user[i]))
        sync(s.device)
        dt = time.perf_counter() - t0
    tokens = torch.cat([o for o in outputs if o is not None], dim=-1)[0]
    if not ((tokens[0] >= 0).all() and (tokens[0] < model.text_card).all()
            and (tokens[1:] >= 0).all() and (tokens[1:] < model.card).all()):
        raise ValueError("LMGen produced out-of-range tokens")
    return (len(user) - s.stream_warmup) / dt, tokens.cpu()


def part_streaming(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    """Each variant built as moshi_ttt.serving builds it, its adapters opened: greedy LMGen without
    CUDA graphs, then with them (moshi's default, which the server uses): frames/s of both, and the
    graphed tokens must equal the eager ones (a streaming state that a replayed graph does not
    update would change them)."""
    for case in cases:
        name = case["id"]
        events.write(event="start", case=name)
        model = None
        try:
            cfg = compose([*s.model_overrides, *VARIANTS[name]])
            model = build_variant(cfg, s.device, serving=True)
            opened = open_adapters(model)
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            g = torch.Generator().manual_seed(0)
            user = torch.randint(0, model.card, (s.stream_warmup + s.stream_frames, 1, model.n_q - model.dep_q, 1),
                                 generator=g).to(s.device)
            reset_peak(s.device)
            eager_fps, eager = stream(model, s, user, graphs=False)
            data = {"eager_frames_per_s": eager_fps, "frames": s.stream_frames, "opened_adapters": opened}
            try:
                graph_fps, graphed = stream(model, s, user, graphs=True)
                data["graphs_frames_per_s"] = graph_fps
                same = graphed.shape == eager.shape and bool((graphed == eager).all())
                agree = float((graphed == eager).float().mean()) if graphed.shape == eager.shape else 0.0
                data["graphs_token_agreement"] = agree
                graph_note = "" if same else f"CUDA-graphed tokens differ from eager ({100 * agree:.0f} % agree)"
            except Exception as exn:  # noqa: BLE001 - the eager numbers still stand
                graph_fps, same, graph_note = None, False, f"CUDA graphs: {error(exn)}"
            fps = graph_fps if same and graph_fps is not None else eager_fps  # what serves correctly
            data["frames_per_s"] = fps
            real_time = real_time_fps()
            status = "FAIL" if not same else ("PASS" if fps >= real_time else "WARN")
            graphs_on = s.device.startswith("cuda")
            measured = f"eager {eager_fps:.1f}" + (f", graphs {graph_fps:.1f}" if graph_fps is not None else "")
            notes = [graph_note] if graph_note else []
            if status == "WARN":
                notes.append("below real time")
            notes.append(f"{eager.shape[-1]} frames out, peak {fmt_gib(peak_gib(s.device))}"
                         + ("" if graphs_on else ", no CUDA graphs on CPU"))
            events.row(Row(STREAM, name, status, measured + " frames/s", f"real time {real_time:g}",
                           f"{fps / real_time:.2f}x real time", "; ".join(notes), data))
        except Exception as exn:  # noqa: BLE001
            events.row(Row(STREAM, name, "OOM" if is_oom(exn) else "FAIL", note=error(exn)))
        del model
        free_memory()
        events.write(event="done", case=name)
