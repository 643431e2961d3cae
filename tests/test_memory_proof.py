"""`make memory-proof` end to end at toy size: every stage runs and the table has every row.

Recall scoring itself is tested in tests/test_eval.py (moshi_ttt.eval.recall) and the pairs
set in tests/test_data_recall.py."""

from __future__ import annotations

import json

import pytest

from moshi_ttt.memory_proof import VARIANTS, main


@pytest.mark.slow
def test_memory_proof_runs_every_variant(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--base-steps", "4", "--variant-steps", "6", "--pretrain-samples", "16",
                 "--train-samples", "16", "--test-samples", "4", "--batch-size", "2", "--base-batch-size", "4"]) == 0
    result = json.loads((tmp_path / "memory_proof.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["frozen base", *VARIANTS]
    for r in result["rows"]:
        assert 0.0 <= r["recall_in_window"] <= 1.0 and 0.0 <= r["recall_accuracy"] <= 1.0
        assert r["chance"] == pytest.approx(1 / 32)
    assert result["beyond_distance"][0] > result["window_frames"] > result["in_window_distance"][1]
    assert "| cache_replacement_kv_slots |" in capsys.readouterr().out


def test_memory_proof_rejects_layouts_that_miss_the_point(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--gap", "16", "--window", "32"])  # "beyond" inside the window
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--inside-gap", "20", "--window", "32"])  # "inside" beyond it
