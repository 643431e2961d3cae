"""``python -m moshi_ttt.plan``: the command line."""

from __future__ import annotations

import argparse
import sys

from moshi_ttt.plan.config import DEFAULT_CONFIG_DIR, Hardware, PlanError, compose_config
from moshi_ttt.plan.estimate import prepare
from moshi_ttt.plan.report import _describe_recall, _duration, describe, render
from moshi_ttt.plan.suggest import suggestions


def _default_gpus(cfg, nodes: int | None) -> tuple[int, int]:
    from omegaconf import OmegaConf

    devices = OmegaConf.select(cfg, "trainer.devices")
    num_nodes = nodes or OmegaConf.select(cfg, "trainer.num_nodes") or 1
    per_node = devices if isinstance(devices, int) and devices > 0 else 8
    return int(per_node) * int(num_nodes), int(num_nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_ttt.plan",
        description="Per-GPU memory and throughput of every curriculum stage of a train.py config (same "
                    "Hydra overrides as train.py). Exit 1 when a stage does not fit, 2 when the config "
                    "cannot train.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=moshiko_7b trainer=deepspeed_zero3")
    parser.add_argument("--gpus", type=int, default=None,
                        help="world size (default: trainer.devices x nodes when devices > 0, else 8 per node)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--gpu-flops", type=float, default=989e12,
                        help="peak dense bf16 FLOP/s of one GPU (default 989e12, H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of the peak achieved (default 0.35)")
    parser.add_argument("--overhead-gib", type=float, default=3.0,
                        help="CUDA context + NCCL + allocator fragmentation per GPU (default 3)")
    parser.add_argument("--link-gbs", type=float, default=None,
                        help="collective bandwidth per GPU, GB/s (default 300 on one node, 40 across nodes)")
    parser.add_argument("--pcie-gbs", type=float, default=25.0, help="host <-> GPU bandwidth for offload (default 25)")
    parser.add_argument("--config-dir", default=None, help=f"Hydra config dir (default {DEFAULT_CONFIG_DIR})")
    parser.add_argument("--plain", action="store_true", help="plain text even on a terminal")
    args = parser.parse_args(argv)

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(args.overrides, args.config_dir)
        gpus, nodes = _default_gpus(cfg, args.nodes)
        hw = Hardware(args.gpus or gpus, args.gpu_memory_gib, args.gpu_flops, args.mfu, args.overhead_gib, nodes,
                      args.link_gbs, args.pcie_gbs)
        inputs = prepare(cfg)
        plans = inputs.run(hw)
    except (PlanError, ValueError, FileNotFoundError, HydraException, OmegaConfBaseException) as exn:
        print(f"plan: cannot plan this config: {str(exn).splitlines()[0] if str(exn) else type(exn).__name__}",
              file=sys.stderr)
        return 2
    print(render(plans, describe(inputs, plans, hw), rich=False if args.plain else None), end="")
    print(_describe_recall(cfg, inputs, plans, hw), end="")
    sys.stdout.flush()
    failing = [p for p in plans if not p.fits]
    if not failing:
        tight = min(plans, key=lambda p: p.headroom)
        total_time = sum(p.stage_time_s for p in plans)
        print(f"verdict: fits. Tightest stage {tight.index} '{tight.name}': {tight.total:.1f} of {tight.available:g} "
              f"GiB ({tight.headroom:.1f} GiB headroom). All stages: {_duration(total_time)}.")
        if tight.headroom < 0.1 * tight.available:
            print(f"warning: stage {tight.index} '{tight.name}' has less than 10% headroom; the estimate's error can "
                  "exceed that. Consider: " + "; ".join(suggestions(inputs, tight, hw)[:3]))
        return 0
    for p in failing:
        terms = ", ".join(f"{k} {v:.1f}" for k, v in p.biggest())
        print(f"verdict: DOES NOT FIT. Stage {p.index} '{p.name}' ({p.frames} frames x batch {p.batch_size}) needs "
              f"{p.total:.1f} GiB per GPU, {p.available:g} GiB available ({-p.headroom:.1f} GiB over); biggest "
              f"terms (GiB): {terms}.", file=sys.stderr)
        tips = suggestions(inputs, p, hw)
        if tips:
            print("  try: " + "; ".join(tips), file=sys.stderr)
    return 1

