"""Every bench in bench/ runs in its tiny mode and prints every row of its table, so a bench that a
change breaks (a renamed config key, a new signature) fails here and not in front of the next person
who runs ``make bench``; and a row that fails makes its bench exit non-zero.

bench/gpu_check.py has its own test (tests/test_gpu_check.py, ``--dry-run``). A new bench is one
line of ``BENCHES``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: (script in bench/, its tiny-mode arguments, a regex that each printed row of its table matches, rows)
BENCHES = [
    ("ttt_layer.py", ["--tiny"], r"^(linear|mlp)\s+tiny 4x16\s+\d+\s+\d+\.\d+", 4),
    ("long_sequence.py", ["--tiny"], r"^(vanilla|local|ttt=).*\s\d+\s+\d+\.\d+\s+\d+\.\d+", 31),  # 1 row skipped
    ("data.py", ["--tiny"], r"^\| (Mimi encode only|prepare|TokenSequenceDataset) .*\| [\d,.]+ (audio s|frames)/s",
     4),
    ("streaming.py", ["--tiny"], r"^\| [a-z_ ()]+ \| \d+\.\d \| \d+\.\d \| \d+\.\d \| \d+\.\d \| (yes|no) \|$", 6),
    ("memory_capacity.py", ["--tiny"], r"^\| linear \| (true|false) \| 0\.02 \| 0\.3 \| \d\.\d{3} \|$", 2),
    ("kv_slots_probe.py", ["--tiny"], r"^\| layers\.\d \| (-?\d\.\d\d ?){4} \|", 4),  # 2 layers x 2 sets
    # --no-peak: its peak-RSS subprocesses (one per row) would add half a minute; one thread, as the others
    ("delta_rule.py", ["--quick", "--no-peak", "--threads", "1"], r"^(delta|scan b=16?)\s+\d+\s+(~\s+)?\d+\.\d+s\s", 6),
]


@pytest.mark.parametrize(("script", "args", "row", "rows"), BENCHES, ids=[b[0] for b in BENCHES])
def test_bench_runs_in_its_tiny_mode(script, args, row, rows):
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    printed = [line for line in proc.stdout.splitlines() if re.search(row, line)]
    assert len(printed) == rows, f"{script}: {len(printed)} of {rows} rows:\n{proc.stdout}"
    assert "FAILED" not in proc.stdout
    assert "is deprecated" not in proc.stderr, f"{script} uses a deprecated config key:\n{proc.stderr[-3000:]}"


def _bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_threads():
    """Benches set the thread count for their own process; give this one its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_row_with_a_bad_config_fails_the_long_sequence_bench(capsys, torch_threads):
    bench = _bench("long_sequence")
    # the bug this test was written for: an old key beside its new name
    bad = bench.Variant("old keys", bench.build_ttt("cache_replacement", 24, layers=[0, 1]))
    rows = bench.variants(bench.TINY_WINDOW, bench.TINY_LONG_WINDOW)
    assert bench.main(["--tiny", "--lengths", "16", "--variants", "old keys", "local W=8"], rows=[*rows, bad]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^old keys\s+16 FAILED: .*ConfigError: ttt\.layers=\[0, 1\]: deprecated name", out, re.M), out
    assert re.search(r"^local W=8\s+16\s+\d+\.\d+", out, re.M), out  # the other rows still run


def test_a_long_sequence_row_runs_in_its_own_process():
    bench = _bench("long_sequence")
    args = bench.parse_args(["--tiny"])
    local = next(v for v in bench.rows_for(args) if v.name == "local W=8")
    got = bench.run_in_subprocess(local, 16, args)
    assert got.keys() == {"wall", "cpu", "peak_bytes"}, got


def _raise(*_args, **_kwargs):
    raise RuntimeError("a broken row")


@pytest.mark.parametrize(("name", "patched", "args"), [
    ("ttt_layer", ["measure"], ["--tiny"]),
    ("data", ["bench_encoder", "bench_prepare", "bench_loader"], ["--tiny"]),
    ("streaming", ["build"], ["--tiny", "--variants", "hybrid"]),
    ("memory_capacity", ["recall"], ["--tiny"]),
])
def test_a_failing_row_fails_the_bench(name, patched, args, monkeypatch, capsys, torch_threads):
    bench = _bench(name)
    for attr in patched:
        monkeypatch.setattr(bench, attr, _raise)
    assert bench.main(args) == 1
    assert "FAILED: RuntimeError: a broken row" in capsys.readouterr().out


def test_vanillas_extrapolation_is_a_non_negative_quadratic():
    fit = _bench("long_sequence").quadratic_fit
    exact = {T: 0.5 + 1e-3 * T + 1e-6 * T * T for T in (188, 750, 3750, 7500)}
    f = fit(exact)
    assert (f.a, f.b, f.c) == pytest.approx((0.5, 1e-3, 1e-6), rel=1e-6) and f.worst < 1e-9
    # a steeper than quadratic tail made the two-point fit's linear part negative; here it stays >= 0
    f = fit({188: 0.1, 750: 0.3, 3750: 3.0, 7500: 14.0})
    assert min(f.a, f.b, f.c) >= 0 and f.c > 0 and f.linear(22500) > 0 and f(22500) > 14.0
    assert fit({16: 1.0, 32: 1.0, 48: 1.0}).c == 0  # no T^2 growth at all
    assert fit({3750: 3.0, 7500: 14.0}) is None  # two points cannot pin three coefficients


@pytest.mark.parametrize(("points", "says"), [
    ({188: 0.1, 750: 0.3, 3750: 3.0, 7500: 14.0}, r"^\(est\.\) vanilla at T=22500: ~\d+\.\d s cpu.*\n.*cannot beat"),
    ({188: 4.7, 750: 1.0, 3750: 10.5, 7500: 21.0}, r"^no estimate .* misses a measurement by more than 20 %"),
    ({1000: 1.0, 2000: 2.0, 4000: 4.0, 8000: 8.0}, r"^\(est\.\) vanilla at T=22500: ~22\.5 s.*\n.*no T\^2 term"),
    ({3750: 3.0, 7500: 14.0}, r"^no estimate .* needs at least 3"),
])
def test_vanillas_extrapolation_says_when_the_measurements_cannot_give_one(points, says, capsys):
    bench = _bench("long_sequence")
    bench.print_extrapolation(bench.quadratic_fit(points), points, 22500, "cpu")
    out = capsys.readouterr().out
    assert re.search(says, out, re.M), out
    assert not re.search(r"~-", out)  # never a negative time or speed-up
