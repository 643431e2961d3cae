"""moshi's full-duplex server with a TTT model: a real websocket client on localhost (aiohttp +
sphn Opus), as the web UI talks to it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import sphn
import torch

from serve_model import make_trained_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # streamed frames are tiny: one thread is fastest
SR = 24000
FRAME = 1920  # 80 ms
# Seconds streamed per conversation: 10 s is ~1 min of CPU on a loaded 2-core machine (3 connections).
SECONDS = float(os.environ.get("MOSHI_TTT_SERVE_TEST_SECONDS", 4))


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 5))
    envelope = (np.sin(2 * np.pi * 2.5 * t) > -0.2).astype(np.float32)
    return (0.25 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


async def _converse(url: str, audio: np.ndarray, stop_after_s: float | None = None, quiet_s: float = 5.0):
    """Stream ``audio`` as Opus in 80 ms packets while receiving; returns the received messages once
    audio for all but the last few frames came back and the server then stayed quiet for ``quiet_s``.
    ``stop_after_s``: drop the connection (no closing handshake) after that much audio."""
    import aiohttp

    received: list[bytes] = []
    writer, reader = sphn.OpusStreamWriter(SR), sphn.OpusStreamReader(SR)
    target = (len(audio) // FRAME - 3) * FRAME
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url)
        first = await ws.receive(timeout=120)  # the server answers one conversation at a time
        assert first.type == aiohttp.WSMsgType.BINARY and first.data == b"\x00", "no handshake"

        async def receive():
            samples = 0
            while True:
                try:
                    msg = await ws.receive(timeout=quiet_s if samples >= target else 120)
                except asyncio.TimeoutError:
                    return
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return
                received.append(msg.data)
                if msg.data[0] == 1:
                    samples += reader.append_bytes(msg.data[1:]).size

        receiver = asyncio.create_task(receive())
        limit = len(audio) if stop_after_s is None else int(stop_after_s * SR)
        for start in range(0, limit, FRAME):
            packet = writer.append_pcm(audio[start : start + FRAME])
            if packet:
                await ws.send_bytes(b"\x01" + packet)
            await asyncio.sleep(0.01)
        if stop_after_s is not None:
            ws._response.connection.transport.abort()  # the client vanishes mid-stream
            receiver.cancel()
            return received
        await receiver
        await ws.close()
    return received


class _ServerThread:
    """The aiohttp app on its own event loop and thread (as ``web.run_app`` would run it)."""

    def __init__(self, app):
        import threading

        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            with torch.no_grad():
                self.loop.run_until_complete(self.runner.setup())
                site = web.TCPSite(self.runner, "127.0.0.1", 0)
                self.loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]
                ready.set()
                self.loop.run_forever()
                self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(60)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(60)


def _decode(messages: list[bytes]) -> tuple[np.ndarray, list[str]]:
    reader = sphn.OpusStreamReader(SR)
    pcm, text = [], []
    for m in messages:
        assert m[0] in (1, 2), f"unexpected message kind {m[0]}"
        if m[0] == 1:
            pcm.append(reader.append_bytes(m[1:]))
        else:
            text.append(m[1:].decode("utf-8"))
    return (np.concatenate(pcm) if pcm else np.zeros(0, np.float32)), text


def _ttt_states(lm) -> list:
    return [m._streaming_state.ttt for m in lm.modules()
            if getattr(m, "_streaming_state", None) is not None and getattr(m._streaming_state, "ttt", None) is not None]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    root = tmp_path_factory.mktemp("serve")
    conf = os.path.join(os.path.dirname(__file__), "..", "conf")

    def compose_cfg(*overrides):
        with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_root={root}", *overrides])

    return make_trained_run(compose_cfg, root)


def test_server_streams_resets_ttt_per_connection_and_survives_a_dropped_client(served):
    from moshi_ttt.serving.model import lm_gen_kwargs, load
    from moshi_ttt.serving.server import build_app, make_state

    loaded = load(str(served))
    audio = _speechlike(SECONDS)
    starts: list[tuple] = []  # TTT positions and weights at the first step of each connection
    state = make_state(loaded.lm, loaded.mimi, loaded.tokenizer, "cpu", lm_gen_kwargs(loaded, {"use_sampling": False}))
    step = state.lm_gen.step

    def recording_step(codes, *a, **k):
        ttt = _ttt_states(loaded.lm)
        if ttt and ttt[0].positions == (0,):
            starts.append((ttt[0].positions, {n: w.clone() for n, w in ttt[0].weights.items()},
                           {n: w.detach().clone() for n, w in ttt[0].init.items()}))
        return step(codes, *a, **k)

    state.lm_gen.step = recording_step
    server = _ServerThread(build_app(state, None))
    url = f"http://127.0.0.1:{server.port}/api/chat"
    try:
        t0 = time.perf_counter()
        first = asyncio.run(_converse(url, audio))
        elapsed = time.perf_counter() - t0
        after_first = _ttt_states(loaded.lm)[0].positions
        asyncio.run(_converse(url, audio, stop_after_s=1.0))
        second = asyncio.run(_converse(url, audio))
    finally:
        server.stop()
    pcm, text = _decode(first)
    frames = len(audio) // FRAME
    # Audio back for (nearly) every frame sent: moshi skips the first input frame and LMGen's
    # delays hold back one more; Opus may still hold a packet.
    assert frames - 4 <= pcm.size / FRAME <= frames, (pcm.size / FRAME, frames)
    assert np.isfinite(pcm).all() and np.abs(pcm).max() > 0
    assert text and all(isinstance(t, str) for t in text)
    # In order: each frame's audio precedes its text, so the stream opens with audio.
    assert first[0][0] == 1
    # The memory advanced through the first conversation ...
    assert after_first[0] >= frames - 4
    # ... and each of the three connections (the dropped one included) started from the trained initial memory.
    assert len(starts) == 3
    for positions, weights, init in starts:
        assert positions == (0,)
        for name, w in weights.items():
            torch.testing.assert_close(w[0], init[name].float())
    # Same audio, greedy decoding, fresh state: the third conversation repeats the first exactly.
    assert second == first
    print(f"{SECONDS:.0f} s conversation served in {elapsed:.1f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter imports torch + moshi and loads the model (~60 s on a loaded 2-core CPU)
def test_serve_command_answers_a_websocket_client(served):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moshi_ttt.serve", str(served), "--static", "none",
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        messages = asyncio.run(_converse(f"http://127.0.0.1:{port}/api/chat", _speechlike(2.0, seed=1)))
        pcm, _ = _decode(messages)
        assert pcm.size >= 15 * FRAME
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_command_names_a_missing_model(tmp_path):
    from moshi_ttt.serving.serve_cli import main

    assert main([str(tmp_path / "nope"), "--static", "none"]) == 2


def test_a_hub_model_that_cannot_be_fetched_is_named(monkeypatch, capsys):
    """MODEL as a hub repo id goes through huggingface_hub (offline here: the error names the repo)."""
    import huggingface_hub.constants

    from moshi_ttt.serving.serve_cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["someone/ttt-export-that-is-not-cached", "--static", "none"]) == 2
    assert "someone/ttt-export-that-is-not-cached" in capsys.readouterr().err
