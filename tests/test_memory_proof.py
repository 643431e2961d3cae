"""`make memory-proof` end to end at toy size: every stage runs and the table has every row.

Recall scoring itself is tested in tests/test_eval.py (moshi_ttt.eval.recall) and the pairs
set in tests/test_data_recall.py."""

from __future__ import annotations

import json

import pytest

from moshi_ttt.memory_proof import VARIANTS, VARIANTS_WALL, delay_gap, gaps_within, lookup_reach, main


@pytest.mark.slow
def test_memory_proof_runs_every_variant(tmp_path, capsys, monkeypatch):
    assert main(["--out", str(tmp_path), "--window", "16", "--pairs", "2", "3", "--delays", "2", "3",
                 "--train-delay", "2", "--base-steps", "4", "--base-extend-steps", "3", "--extend-batch-size", "2",
                 "--variant-steps", "6", "--pretrain-samples", "16",
                 "--train-samples", "16", "--test-samples", "4", "--batch-size", "2", "--base-batch-size", "4",
                 "--jobs", "2"]) == 0  # the variants in two processes side by side
    result = json.loads((tmp_path / "memory_proof.json").read_text())
    names = ["frozen base", "oracle", *VARIANTS]
    assert [(r["model"], r["pairs"]) for r in result["rows"]] == [(n, p) for n in names for p in (2, 3)]
    for r in result["rows"]:
        for k in ("in", "2x", "3x"):
            assert 0.0 <= r[f"recall_{k}"] <= 1.0
        assert r["chance"] == pytest.approx(1 / 32) and r["late_loss_3x"] > 0
    assert result["delays"] == {"2x": 32, "3x": 48} and result["oracle_window"] > 48
    assert result["in_window_reach"] < 16 and set(result["timings"]) >= {"base", "base_extended", *VARIANTS}
    together = result["timings"][VARIANTS_WALL]
    assert together["jobs"] == 2 and together["variants"] == sorted(VARIANTS)
    assert (tmp_path / "recall_vs_delay.png").stat().st_size > 1000
    assert "| cache_replacement_kv_slots | 3 |" in capsys.readouterr().out
    assert result["recipes"]["cache_replacement"] == {"steps": 6, "mini_batch": 2}  # --variant-steps forces all
    assert (tmp_path / "memory_proof.md").read_text().count("\n| ") == 2 * len(names) + 2  # + header and rule
    # the analysis notebook shows this run: the recall-vs-delay plot and the table
    from test_notebook import execute_notebook, images, markdown

    nb_dir = tmp_path / "notebook"
    nb_dir.mkdir()
    nb = execute_notebook(nb_dir, monkeypatch, RUN_DIR=nb_dir / "no-run", EVAL_DIR=nb_dir / "no-eval",
                          DIAG_DIR=nb_dir / "no-diag", MEMORY_PROOF_DIR=tmp_path)
    assert images(nb, "plot_recall_vs_delay") == 1
    assert "| cache_replacement_kv_slots | 3 |" in markdown(nb, "plot_recall_vs_delay")


def test_delays_put_the_pairs_where_the_table_says():
    # the mean distance between a pair and its query is the delay: gap + 2 * pairs
    assert delay_gap(4, 32, 4) + 2 * 4 == 128 and delay_gap(8, 32, 8) + 2 * 8 == 256
    assert lookup_reach(8, 1) < 32 <= lookup_reach(8, 4)
    assert lookup_reach(8, gaps_within(32, 8)[-1]) == 31 and gaps_within(32, 8)[0] == 0


def test_memory_proof_rejects_layouts_that_miss_the_point(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--delays", "0.5", "--window", "32"])  # "beyond" inside the window
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--inside-gap", "20", "--window", "32"])  # "inside" beyond it


def test_a_variant_trains_with_its_own_mini_batch_unless_one_is_forced():
    from moshi_ttt.memory_proof import DEFAULT_MINI_BATCH, row_mini_batch

    assert row_mini_batch(VARIANTS["hybrid"]) == 2 and row_mini_batch(VARIANTS["cache_replacement_kv_slots"]) == 1
    assert row_mini_batch(VARIANTS["post_attention"]) == DEFAULT_MINI_BATCH
    assert row_mini_batch(VARIANTS["hybrid"], forced=8) == 8
    assert row_mini_batch(["ttt=x", "ttt.ttt_layer.mini_batch_size=3", "ttt.ttt_layer.mini_batch_size=5"]) == 5


def test_a_variant_trains_its_own_steps_unless_they_are_forced():
    from moshi_ttt.memory_proof import DEFAULT_VARIANT_STEPS, row_steps

    assert row_steps(VARIANTS["cache_replacement"]) == 3000  # add gains from steps
    assert row_steps(VARIANTS["pre_attention"]) == DEFAULT_VARIANT_STEPS
    assert row_steps(VARIANTS["hybrid"], forced=6) == 6


def test_variants_trained_side_by_side_are_split_into_balanced_groups():
    from moshi_ttt.memory_proof import balanced_groups

    costs = {"a": 5, "b": 4, "c": 3, "d": 3, "e": 3}
    groups = balanced_groups(costs, 2)
    assert sorted(sum(groups, [])) == sorted(costs)  # every row once
    assert max(sum(costs[v] for v in g) for g in groups) == 9  # the best split (longest first onto the lightest: 10)
    assert balanced_groups(costs, 8) == [[v] for v in sorted(costs, key=lambda v: -costs[v])]  # one row each
    many = {f"row{i}": float(i) for i in range(12)}  # too many to try every split: longest first
    assert sorted(sum(balanced_groups(many, 3), [])) == sorted(many)


def test_the_proofs_time_counts_variants_trained_together_once():
    from moshi_ttt.memory_proof import seconds_from_scratch

    names = sorted(VARIANTS)[:2]
    timings = {"base": 10.0, "score oracle": 1.0, names[0]: 100.0, names[1]: 80.0}
    assert seconds_from_scratch(timings, names) == 191.0  # one after the other
    timings[VARIANTS_WALL] = {"variants": names, "jobs": 2, "seconds": 110.0}
    assert seconds_from_scratch(timings, names) == 121.0  # side by side: their wall time
    assert seconds_from_scratch(timings, names[:1]) == 111.0  # a different set: its own times
