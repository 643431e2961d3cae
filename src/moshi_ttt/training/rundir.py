"""The run directory: one live run per name, leftovers cleaned, a checkpoint that loads to resume from.

A run directory is reused on purpose (the same ``run_name`` resumes the same run), so what
keeps two runs apart lives here: a lock held by the launching process for the whole run
(``flock``: the kernel drops it when the holder dies, so a lock is never stale), names for the
jobs of a Hydra multirun, and the choice of the checkpoint to resume from when the newest one
is damaged.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

logger = logging.getLogger("moshi_ttt")

LOCK_NAME = ".run.lock"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class RunDirLocked(RuntimeError):
    """Another live process trains into this run directory."""


def is_launching_process() -> bool:
    """True in the process that owns the run (rank 0 of node 0, or a plain single process).

    DDP/DeepSpeed ranks started by Lightning, torchrun or srun see a non-zero rank in their
    environment; they share the run directory of the process that holds the lock.
    """
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "0")
        if value.strip() not in ("", "0"):
            return False
    return True


def _slurm_job() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.run.lock`` whose file says who holds it.

    ``acquire`` refuses while another live process holds it. The one exception is a SLURM
    requeue of the same job: its predecessor was stopped by SLURM, and a lock it still seems
    to hold (a node lost with its NFS lease not yet expired) is taken over.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": _slurm_job(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for attempt in range(2):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.holder()
                if attempt == 0 and me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"]:
                    logger.warning("run directory %s: lock held by an earlier run of this SLURM job %s (pid %s on %s, "
                                   "requeued): taking it over", self.run_dir, me["slurm_job"], holder.get("pid"),
                                   holder.get("host"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunDirLocked(
                    f"run directory {self.run_dir} is in use by another live run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}, SLURM job {holder.get('slurm_job')}): "
                    "choose another run_name, or stop that run. If that process no longer exists (its node was "
                    f"lost), delete {self.path}."
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_temp_files(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Delete what interrupted checkpoint writes left behind (``.NAME.tmp-PID`` files, ``.NAME.tmp``
    DeepSpeed directories). Call it only while holding the run's lock: a live run's are not leftovers."""
    removed = []
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        if re.fullmatch(r"\..+\.tmp(-\d+)?", path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    if removed:
        logger.info("removed %d leftover temporary checkpoint file(s): %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """The checkpoint's contents (a DeepSpeed checkpoint directory: its client state), or an error."""
    import torch

    path = Path(path)
    if path.is_dir():
        tag = (path / "latest").read_text().strip() if (path / "latest").exists() else "checkpoint"
        states = sorted((path / tag).glob("*model_states.pt"))
        if not states:
            raise FileNotFoundError(f"{path}: no {tag}/*model_states.pt (incomplete DeepSpeed checkpoint)")
        return torch.load(states[0], map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False)


def newest_loadable_checkpoint(candidates: list[Path], checkpoint_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The first of ``candidates`` that loads, else the newest other checkpoint in the directory
    that does; every file that fails is named in the log. None when there is no checkpoint at
    all; an error when there are some and none loads (starting fresh would drop the run)."""
    directory = Path(checkpoint_dir)
    tried: set[Path] = set()
    failed: list[str] = []
    others = sorted((p for p in directory.glob("*.ckpt") if p.exists()), key=lambda p: p.stat().st_mtime,
                    reverse=True) if directory.is_dir() else []
    for path in [*candidates, *others]:
        if path in tried or not path.exists():
            continue
        tried.add(path)
        try:
            content = load_checkpoint_file(path)
        except Exception as exn:  # noqa: BLE001 - any unreadable checkpoint is passed over, and named
            logger.warning("checkpoint %s cannot be loaded (%s: %s): trying the next newest", path,
                           type(exn).__name__, str(exn)[:200])
            failed.append(f"{path} ({type(exn).__name__})")
            continue
        if candidates and path != candidates[0]:
            logger.warning("%s is missing or damaged: resuming from %s (the newest checkpoint that loads)",
                           candidates[0], path)
        return path, content
    if failed:
        raise RuntimeError(f"no checkpoint in {directory} loads: {', '.join(failed)}. Remove them to start this "
                           "run afresh, or point ckpt_path at a good copy")
    return None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def name_multirun_job(cfg) -> str | None:
    """In a Hydra multirun, give each job its own run name (``<run_name>-<its overrides>``)
    unless the job's overrides set ``run_name`` themselves; returns the new name, if any.

    Sweep jobs otherwise share one run directory, and the second job "resumes" the first one's
    finished checkpoint. The name derives from the overrides, not the job number, so a
    requeued or re-launched sweep job finds its own run again.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main (tests, notebooks)
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    overrides = [o for o in hydra_cfg.overrides.task if _override_key(o) not in ("ckpt_path",)]
    if any(_override_key(o) == "run_name" for o in overrides):
        return None
    suffix = re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(overrides)).strip("._-") or f"job{hydra_cfg.job.num}"
    if len(suffix) > 96:
        import hashlib

        suffix = f"{suffix[:80]}-{hashlib.blake2b(suffix.encode(), digest_size=4).hexdigest()}"
    name = f"{cfg.run_name}-{suffix}"
    logger.info("multirun job %s: run_name=%s", hydra_cfg.job.num, name)
    cfg.run_name = name
    return name
