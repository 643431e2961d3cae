"""notebooks/analysis.ipynb runs headless (nbclient) on outputs this test makes: a 4-step training
run with a two-stage curriculum and TTT health logging, then `python -m moshi_ttt.eval` loss,
generate and recall, and `python -m moshi_ttt.diagnose`, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


@pytest.fixture(scope="module")
def demo_outputs(tmp_path_factory, tiny_lm_kwargs):
    from hydra import compose, initialize_config_dir

    from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards
    from moshi_ttt.diagnostics.cli import main as diagnose_main
    from moshi_ttt.eval.__main__ import main as eval_main
    from moshi_ttt.training import train

    tmp_path = tmp_path_factory.mktemp("notebook")
    recall = tmp_path / "recall_sets"
    for name, delay, seed in (("train", 40, 0), ("near", 20, 1), ("far", 60, 2)):
        write_token_recall_shards(recall / name, 8 if name == "train" else 2,
                                  TokenRecallSpec(delay_frames=delay, fact_start_jitter=10, tail_frames=5), seed=seed)
    overrides = [
        f"paths.output_root={tmp_path}", "experiment=smoke", "trainer.max_steps=4", "run_name=nb", "logger=csv",
        "callbacks.ttt_health.every_n_steps=1", "curriculum=demo", "ttt.layer_indices=null", "ttt.default_num_layers=1",
        "curriculum.stages=[{name:short,seconds:2.56,steps:2,batch_size:2,sources:{synthetic:1.0}},"
        "{name:long,seconds:5.12,steps:2,batch_size:1,sources:{synthetic:1.0,recall:1.0}}]",
        "+data.sources.synthetic.shards=${data.train_shards}", f"+data.sources.recall.shards={recall / 'train'}",
        "data.val_batches=1", "callbacks=[default,recall]", f"callbacks.recall.shards=[{recall / 'near'},{recall / 'far'}]",
        "callbacks.recall.window_frames=40",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg)
    assert summary["global_step"] == 4
    run_dir = Path(summary["run_dir"])

    model_yaml = tmp_path / "tiny_w32.yaml"
    model_yaml.write_text(yaml.safe_dump({"source": "tiny", "lm_kwargs": {**tiny_lm_kwargs, "context": 32}}))
    models = ["--model", f"frozen base=base:{model_yaml}", "--model", f"pre_attention=run:{run_dir}"]
    eval_dir = tmp_path / "eval"
    held_out = str(cfg.data.train_shards)
    assert eval_main(["loss", *models, "--shards", held_out, "--frames", "100", "--num-samples", "3",
                      "--frames-per-bucket", "20", "--out", str(eval_dir)]) == 0
    assert eval_main(["generate", *models, "--shards", held_out, "--frames", "60", "--prompt-frames", "20",
                      "--window-frames", "20", "--out", str(eval_dir)]) == 0
    recall_set = tmp_path / "recall"
    write_token_recall_shards(recall_set, 6, TokenRecallSpec(delay_frames=40, fact_start_jitter=10, tail_frames=5))
    assert eval_main(["recall", *models, "--shards", str(recall_set), "--late-start", "60",
                      "--out", str(eval_dir)]) == 0
    diag_dir = tmp_path / "diagnostics"
    assert diagnose_main(["--model", f"pre_attention=run:{run_dir}", "--shards", held_out, "--pack", "--frames", "100",
                          "--window-frames", "25", "--out", str(diag_dir)]) == 0
    return run_dir, eval_dir, diag_dir


def test_eval_cli_outputs(demo_outputs):
    _, eval_dir, _ = demo_outputs
    names = {p.name for p in eval_dir.iterdir()}
    assert {"loss_by_position.csv", "loss_by_position.md", "loss_by_position.json", "loss_by_position.png",
            "generation_frozen_base.json", "generation_pre_attention.csv", "generation_pre_attention.png",
            "generation.md", "recall.json", "recall.md", "recall.png"} <= names
    loss = json.loads((eval_dir / "loss_by_position.json").read_text())
    assert list(loss) == ["frozen base", "pre_attention"] and len(loss["pre_attention"]["curve"]) == 5
    assert "| pre_attention |" in (eval_dir / "recall.md").read_text()
    timeline = json.loads((eval_dir / "generation_frozen_base.json").read_text())
    assert len(timeline["windows"]) == 3 and timeline["prompt_frames"] == 20


def execute_notebook(tmp_path: Path, monkeypatch, **paths: Path):
    """Run the notebook in a fresh kernel of this interpreter with the given path parameters."""
    import nbformat
    from ipykernel.kernelspec import install
    from nbclient import NotebookClient

    # A kernel spec for this very interpreter (the venv), found first through JUPYTER_PATH.
    install(kernel_name="moshi-ttt-test", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    for name, path in paths.items():
        monkeypatch.setenv(name, str(path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="moshi-ttt-test", timeout=180,
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()  # raises CellExecutionError on the first failing cell
    nbformat.write(nb, tmp_path / "analysis.executed.ipynb")  # for a look when an assertion fails
    return nb


def _cell(nb, marker: str):
    return next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)


def images(nb, marker: str) -> int:
    return sum("image/png" in o.get("data", {}) for o in _cell(nb, marker).outputs)


def markdown(nb, marker: str) -> str:
    return "".join(o.get("data", {}).get("text/markdown", "") for o in _cell(nb, marker).outputs)


def stdout(nb, marker: str) -> str:
    return "".join(o.get("text", "") for o in _cell(nb, marker).outputs if o.output_type == "stream")


def test_notebook_runs_headless(demo_outputs, tmp_path, monkeypatch):
    run_dir, eval_dir, diag_dir = demo_outputs
    nb = execute_notebook(tmp_path, monkeypatch, RUN_DIR=run_dir, EVAL_DIR=eval_dir,
                          DIAG_DIR=diag_dir, MEMORY_PROOF_DIR=tmp_path / "no-memory-proof")
    assert images(nb, "bucket_keys = sorted(") == 1  # training curves with curriculum stages
    assert images(nb, "ttt_keys = ") == 1  # TTT health
    assert images(nb, "recall_reports = ") == 1  # recall at each validation, by distance, samples per source
    assert "recall at step 4: " in stdout(nb, "recall_reports = ")
    assert images(nb, "plot_loss_curves(loss_results)") == 1
    assert images(nb, "plot_timeline(tl") == 3  # one timeline per model + the phase strip
    assert images(nb, "plot_recall(recall)") == 1
    summary = stdout(nb, 'print("shown:"')
    assert "training metrics (CSV" in summary and "recall (frozen base, pre_attention)" in summary
    assert "recall while training (2 validations, sources: recall, synthetic)" in summary
    assert "diagnostics report (pre_attention: " in summary and "memory proof: no" in summary
    # the diagnostics section: findings of the report python -m moshi_ttt.diagnose wrote, and its plots
    report = json.loads((diag_dir / "report.json").read_text())
    shown = markdown(nb, "diagnostics_reports(")
    assert "| severity | check | layer | finding |" in shown and "| key metric | value |" in shown
    assert sum(f"| {f['message']} |" in shown for f in report["findings"]) == len(report["findings"])
    assert "attention window (min-max frames)" in shown and "layer1: fast-weight norm max" in shown
    assert images(nb, "diagnostics_reports(") == 4  # context, TTT health, drift, predictions


def test_notebook_skips_missing_inputs_and_shows_diagnostics(tmp_path, monkeypatch):
    """No run, no eval outputs: every section says so; a diagnostics report is tabulated."""
    from matplotlib.figure import Figure

    diag = tmp_path / "diag"
    diag.mkdir()
    (diag / "report.json").write_text(json.dumps({
        "model": "tiny", "checks": {"rope": {"max_relative_distance": 31, "warning": False}},
        "entropy_by_position": list(range(50))}))
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1])
    fig.savefig(diag / "entropy.png")
    nb = execute_notebook(tmp_path, monkeypatch, RUN_DIR=tmp_path / "no-run", EVAL_DIR=tmp_path / "no-eval",
                          DIAG_DIR=diag, MEMORY_PROOF_DIR=tmp_path / "no-memory-proof")
    summary = stdout(nb, 'print("shown:"')
    for missing in ("training metrics: nothing", "recall while training: no", "loss by position: no", "generation: no",
                    "recall: no"):
        assert missing in summary
    assert "diagnostics report" in summary.split("skipped:")[0]
    table = markdown(nb, "diagnostics_reports(")  # not a moshi_ttt.diagnose report: every scalar
    assert "| checks.rope.max_relative_distance | 31 |" in table and "[50 items]" in table
    assert images(nb, "diagnostics_reports(") == 1
