"""moshi's own full-duplex server (``moshi.server``) with a moshi-ttt model inside.

``moshi.server`` runs its command line when it is imported (its last statement calls
``main()``), so it cannot be imported as a library. :func:`moshi_server_module` executes the
installed file itself, minus that final call, as the module ``moshi.server``: its
``ServerState`` (the websocket protocol on ``/api/chat``: handshake 0x00, Opus audio 0x01, text
0x02; Mimi encode -> ``LMGen.step`` -> Mimi decode) and everything else stay moshi's code.

Per connection, ``ServerState.handle_chat`` resets the streaming state of Mimi and of LMGen,
which includes every TTT layer's fast weights (they live in moshi's streaming state): each
conversation starts from the trained initial memory and carries it to its end.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import sys
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_MODULE = "moshi.server"


def _is_main_call(node: ast.stmt) -> bool:
    """A top-level ``main()`` or ``with ...: main()`` statement."""
    def calls_main(n: ast.AST) -> bool:
        return isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "") == "main"

    if calls_main(node):
        return True
    return isinstance(node, ast.With) and all(calls_main(b) for b in node.body)


def moshi_server_module() -> ModuleType:
    """moshi's installed ``server.py`` as a module, without running its command line."""
    loaded = sys.modules.get(_MODULE)
    if loaded is not None and hasattr(loaded, "ServerState"):
        return loaded
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        raise ImportError("moshi.server not found: is the moshi package installed?")
    source = open(spec.origin, encoding="utf-8").read()
    tree = ast.parse(source, filename=spec.origin)
    kept = [n for n in tree.body if not _is_main_call(n)]
    if len(kept) == len(tree.body):
        logger.debug("%s has no import-time main() call", spec.origin)
    tree.body = kept
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    try:
        exec(compile(tree, spec.origin, "exec"), module.__dict__)  # noqa: S102 - moshi's own file
    except BaseException:
        sys.modules.pop(_MODULE, None)
        raise
    if not hasattr(module, "ServerState"):
        raise ImportError(f"{spec.origin}: no ServerState (an incompatible moshi version?)")
    return module


def make_state(lm, mimi, tokenizer, device: str, lm_gen_kwargs: dict | None = None, cfg_coef: float = 1.0):
    """moshi's ``ServerState`` for our model (a subclass only where moshi assumes CUDA)."""
    server = moshi_server_module()

    class TTTServerState(server.ServerState):
        def warmup(self):
            # moshi's warmup primes CUDA (it ends with torch.cuda.synchronize()); a CPU has nothing to prime.
            if torch.device(self.device).type == "cuda":
                super().warmup()

    return TTTServerState("moshi", mimi, tokenizer, lm, cfg_coef, device, **(lm_gen_kwargs or {}))


def static_path(static: str | None) -> str | None:
    """moshi's web UI: ``None`` downloads it (as ``moshi.server`` does), ``"none"`` serves no UI."""
    if static == "none":
        return None
    if static is not None:
        return static
    import tarfile
    from pathlib import Path

    from huggingface_hub import hf_hub_download

    try:
        dist_tgz = Path(hf_hub_download("kyutai/moshi-artifacts", "dist.tgz"))
    except Exception as exn:  # noqa: BLE001 - offline: the UI is optional
        raise FileNotFoundError(f"could not download moshi's web UI ({type(exn).__name__}: {exn}); pass "
                                "--static none (websocket only) or --static DIR") from exn
    dist = dist_tgz.parent / "dist"
    if not dist.exists():
        with tarfile.open(dist_tgz, "r:gz") as tar:
            tar.extractall(path=dist_tgz.parent, filter="data")
    return str(dist)


def build_app(state, static: str | None = None):
    """The aiohttp application: moshi's ``/api/chat`` handler, and its web UI when given a directory."""
    import os

    from aiohttp import web

    app = web.Application()
    app.router.add_get("/api/chat", state.handle_chat)
    if static is not None:
        async def handle_root(_):
            return web.FileResponse(os.path.join(static, "index.html"))

        app.router.add_get("/", handle_root)
        app.router.add_static("/", path=static, follow_symlinks=True, name="static")
    return app
