"""Every GPU path of moshi-ttt on one CUDA GPU, within a total time budget, as one table.

Why: the CPU test suite cannot see bf16 training, FlexAttention, NCCL/DeepSpeed on CUDA, the
planner's memory figures or streaming speed; a user's first cluster job is where those break.
This runs each of them once at the product's real shapes and prints what it measured. The parts
run in the order of their value (``PARTS`` below, the registry; a new part is one entry there):

0. ``runtime``: the first row. Do moshi and this torch go together? The versions of torch,
   moshi, numpy (and of triton, lightning, hydra-core, omegaconf, deepspeed, webdataset,
   fla-core), the requirements of moshi's that this environment breaks (moshi 0.2.13 asks for
   torch < 2.10 and numpy < 2.3), and one forward of a tiny LMModel (moshi's 7B config shrunk)
   on the device: finite logits of the right shape. It runs whatever ``--parts`` says.
1. ``7B train step``: a Moshi-7B-shaped model (moshi's own 7B config, random weights, nothing
   downloaded) built on the meta device and materialised in bf16 on the GPU, each TTT variant
   inserted at its default layers (``install_ttt``), one optimizer step (forward + backward +
   AdamW, bf16 autocast, activation checkpointing) at 188, 3 750 and 22 500 frames: peak
   ``torch.cuda.max_memory_allocated`` and step time beside ``moshi_ttt.plan``'s estimate for the
   same shape (planner total minus its fixed CUDA/NCCL overhead; step time at the planner's MFU).
2. ``TTT layer``: ``moshi_ttt.ttt.TTTLayer`` at Moshi's width (32 heads x 128) in bf16 autocast,
   the product's delta rule (``ttt.ttt_layer.kernel=auto``: fla on CUDA) and Sun et al.'s rule
   (linear, mlp): tokens/s and achieved TFLOP/s (matmul FLOPs counted by torch's FlopCounterMode
   on the torch engine, recompute included) as a share of the GPU's bf16 peak
   (``training.module.peak_flops``).
3. ``delta engine``: flash-linear-attention's delta-rule kernels against the plain-torch engine
   (``moshi_ttt.ttt.delta``) at 32 heads x 128 (+ the bias row): reads, final state and every
   gradient within bf16 tolerance (plain, gated, and fla's one-frame recurrent kernel as LMGen
   calls it), then forward + backward frames/s of each at 3 750 and 22 500 frames. fla's rows
   say SKIP, with the reason, where it does not run (no CUDA, not installed, the gated backward
   on a Triton that refuses it).
4. ``flex vs sdpa``: compiled FlexAttention against the chunked SDPA path of
   ``moshi_ttt.models.attention.local_attention``: equal on small cases (with and without prefix
   slots), then forward + backward speed at Moshi's shape (32 heads x 128, window 3000).
5. ``LMGen stream``: moshi's LMGen (greedy) on the 7B shape with each variant, built as
   ``moshi_ttt.serving`` builds it, its zero-initialised adapter outputs given random values (so
   that the memory changes tokens): frames/s without and with CUDA graphs (moshi's default, which
   the server uses) against real time (12.5), and the graphed tokens must equal the eager ones.
6. ``Lightning``: ``train.py experiment=smoke`` (CSV logger: no W&B) with trainer=gpu, ddp,
   deepspeed_zero2 and deepspeed_zero3 (NCCL, one GPU): it trains (finite losses, non-zero
   gradient norms), and a run stopped half-way and resumed logs the same per-step losses as an
   uninterrupted run.

Time: ``--budget-s`` (default 480) bounds the whole check. Each part runs in its own process
under its own budget (``Part.budget_s`` x ``--budget-scale``, cut to what the total has left);
a part is started only while the total has at least its ``Part.min_s`` left, else its cases
are SKIP rows that say so, and the check goes on to the next part that still fits. A case that
fails, runs out of memory or crashes its process is reported as FAIL/OOM and the rest still
runs. ``--dry-run`` runs the same code on the CPU at tiny sizes (tests/test_gpu_check.py runs
it in CI). Without CUDA and without ``--dry-run`` it exits 2. Exit 1 when a case FAILs, OOMs or
times out; WARN (planner off by more than 15 %, streaming below real time, a package of the
check missing) and SKIP do not fail it. The table is also written as ``gpu_check.json`` and
``gpu_check.md`` under ``--out``; on a lent machine with no network,
``bench/gpu_check_device.sh`` installs what the image lacks from ``.gpu-wheels`` and runs this.

    python bench/gpu_check.py                  # on a CUDA machine (make gpu-check)
    python bench/gpu_check.py --dry-run --out /tmp/gc
    python bench/gpu_check.py --parts 1 4 --variants pre_attention --overrides ttt.ttt_layer.num_heads=8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH.parent / "src") not in sys.path:  # this checkout's package, whatever the venv points to
    sys.path.insert(0, str(BENCH.parent / "src"))
if str(BENCH) not in sys.path:  # gpu_check_parts, when this file is loaded by its path (tests)
    sys.path.append(str(BENCH))

import torch  # noqa: E402
from gpu_check_parts.attention import part_attention  # noqa: E402
from gpu_check_parts.common import (  # noqa: E402
    ATTENTION,
    DEFAULT_BUDGET_S,
    DELTA,
    FAILING,
    LIGHTNING,
    PART_NAMES,
    REPO,
    RUNTIME,
    STATUSES,
    STREAM,
    TRAIN_STEP,
    TTT_LAYER,
    VARIANTS,
    Events,
    Job,
    Row,
    Settings,
    error,
    gib,
    log_tail,
)
from gpu_check_parts.delta import delta_cases, part_delta  # noqa: E402
from gpu_check_parts.lightning import TRAINERS, compare_resume, part_lightning  # noqa: E402, F401 - compare_resume: for tests
from gpu_check_parts.report import describe_machine, render_markdown, render_text  # noqa: E402
from gpu_check_parts.runtime import part_runtime  # noqa: E402
from gpu_check_parts.streaming import part_streaming  # noqa: E402
from gpu_check_parts.train_step import part_train_step  # noqa: E402
from gpu_check_parts.ttt_layer import part_ttt_layer  # noqa: E402


def make_settings(args: argparse.Namespace) -> Settings:
    """The sizes for this mode; the GPU's peak and memory are read here, once, so that workers
    need not import Lightning for them."""
    peak, peak_note = None, ""
    if args.peak_tflops is not None:
        peak = args.peak_tflops * 1e12
    else:
        try:  # the project and Lightning: if they do not import, RUNTIME's row says why
            from moshi_ttt.training.module import peak_flops

            peak = peak_flops()
        except Exception as exn:  # noqa: BLE001 - the check runs on without a peak
            peak_note = f"moshi_ttt.training.module.peak_flops: {error(exn)}"
            print(f"gpu_check: bf16 peak unknown ({peak_note})", file=sys.stderr, flush=True)
    memory = None if args.dry_run else gib(torch.cuda.get_device_properties(0).total_memory)
    variants, trainers = args.variants or list(VARIANTS), args.trainers or list(TRAINERS)
    budgets = {p.number: (600.0 if args.dry_run else p.budget_s) * args.budget_scale for p in PARTS}
    common = dict(budgets=budgets, budget_s=args.budget_s, peak_flops=peak, peak_note=peak_note)
    if args.dry_run:
        return Settings(
            dry_run=True, device="cpu", model_overrides=["model=tiny", "model.gradient_checkpointing=true",
                                                         *args.overrides],
            lengths=[32, 64, 96], variants=variants,
            attn_equal=dict(B=1, H=2, T=96, D=16, window=32), attn_speed=dict(H=2, D=16, window=32, lengths=[96]),
            ttt_heads=2, ttt_head_dim=16, ttt_lengths=[64], ttt_inners=["delta", "linear", "mlp"],
            delta_equal_T=40, delta_lengths=[64],
            trainers=trainers, train_steps=4, cut_step=2, resume_tol=1e-6 if args.resume_tol is None else args.resume_tol,
            concurrent_launches=2, stream_warmup=16, stream_frames=16, **common,
        )  # fmt: skip
    return Settings(
        dry_run=False, device="cuda", model_overrides=["model=moshiko_7b", *args.overrides],
        lengths=[188, 3750, 22500], variants=variants,
        attn_equal=dict(B=1, H=4, T=1000, D=64, window=256),
        attn_speed=dict(H=32, D=128, window=3000, lengths=[3750, 22500]),
        ttt_heads=32, ttt_head_dim=128, ttt_lengths=[3750, 22500], ttt_inners=["delta", "linear", "mlp"],
        delta_equal_T=300, delta_lengths=[3750, 22500],
        # bf16 autocast on CUDA: backward kernels with atomics (flash attention) are not bitwise
        # reproducible, so a resumed run may differ from a straight one by rounding.
        trainers=trainers, train_steps=8, cut_step=4, resume_tol=2e-3 if args.resume_tol is None else args.resume_tol,
        concurrent_launches=8, stream_warmup=16, stream_frames=48, gpu_memory_gib=memory, **common,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the parts' registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One part of the check. ``cases`` lists its cases (each a dict with a unique "id"; computed
    in the parent, also to name the SKIP rows of a part that does not run); ``run`` runs them in the
    worker process and writes one or more rows per case through ``Events`` (``start``, ``row``,
    ``done``); ``env`` adjusts the worker's environment. ``budget_s``: its own seconds on a GPU
    (--dry-run: 600), times --budget-scale; ``min_s``: it is started only while the total budget
    has that much left."""

    number: int
    name: str
    budget_s: float
    min_s: float
    cases: Callable[[Settings], list[dict]]
    run: Callable[[Settings, list[dict], Events, Job], None]
    env: Callable[[dict, Settings], None] | None = None


def _variant_cases(s: Settings) -> list[dict]:
    return [{"id": v} for v in s.variants]


def _attention_cases(s: Settings) -> list[dict]:
    T = s.attn_equal["T"]
    return ([{"id": f"equal T={T}", "kind": "equal", "prefix": False},
             {"id": f"equal T={T} + prefix slots", "kind": "equal", "prefix": True}]
            + [{"id": f"speed T={T}", "kind": "speed", "T": T} for T in s.attn_speed["lengths"]])


def _compile_flex(env: dict, s: Settings) -> None:
    """FlexAttention is compiled on CUDA, which moshi_ttt.models.attention.flex_available allows only
    without NO_TORCH_COMPILE."""
    if not s.dry_run:
        env.pop("NO_TORCH_COMPILE", None)


def _cuda_graphs(env: dict, s: Settings) -> None:
    env.pop("NO_CUDA_GRAPH", None)  # moshi's default (graphs on) is what the server runs


# In the order of their value: the runs follow this list, and so does the table.
PARTS: list[Part] = [
    Part(RUNTIME, "runtime", 40.0, 10.0, lambda s: [{"id": "moshi import + tiny LMModel forward"}], part_runtime),
    Part(TRAIN_STEP, "7B train step", 130.0, 40.0, _variant_cases, part_train_step),
    Part(TTT_LAYER, "TTT layer", 50.0, 15.0,
         lambda s: [{"id": f"{inner} T={T}", "inner": inner, "T": T} for inner in s.ttt_inners for T in s.ttt_lengths],
         part_ttt_layer),
    Part(DELTA, "delta engine", 60.0, 15.0, delta_cases, part_delta),
    Part(ATTENTION, "flex vs sdpa", 90.0, 30.0, _attention_cases, part_attention, _compile_flex),
    Part(STREAM, "LMGen stream", 80.0, 30.0, _variant_cases, part_streaming, _cuda_graphs),
    Part(LIGHTNING, "Lightning", 100.0, 60.0, lambda s: [{"id": t} for t in s.trainers], part_lightning),
]
PART_BY_NUMBER = {p.number: p for p in PARTS}
PART_NAMES.update({p.number: p.name for p in PARTS})  # common.part_name: the rows' and table's names
assert len(PART_BY_NUMBER) == len(PARTS), "two parts with one number"


# ---------------------------------------------------------------------------------------------
# orchestration: one worker process per part, budgets, crash recovery
# ---------------------------------------------------------------------------------------------
def run_worker(spec: dict) -> None:
    s = Settings(**{**spec["settings"], "budgets": {int(k): v for k, v in spec["settings"]["budgets"].items()}})
    part = PART_BY_NUMBER[spec["part"]]
    part.run(s, spec["cases"], Events(spec["events"]), Job(Path(spec["out_dir"]), spec["deadline"]))


def skip_rows(part: Part, cases: list[dict], why: str) -> list[Row]:
    return [Row(part.number, c["id"], "SKIP", note=f"not run: {why}") for c in cases]


def run_part(part: Part, s: Settings, out_dir: Path, budget: float, cut: str = "") -> list[Row]:
    """Run one part's cases in worker processes within ``budget`` seconds (``cut``: why it is less
    than the part's own). A worker that dies is restarted on the cases it had not reached; the case
    it was running is reported FAIL."""
    spent = f"part budget of {budget:.0f} s{cut} spent"
    deadline = time.monotonic() + budget
    remaining = part.cases(s)
    rows: list[Row] = []
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    env["NO_TORCH_COMPILE"] = "1"  # moshi's lazy torch.compile off, as in every make target
    if s.dry_run:
        env["OMP_NUM_THREADS"] = "1"  # tiny ops on a shared CPU: one thread is fastest
    if part.env is not None:
        part.env(env, s)
    n = part.number
    attempt = 0
    while remaining:
        left = deadline - time.monotonic()
        if left < 3:
            rows += skip_rows(part, remaining, spent)
            break
        events = Events(logs / f"part{n}-{attempt}.jsonl")
        events.path.unlink(missing_ok=True)  # a previous gpu_check's events in the same --out
        log = logs / f"part{n}-{attempt}.log"
        spec = {"part": n, "cases": remaining, "settings": asdict(s), "events": str(events.path),
                "out_dir": str(out_dir), "deadline": time.time() + left}
        spec_path = logs / f"part{n}-{attempt}.spec.json"
        spec_path.write_text(json.dumps(spec))
        timed_out = False
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], cwd=REPO, env=env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # LIGHTNING's worker takes its train.py runs down with it
                try:
                    rc = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                timed_out = True
        seen = events.read()
        started = [e["case"] for e in seen if e["event"] == "start"]
        done = {e["case"] for e in seen if e["event"] == "done"}
        rows += [Row(**e["row"]) for e in seen if e["event"] == "row"]
        for case in started:
            if case not in done:
                if timed_out:
                    rows.append(Row(n, case, "TIMEOUT", note=f"{spent} while running"))
                else:
                    rows.append(Row(n, case, "FAIL", note=f"worker died (exit {rc}): {log_tail(log)}"))
        remaining = [c for c in remaining if c["id"] not in started]
        if timed_out:
            rows += skip_rows(part, remaining, spent)
            break
        if rc == 0 and remaining:
            rows += [Row(n, c["id"], "FAIL", note=f"worker ended without running it: {log_tail(log)}")
                     for c in remaining]
            break
        if rc != 0 and not started:  # died before its first case: an import or setup error
            rows += [Row(n, c["id"], "FAIL", note=f"worker failed (exit {rc}): {log_tail(log)}") for c in remaining]
            break
        attempt += 1
    return rows


class Budget:
    """The whole check's seconds (--budget-s), shared by the parts in their order: each part gets
    its own budget cut to what is left, and is not started below its ``min_s``."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.deadline = time.monotonic() + total_s
        self.log: dict[int, dict] = {}  # part number -> seconds allotted and used, or why it was skipped

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, part: Part, s: Settings, out_dir: Path) -> list[Row]:
        left, own = self.left(), s.budgets[part.number]
        if left < part.min_s:
            why = (f"the check's budget of {self.total_s:.0f} s (--budget-s) is spent: {max(left, 0):.0f} s left, "
                   f"this part needs at least {part.min_s:.0f} s")
            self.log[part.number] = {"part": part.number, "name": part.name, "skipped": why}
            print(f"gpu_check: part {part.number} ({part.name}) not run: {why}", file=sys.stderr, flush=True)
            return skip_rows(part, part.cases(s), why)
        budget = min(own, left)
        cut = f" (of its {own:.0f} s: what --budget-s {self.total_s:.0f} left)" if budget < own else ""
        started = time.monotonic()
        try:
            rows = run_part(part, s, out_dir, budget, cut)
        except Exception as exn:  # noqa: BLE001 - the orchestration of one part must not stop the others
            rows = [Row(part.number, "(part)", "FAIL", note=error(exn))]
            traceback.print_exc()
        used = time.monotonic() - started
        self.log[part.number] = {"part": part.number, "name": part.name, "allotted_s": budget, "used_s": used}
        print(f"gpu_check: part {part.number} ({part.name}) took {used:.0f} s of {budget:.0f}; "
              f"{max(self.left(), 0):.0f} s of the check's {self.total_s:.0f} left", file=sys.stderr, flush=True)
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument("--parts", type=int, nargs="+", default=[p.number for p in PARTS], choices=list(PART_NAMES),
                        metavar="N", help="which parts, of " + ", ".join(f"{p.number} {p.name}" for p in PARTS)
                        + f" (default all; part {RUNTIME} always runs first; the runs follow this order)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole check: parts run in order of value while it lasts, the rest "
                             "are SKIP rows (default %(default)g)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="VARIANT",
                        help=f"of {list(VARIANTS)} (parts {TRAIN_STEP}, {STREAM}; default all)")
    parser.add_argument("--trainers", nargs="+", default=None, choices=list(TRAINERS), metavar="TRAINER",
                        help=f"of {list(TRAINERS)} (part {LIGHTNING}; default all)")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help=f"Hydra overrides for the model of parts {TRAIN_STEP} and {STREAM} "
                             "(e.g. ttt.ttt_layer.num_heads=8)")
    parser.add_argument("--out", default="outputs/gpu_check", help="directory for gpu_check.json/.md and logs")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's own time budget")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: moshi_ttt.training.module.peak_flops by device name, "
                             "or MOSHI_TTT_PEAK_FLOPS)")
    parser.add_argument("--resume-tol", type=float, default=None,
                        help=f"part {LIGHTNING}: largest relative per-step loss difference after a resume "
                             "(default 1e-6 on CPU, 2e-3 on CUDA)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="parts run at once (--dry-run only: on a GPU they would disturb each other's numbers)")
    parser.add_argument("--install-s", type=float, default=None,
                        help="seconds the install before this took (bench/gpu_check_device.sh): shown in the header")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        run_worker(json.loads(Path(args.worker).read_text()))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); this check needs one CUDA GPU. "
              "`python bench/gpu_check.py --dry-run` runs the same code on the CPU at tiny sizes.", file=sys.stderr)
        return 2
    if args.jobs < 1 or (args.jobs > 1 and not args.dry_run):
        parser.error("--jobs must be 1 on a GPU (parts running at once would disturb each other's numbers)")
    budget = Budget(args.budget_s)  # from here on, everything counts
    s = make_settings(args)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if p.number == RUNTIME or p.number in args.parts]
    header = describe_machine(s)
    print(f"gpu_check: {header}; budget {args.budget_s:.0f} s; parts in order "
          f"{[p.number for p in parts]}, their own budgets (s) { {p.number: round(s.budgets[p.number]) for p in parts} }; "
          f"logs in {out_dir / 'logs'}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    finished: dict[int, list[Row]] = {}
    lock = threading.Lock()

    def report(final: bool) -> tuple[list[Row], str, dict]:
        """gpu_check.json and .md with the parts finished so far (after each part, so that a call cut
        short still brings back the table up to there)."""
        rows = [row for p in parts for row in finished.get(p.number, [])]
        wall = time.perf_counter() - t0
        head = (f"{header}; budget {args.budget_s:.0f} s, took {wall:.0f} s"
                + (f" (+ install {args.install_s:.0f} s)" if args.install_s is not None else "")
                + ("" if final else f"; PARTIAL: parts {[p.number for p in parts if p.number not in finished]} to come"))
        summary = {s_: sum(r.status == s_ for r in rows) for s_ in STATUSES}
        (out_dir / "gpu_check.json").write_text(json.dumps(
            {"machine": head, "dry_run": s.dry_run, "final": final, "wall_s": wall, "budget_s": args.budget_s,
             "install_s": args.install_s, "parts": [budget.log[p.number] for p in parts if p.number in budget.log],
             "settings": asdict(s), "summary": summary, "rows": [asdict(r) for r in rows]}, indent=2))
        (out_dir / "gpu_check.md").write_text(render_markdown(rows, head))
        return rows, head, summary

    def run_one(part: Part) -> None:
        part_rows = budget.run(part, s, out_dir)
        with lock:
            finished[part.number] = part_rows
            report(final=False)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # parts one at a time on a GPU
        list(pool.map(run_one, parts))
    rows, header, summary = report(final=True)
    print(render_text(rows, header), end="")
    print("summary: " + ", ".join(f"{n} {k}" for k, n in summary.items() if n))
    return 1 if any(r.status in FAILING for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
