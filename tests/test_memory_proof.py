"""`make memory-proof` end to end at toy size: every stage runs and the table has every row.

Recall scoring itself is tested in tests/test_eval.py (moshi_ttt.eval.recall) and the pairs
set in tests/test_data_recall.py."""

from __future__ import annotations

import json

import pytest

from moshi_ttt.memory_proof import (
    SELECT_KEYS,
    SIZE_KEYS,
    TEACHER_KEYS,
    VARIANTS,
    VARIANTS_WALL,
    delay_gap,
    gaps_within,
    lookup_reach,
    main,
)

TINY = ["--window", "16", "--pairs", "2", "3", "--delays", "2", "3", "--train-delay", "2", "--base-steps", "4",
        "--base-extend-steps", "3", "--extend-batch-size", "2", "--variant-steps", "6", "--pretrain-samples", "16",
        "--train-samples", "16", "--test-samples", "4", "--batch-size", "2", "--base-batch-size", "4",
        "--min-base-recall", "0"]  # a 4-step base has not learned the lookup: the plumbing is what is tested


@pytest.mark.slow
def test_memory_proof_runs_every_variant(tmp_path, capsys, monkeypatch):
    # every row (the default leaves Sun et al.'s rule to the three-seed run), in two processes side by side
    assert main(["--out", str(tmp_path), *TINY, "--jobs", "2", "--variants", *VARIANTS]) == 0
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
    # the recipe's block on a 2-layer toy is the hybrid row's config: trained once, scored under both names
    assert result["trained_as"] == {"recipe": "hybrid"}
    assert together["jobs"] == 2 and together["variants"] == sorted(v for v in VARIANTS if v != "recipe")
    others = sum(v for k, v in result["timings"].items() if k not in (*VARIANTS, VARIANTS_WALL))
    assert result["seconds_from_scratch"] == pytest.approx(together["seconds"] + others)  # the twin costs nothing
    assert "(the rows 2 at a time)" in (tmp_path / "memory_proof.md").read_text()
    recipe = json.loads((tmp_path / "seed_0" / "ttt" / "recipe.json").read_text())
    hybrid = json.loads((tmp_path / "seed_0" / "ttt" / "hybrid.json").read_text())
    assert recipe["ckpt"] == hybrid["ckpt"] and recipe["ttt"]["layer_indices"] == [0, 1]
    assert [r for r in result["rows"] if r["model"] == "recipe"] == [
        {**r, "model": "recipe"} for r in result["rows"] if r["model"] == "hybrid"]
    assert (tmp_path / "recall_vs_delay.png").stat().st_size > 1000
    assert "| cache_replacement_kv_slots | 3 |" in capsys.readouterr().out
    assert result["variant_steps"] == 6 and result["seeds"] == [0]
    # the 7B recipe's block and teacher: layers [0, 16, 31] of 32 -> both of 2, its window and the teacher's onto the toy's
    assert result["rows_config"]["recipe"] == ["ttt=hybrid", "ttt.layer_indices=[0,1]",
                                               "ttt.ttt_layer_attention_window={w}", "loss.distill.weight=1.0",
                                               "loss.distill.teacher_window={o}"]
    # what each row trained is the product's config: its memory settings are the defaults, not the proof's
    saved = json.loads((tmp_path / "seed_0" / "ttt" / "pre_attention.json").read_text())["ttt"]
    assert saved["ttt_layer"]["rule"] == "delta" and saved["init_from_attention"] is True
    sun = json.loads((tmp_path / "seed_0" / "ttt" / "pre_attention_minibatch_gd.json").read_text())["ttt"]
    assert sun["ttt_layer"]["rule"] == "minibatch_gd"
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


def test_rows_are_the_products_config_plus_sizes_only(tmp_path, monkeypatch):
    """Every row is a conf/ttt option plus sizes (or the one key that selects the other rule, or the product's
    teacher): a memory
    setting that only the proof used would make the proof show something the product does not train."""
    from moshi_ttt import memory_proof

    for name, overrides in VARIANTS.items():
        assert overrides[0].startswith("ttt="), name
        for o in overrides[1:]:
            assert o.split("=", 1)[0] in SIZE_KEYS + SELECT_KEYS + TEACHER_KEYS, (name, o)
    bad = tmp_path / "memory_proof.yaml"
    bad.write_text("rows:\n  pre_attention: [ttt=pre_attention, ttt.ttt_layer.base_lr=16]\n")
    monkeypatch.setattr(memory_proof, "PROOF_FILE", bad)
    with pytest.raises(ValueError, match="sets ttt.ttt_layer.base_lr, which is not a size"):
        memory_proof.proof_rows()
    bad.write_text("rows:\n  hybrid: [ttt=hybrid, optim.lr=0.1]\n")  # a proof-only training setting
    with pytest.raises(ValueError, match="sets optim.lr, which is not a size"):
        memory_proof.proof_rows()


def test_the_recipe_row_reads_the_placement_relative_to_depth(tmp_path, monkeypatch):
    from moshi_ttt import memory_proof
    from moshi_ttt.memory_proof import recipe_row, relative_layers

    assert relative_layers([-3, -2, -1], 32, 2) == [1] and relative_layers([-3, -2, -1], 32, 8) == [7]
    assert relative_layers([0, 16, 31], 32, 4) == [0, 2, 3]
    assert recipe_row("moshiko_ttt_30min", 16)[:2] == ["ttt=hybrid", "ttt.layer_indices=[0,8,15]"]
    # a recipe without the teacher trains without it; a variant with a short window of its own gets the toy's
    experiments = tmp_path / "experiment"
    experiments.mkdir()
    head = "defaults:\n  - override /model: moshiko_7b\n  - override /ttt: {}\n"
    (experiments / "plain.yaml").write_text(head.format("cache_replacement") + "ttt:\n  layer_indices: [-1]\n")
    (experiments / "far.yaml").write_text(head.format("hybrid") + "loss:\n  distill:\n    weight: 1\n"
                                          "    teacher_window: 6000\n")
    (tmp_path / "model").symlink_to(memory_proof.CONF_DIR / "model")
    monkeypatch.setattr(memory_proof, "CONF_DIR", tmp_path)
    assert recipe_row("plain", 2) == ["ttt=cache_replacement", "ttt.layer_indices=[1]",
                                      "ttt.ttt_layer_attention_window={wm}"]
    with pytest.raises(ValueError, match="teacher_window=6000"):  # a teacher window the toy cannot scale
        recipe_row("far", 2)


def test_the_proof_stops_before_the_rows_when_the_base_has_not_learned_the_lookup(tmp_path):
    with pytest.raises(SystemExit, match=r"the frozen base recalls 0\.\d+ .* it has not learned the lookup"):
        main(["--out", str(tmp_path), *TINY, "--min-base-recall", "0.9", "--variants", "hybrid"])
    assert (tmp_path / "seed_0" / "base_checkpoint").exists() and not (tmp_path / "seed_0" / "runs" / "hybrid").exists()


def test_only_rows_that_compose_the_same_run_are_trained_once(tmp_path):
    import argparse

    from moshi_ttt.memory_proof import proof_rows, twin_rows

    def job(layers):
        args = argparse.Namespace(variant_steps=10, layers=layers, window=16, dim=32, ttt_lr=3e-3, batch_size=2,
                                  chunk_size=16, full_loss=False, override=[])
        return {"args": args, "out": tmp_path, "base_dir": tmp_path / "base", "short": 20, "frames": 40, "seed": 0,
                "rows": proof_rows(layers), "oracle_window": 60}

    rows = ["hybrid", "pre_attention", "recipe"]
    assert twin_rows(rows, job(2)) == {"recipe": "hybrid"}  # [0, 16, 31] of 32 -> both layers of 2: every layer
    assert twin_rows(rows, job(4)) == {}  # -> [0, 2, 3] of 4: not the hybrid row's every layer
    assert twin_rows(["recipe", "hybrid"], job(2)) == {"hybrid": "recipe"}


def test_seeds_are_combined_as_mean_and_min():
    from moshi_ttt.memory_proof import combine_seeds, format_table

    def one(seed, recall):
        return {"seed": seed, "window_frames": 16, "pairs": [2], "delays": {"2x": 32}, "in_window_reach": 8,
                "oracle_window": 40, "train_delay": 2, "variant_steps": 6, "timings": {}, "seconds_from_scratch": 10.0,
                "settings": {"variants": ["pre_attention"]}, "rows_config": {},
                "rows": [{"model": "pre_attention", "pairs": 2, "chance": 0.03, "recall_in": 1.0,
                          "recall_2x": recall, "late_loss_2x": 1.0}]}

    combined = combine_seeds([one(0, 0.9), one(1, 0.5), one(2, 0.7)])
    row = combined["rows"][0]
    assert row["recall_2x"] == pytest.approx(0.7) and row["recall_2x_min"] == 0.5
    assert row["per_seed"]["recall_2x"] == [0.9, 0.5, 0.7] and combined["seconds_from_scratch"] == 30.0
    assert "| pre_attention | 2 | 1.000 (1.000) | 0.700 (0.500) |" in format_table(combined)


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
