"""A real single-node Slurm cluster on localhost for the tests (Debian's slurm-wlm + munge).

What it relies on was measured on this machine kind (../shared/slurm-notes.md): slurm.conf
without systemd or cgroups, a fake node with 8 "GPUs" (/dev/null symlinks) so the production
sbatch scripts' ``--gpus-per-node=8`` is accepted unmodified (room for 4 jobs at once), and ``scontrol update
StartTime=now`` to skip the 120 s hold Slurm puts on a requeued job. The cluster lives in its own
directory with its own ports; ``stop()`` ends every daemon it started, by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
# Fake GPUs (and CPUs): the production scripts ask for 8 GPUs and 96 CPUs per node; room for 4
# such jobs at once lets the tests run their jobs side by side.
GPUS = 32
MUNGE_PID = Path("/run/munge/munged.pid")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, no apt-get): the tests skip with this reason."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get when missing (needs root)."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-500:]}")


def _munge_works() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return enc.returncode == 0 and b"Success" in dec.stdout


def _wait_dead(pid: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class SlurmCluster:
    """slurmctld + slurmd (+ munged when none runs) under ``root``; clients talk to it through
    ``self.env`` (SLURM_CONF), which the jobs inherit."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[int] = []
        self._started_munge = False

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the Slurm tests run the daemons as root (SlurmUser=root); not root here")
        ensure_installed()
        self._start_munge()
        for d in ("state", "spool", "log", "dev"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for i in range(GPUS):
            link = self.root / "dev" / f"gpu{i}"
            if not link.exists():
                link.symlink_to("/dev/null")  # gres files must be character devices
        self._write_conf()
        for daemon in (["slurmctld", "-i"], ["slurmd"]):
            proc = subprocess.run(daemon, env=self.env, capture_output=True, text=True)
            if proc.returncode != 0:
                self.stop()
                raise RuntimeError(f"{daemon[0]} did not start: {proc.stderr}\n{self.logs()}")
        for name in ("slurmctld.pid", "slurmd.pid"):
            self._pids.append(int(self._wait_for_file(self.root / name).read_text().split()[0]))
        self._wait_idle()
        return self

    def stop(self) -> None:
        """Cancel every job, then end the daemons this cluster started, by pid."""
        if self.conf.exists() and self._pids:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
            end = time.monotonic() + 20
            while time.monotonic() < end and self.squeue():
                time.sleep(0.5)
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            _wait_dead(pid)
        self._pids.clear()
        if self._started_munge and MUNGE_PID.exists():
            pid = int(MUNGE_PID.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
                _wait_dead(pid)
            except ProcessLookupError:
                pass
            self._started_munge = False

    def _start_munge(self) -> None:
        if _munge_works():
            return  # a munged already serves this machine: share it, never stop it
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists() or key.stat().st_size == 0:
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True, capture_output=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
        self._started_munge = True
        end = time.monotonic() + 10
        while not _munge_works():
            if time.monotonic() > end:
                raise RuntimeError("munged started but does not answer")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r, n = self.root, self.node
        self.conf.write_text(f"""ClusterName=moshittt
SlurmctldHost={n}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName={n} NodeAddr=127.0.0.1 CPUs=384 RealMemory=20000 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes={n} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text(f"NodeName={n} Name=gpu File={r}/dev/gpu[0-{GPUS - 1}]\n")

    @staticmethod
    def _wait_for_file(path: Path, timeout: float = 15.0) -> Path:
        end = time.monotonic() + timeout
        while not (path.exists() and path.read_text().strip()):
            if time.monotonic() > end:
                raise RuntimeError(f"{path} did not appear")
            time.sleep(0.05)
        return path

    def _wait_idle(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the node never became idle\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*.log")))

    # ---- clients -----------------------------------------------------------------------
    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, **kw)

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        proc = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def squeue(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def release_requeued(self, job_id: int) -> bool:
        """A requeued job waits ~120 s (BeginTime): start it now. True when it was waiting."""
        info = self.job(job_id)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            return True
        return False

    def wait(self, job_id: int, timeout: float, release: bool = True, tick=None,
             done=("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        """Wait for a final state, releasing requeue holds on the way (and calling ``tick``,
        which may tend other jobs, at every poll)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            if release:
                self.release_requeued(job_id)
            if tick:
                tick()
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")
