"""``python -m moshi_ttt.serve MODEL``: talk to a trained model with moshi's full-duplex server.

MODEL: an export directory, a hub repo id holding one, a run directory or a checkpoint (see
``moshi_ttt.serving.model``). The server is moshi's own (``moshi.server``: websocket
``/api/chat``, Opus audio both ways, Moshi's text as it is spoken) with the TTT model inside,
its Mimi and its tokenizer; the TTT memory is carried through a conversation and reset for
each new connection. ``--static none`` serves the websocket only (moshi's web UI is a
download from the hub; ``--static DIR`` serves a local copy).

Example (after ``make demo``)::

    python -m moshi_ttt.serve outputs/runs/demo --static none --port 8998
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from moshi_ttt.serving.args import (
    add_model_args,
    add_sampling_args,
    device_of,
    load_from_args,
    sampling_kwargs,
)

logger = logging.getLogger("moshi_ttt.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    add_model_args(p)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--static", default=None,
                   help="web UI directory; 'none' for the websocket only (default: moshi's UI from the hub)")
    p.add_argument("--cfg-coef", type=float, default=1.0, help="classifier-free guidance (moshi's --cfg-coef)")
    p.add_argument("--seed", type=int, default=42424242, help="sampling seed (moshi's server default)")
    add_sampling_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    from moshi_ttt.serving.server import build_app, make_state, static_path

    try:
        if not 0 < args.port < 65536:
            raise ValueError(f"--port={args.port} must be in 1..65535")
        device = device_of(args)
        sampling = sampling_kwargs(args)
        static = static_path(args.static)
        loaded = load_from_args(args, device)
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    from aiohttp import web

    from moshi_ttt.serving.model import lm_gen_kwargs

    torch.manual_seed(args.seed)
    with torch.no_grad():
        state = make_state(loaded.lm, loaded.mimi, loaded.tokenizer, device, lm_gen_kwargs(loaded, sampling),
                           args.cfg_coef)
        state.warmup()
        app = build_app(state, static)
        logger.info("serving %s on ws://%s:%d/api/chat%s", args.model, args.host, args.port,
                    "" if static is None else f" (web UI: http://{args.host}:{args.port})")
        web.run_app(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
