"""bench/gpu_check.py: its --dry-run runs every part's code on the CPU at tiny sizes, so the GPU
check cannot rot; its first row says whether moshi runs on this torch; a failing case is
reported and the rest still runs; the total budget skips what it cannot fit, with the reason; a
resume that does not continue the run is caught."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_exits_2_and_points_to_the_dry_run(gpu_check, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err
    assert not (tmp_path / "gpu_check.json").exists()


def _report(tmp_path, gpu_check) -> tuple[dict, dict]:
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("\n| ") == len(report["rows"]) + 1  # the same table: header + one line per row
    order = [p.number for p in gpu_check.PARTS]
    parts = [r["part"] for r in report["rows"]]
    assert parts == sorted(parts, key=order.index)  # in the registry's order (of value)
    assert parts[0] == gpu_check.RUNTIME  # the first row: moshi on this torch
    return report, {(r["part"], r["case"]): r for r in report["rows"]}


RUNTIME_CASE = "moshi import + tiny LMModel forward"


def _check_runtime_row(gpu_check, report: dict) -> None:
    """The first row: the versions in this environment and a tiny LMModel forward that worked."""
    import moshi
    import numpy

    first = report["rows"][0]
    assert (first["part"], first["case"]) == (gpu_check.RUNTIME, RUNTIME_CASE)
    assert first["status"] in ("PASS", "WARN"), first
    v = first["data"]["versions"]
    assert (v["torch"], v["moshi"], v["numpy"]) == (torch.__version__, moshi.__version__, numpy.__version__)
    assert first["measured"] == f"torch {torch.__version__}, moshi {moshi.__version__}, numpy {numpy.__version__}"
    assert first["reference"].startswith("moshi wants torch ")
    assert first["data"]["logits_shape"] == [1, 8, 32, 64] and first["data"]["forward_s"] > 0
    # fla-core is needed on CUDA only: its absence alone does not make the dry run's row a WARN
    assert (first["status"] == "WARN") == any(m != "fla-core" for m in first["data"]["missing"])


def test_dry_run_of_the_model_parts_and_a_failing_variant_does_not_stop_the_rest(gpu_check, tmp_path, capsys):
    """Parts 1 (train step vs planner) and 5 (LMGen), after part 0 (moshi on this torch), which runs
    whatever --parts says; ++ttt.ttt_layer_attention_window=0 breaks hybrid only (its local
    attention window), the other variants ignore it."""
    P = gpu_check
    assert (P.RUNTIME, P.TRAIN_STEP, P.STREAM) == (0, 1, 5)
    rc = gpu_check.main(["--dry-run", "--parts", "5", "1", "--variants", "none", "pre_attention", "hybrid",
                         "--overrides", "++ttt.ttt_layer_attention_window=0", "--peak-tflops", "0.1", "--jobs", "2",
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1  # a FAIL row fails the check
    report, rows = _report(tmp_path, gpu_check)
    _check_runtime_row(gpu_check, report)
    assert [p["part"] for p in report["parts"]] == [0, 1, 5]  # in the registry's order, not --parts'
    ok = ("PASS", "WARN")

    assert rows[(1, "hybrid (build)")]["status"] == "FAIL" and "window=0" in rows[(1, "hybrid (build)")]["note"]
    assert rows[(5, "hybrid")]["status"] == "FAIL" and "window=0" in rows[(5, "hybrid")]["note"]
    assert [r["status"] for r in report["rows"]].count("FAIL") == 2, report["rows"]
    assert rows[(1, "none")]["status"] == "SKIP" and "nothing to train" in rows[(1, "none")]["note"]
    # 1: one optimizer step per length, beside the planner's estimate for the same shape
    plans = []
    for T in (32, 64, 96):
        r = rows[(1, f"pre_attention T={T}")]
        assert r["status"] in ok, r
        assert math.isfinite(r["data"]["loss"]) and r["data"]["step_s"] > 0
        assert r["data"]["time_ratio"] > 0 and "time" in r["ratio"]  # the peak was given: a planned step time
        assert r["data"]["peak_gib"] is None  # no CUDA allocator on the CPU
        plans.append(r["data"]["plan"]["memory_gib"])
    assert 0 < plans[0] < plans[1] < plans[2]
    # 5: LMGen streams every variant that builds, without and with CUDA graphs (both eager on the
    # CPU: the same tokens); the TTT branch's zero-initialised output is opened so that it counts
    for case in ("none", "pre_attention"):
        r = rows[(5, case)]
        assert r["status"] in ok, r
        assert r["data"]["eager_frames_per_s"] > 0 and r["data"]["graphs_frames_per_s"] > 0
        assert r["data"]["graphs_token_agreement"] == 1.0 and "real time" in r["ratio"]
    assert rows[(5, "none")]["data"]["opened_adapters"] == 0 < rows[(5, "pre_attention")]["data"]["opened_adapters"]
    assert "pre_attention T=96" in out and "summary:" in out and "2 FAIL" in out


def test_dry_run_of_the_kernel_parts(gpu_check, tmp_path, capsys):
    """Parts 2 (TTT layer FLOP rate), 3 (the delta engine) and 4 (FlexAttention vs chunked SDPA), after
    part 0: all pass, fla's rows say why they do not run here, exit 0; the budget is shared out in order."""
    assert (gpu_check.TTT_LAYER, gpu_check.DELTA, gpu_check.ATTENTION) == (2, 3, 4)
    rc = gpu_check.main(["--dry-run", "--parts", "2", "3", "4", "--peak-tflops", "0.1", "--budget-s", "400",
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    report, rows = _report(tmp_path, gpu_check)
    assert rc == 0, out
    _check_runtime_row(gpu_check, report)
    fla = [r for r in report["rows"] if r["part"] == gpu_check.DELTA and "fla" in r["case"]]
    assert {r["status"] for r in report["rows"][1:] if r not in fla} == {"PASS"}
    # 3: without CUDA every fla row is a SKIP that says why; the torch engine's speed row runs
    assert len(fla) == 4 and all(r["status"] == "SKIP" and "fla does not run here" in r["note"] for r in fla)
    assert rows[(3, "speed torch T=64")]["data"]["frames_per_s"] > 0
    # 4: FlexAttention (eager on the CPU) as close to an fp32 reference as chunked SDPA, prefix slots too
    for case in ("equal T=96", "equal T=96 + prefix slots"):
        r = rows[(4, case)]
        assert r["data"]["flex"] <= 2 * r["data"]["sdpa"] + 1e-5
        assert r["data"]["flex_vs_sdpa_out"] < 1e-5
    assert rows[(4, "speed T=96")]["data"]["flex_s"] > 0 and rows[(4, "speed T=96")]["data"]["sdpa_s"] > 0
    # 2: the TTT layer's FLOP rate as a share of the given peak: the delta rule and Sun et al.'s rule
    for inner in ("delta", "linear", "mlp"):
        r = rows[(2, f"{inner} T=64")]
        assert r["data"]["tflops"] > 0 and r["data"]["flops_per_token"] > 0 and "% of peak" in r["ratio"]
    assert f"summary: {7 + (report['rows'][0]['status'] == 'PASS')} PASS" in out
    # the budget: each part gets its own (600 s on a dry run) cut to what the 400 s total has left
    log = report["parts"]
    assert [p["part"] for p in log] == [0, 2, 3, 4] and report["budget_s"] == 400
    assert 370 < log[0]["allotted_s"] <= 400  # what reading the GPU's peak (importing Lightning) left
    for before, part in zip(log, log[1:]):
        assert part["allotted_s"] <= before["allotted_s"] - before["used_s"] + 1e-6
    assert sum(p["used_s"] for p in log) < report["wall_s"] + 1


def test_the_budget_skips_what_it_cannot_fit_with_the_reason(gpu_check, tmp_path, capsys):
    """--budget-s: part 0 runs first; part 4 (flex vs sdpa) needs at least 30 s of the 20 s the check
    had, so its cases are SKIP rows that say so (not a failure: exit 0)."""
    attention = gpu_check.PART_BY_NUMBER[gpu_check.ATTENTION]
    assert attention.min_s > 20
    rc = gpu_check.main(["--dry-run", "--parts", "4", "--budget-s", "20", "--peak-tflops", "0.1",
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    report, rows = _report(tmp_path, gpu_check)
    assert rc == 0, out
    _check_runtime_row(gpu_check, report)
    skipped = [r for r in report["rows"] if r["part"] == gpu_check.ATTENTION]
    assert [r["case"] for r in skipped] == ["equal T=96", "equal T=96 + prefix slots", "speed T=96"]
    for r in skipped:
        assert r["status"] == "SKIP" and "budget of 20 s (--budget-s) is spent" in r["note"], r
        assert f"needs at least {attention.min_s:.0f} s" in r["note"]
    assert report["parts"][1] == {"part": 4, "name": "flex vs sdpa", "skipped": skipped[0]["note"][len("not run: "):]}
    assert report["summary"]["SKIP"] == 3 and "budget 20 s" in report["machine"]


def _write_metrics(run_dir: Path, attempts: list[dict[int, float]], grad_norm: float = 0.5) -> None:
    for version, losses in enumerate(attempts):
        path = run_dir / "csv" / f"version_{version}" / "metrics.csv"
        path.parent.mkdir(parents=True)
        lines = ["step,train/loss,train/grad_norm"] + [f"{s},{v},{grad_norm}" for s, v in losses.items()]
        path.write_text("\n".join(lines) + "\n")


def test_resume_comparison_catches_a_diverging_or_restarted_run(gpu_check, tmp_path):
    straight = {s: 5.0 - 0.1 * s for s in range(4)}
    _write_metrics(tmp_path / "straight", [straight])
    _write_metrics(tmp_path / "resumed", [{0: 5.0, 1: 4.9}, {2: 4.8, 3: 4.7}])
    status, msg, data = gpu_check.compare_resume(tmp_path / "straight", tmp_path / "resumed", 4, 2, 1e-6)
    assert status == "PASS" and msg == "" and data["first_resumed_step"] == 2, msg

    _write_metrics(tmp_path / "diverged", [{0: 5.0, 1: 4.9}, {2: 4.8, 3: 4.71}])
    status, msg, _ = gpu_check.compare_resume(tmp_path / "straight", tmp_path / "diverged", 4, 2, 1e-6)
    assert status == "FAIL" and "step 3" in msg

    # the second attempt started from scratch: same losses, but it did not resume
    _write_metrics(tmp_path / "restarted", [{0: 5.0, 1: 4.9}, dict(straight)])
    status, msg, _ = gpu_check.compare_resume(tmp_path / "straight", tmp_path / "restarted", 4, 2, 1e-6)
    assert status == "FAIL" and "no resume" in msg

    # nothing reaches the adapters: equal losses, but it does not train
    _write_metrics(tmp_path / "frozen", [straight], grad_norm=0.0)
    status, msg, _ = gpu_check.compare_resume(tmp_path / "frozen", tmp_path / "resumed", 4, 2, 1e-6)
    assert status == "FAIL" and "grad_norm" in msg


@pytest.mark.slow
def test_dry_run_of_part_6_trains_and_resumes_exactly_under_ddp_and_zero3(gpu_check, tmp_path, capsys):
    """train.py experiment=smoke under trainer=ddp_sim and deepspeed_cpu_sim (ZeRO-3): a stop at
    step 2 and a resume give the straight run's losses."""
    assert gpu_check.LIGHTNING == 6
    rc = gpu_check.main(["--dry-run", "--parts", "6", "--trainers", "ddp", "deepspeed_zero3", "--budget-s", "900",
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, out
    _check_runtime_row(gpu_check, report)
    rows = {r["case"]: r for r in report["rows"] if r["part"] == gpu_check.LIGHTNING}
    assert set(rows) == {"trainer=ddp_sim", "trainer=deepspeed_cpu_sim trainer.strategy.config.zero_optimization.stage=3"}
    for r in rows.values():
        assert r["status"] == "PASS", r
        assert r["data"]["max_rel_diff"] <= 1e-6 and r["data"]["first_resumed_step"] == 2
        assert len(r["data"]["losses"]) == 4
