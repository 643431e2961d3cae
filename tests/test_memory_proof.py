"""`make memory-proof` end to end at toy size: every stage runs and the table has every row.

Recall accuracy and late loss themselves are tested in tests/test_eval.py (moshi_ttt.eval.recall)."""

from __future__ import annotations

import json

import pytest

from moshi_ttt.memory_proof import main


@pytest.mark.slow
def test_memory_proof_runs_every_variant(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--demo-data", str(tmp_path / "no-demo"), "--base-steps", "4",
                 "--variant-steps", "6", "--train-samples", "16", "--pretrain-samples", "8", "--test-samples", "4",
                 "--batch-size", "2", "--pretrain-delays", "8", "--delay", "40"]) == 0
    result = json.loads((tmp_path / "memory_proof.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["frozen base", "post_attention", "pre_attention",
                                                     "cache_replacement", "hybrid"]
    for r in result["rows"]:
        assert 0.0 <= r["recall_in_window"] <= 1.0 and 0.0 <= r["recall_accuracy"] <= 1.0
    assert result["in_window_delay_frames"] == 8 and result["delay_frames"] == 40
    assert "| pre_attention |" in capsys.readouterr().out


def test_memory_proof_rejects_a_delay_inside_the_window(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--delay", "16", "--window", "32"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--pretrain-delays", "31", "--window", "32"])
