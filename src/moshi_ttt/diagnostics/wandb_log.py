"""A diagnostics report to W&B (offline unless credentials exist) through the project's logger
factory: the findings as a table, every plot as an image, the scalar metrics in the run summary."""

from __future__ import annotations

from pathlib import Path


def flat_scalars(obj, prefix: str = "") -> dict:
    """{"checks/rope/metrics/max_period": 10000.0, ...}: every numeric leaf (series left out)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "series":
                continue
            out.update(flat_scalars(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, bool):
        out[prefix] = int(obj)
    elif isinstance(obj, (int, float)):
        out[prefix] = obj
    return out


def log_report(report: dict, out_dir, project: str = "moshi-ttt-diagnostics", run_name: str | None = None,
               mode: str | None = None) -> Path:
    """Log ``report`` (whose PNGs lie in ``out_dir``) as one W&B run under ``out_dir/wandb``;
    returns that directory."""
    from moshi_ttt.training.loggers import wandb_logger

    out = Path(out_dir)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in report["name"])
    lg = wandb_logger(project, run_name or f"diagnose-{safe}", str(out), mode=mode)
    try:
        lg.log_hyperparams({"name": report["name"], "spec": report.get("spec"), **report["settings"]})
        lg.log_table("diagnostics/findings", columns=["severity", "check", "layer", "message"],
                     data=[[f["severity"], f["check"], f["layer"] or "", f["message"]] for f in report["findings"]])
        for check, png in report.get("plots", {}).items():
            lg.log_image(f"diagnostics/{check}", images=[str(out / png)])
        summary = {f"diagnostics/{k}": v for k, v in flat_scalars(report["checks"]).items()}
        summary.update({f"diagnostics/count_{k}": v for k, v in report["summary"]["counts"].items()})
        summary["diagnostics/status"] = report["summary"]["status"]
        lg.experiment.summary.update(summary)
    finally:
        lg.experiment.finish()
    return out / "wandb"
