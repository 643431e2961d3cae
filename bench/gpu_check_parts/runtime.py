"""Part RUNTIME: does moshi import and run on this torch? The versions, the requirements this
environment breaks, one forward of a tiny LMModel."""

from __future__ import annotations

import contextlib
import time

import torch

from .common import RUNTIME, Events, Job, Row, Settings, error, free_memory, is_oom, random_codes, sync

# Distributions the check reads (moshi's own requirements are read from its metadata); a missing
# one is a WARN here (fla-core only on CUDA: its kernels need it), and the parts that need it fail
# on their own.
CHECK_DISTRIBUTIONS = ("torch", "numpy", "moshi", "triton", "lightning", "hydra-core", "omegaconf", "deepspeed",
                       "webdataset", "fla-core")
CUDA_ONLY_DISTRIBUTIONS = ("fla-core",)
# Whose own requirements must hold (a WARN naming them if not); moshi's are only reported: it runs
# here over a newer torch and numpy than it asks for, without its serving extras.
STRICT_REQUIREMENTS_OF = ("lightning", "hydra-core", "omegaconf", "deepspeed", "pydantic", "webdataset", "fla-core")
# moshi's 7B config (moshi.models.loaders._lm_kwargs) shrunk: the same code paths, a few MiB.
TINY_LM = dict(dim=64, num_heads=4, num_layers=2, card=64, text_card=64, depformer_dim=32,
               depformer_dim_feedforward=64, depformer_num_heads=2, depformer_num_layers=1)


def installed_versions(names=CHECK_DISTRIBUTIONS) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # with its local tag (+cu130)
    return out


def requirements(dist: str) -> list:
    """``dist``'s own requirements (packaging's Requirement) that apply here: no extras, no other
    platform's."""
    from importlib import metadata

    from packaging.requirements import Requirement

    reqs = [Requirement(text) for text in metadata.requires(dist) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def broken_requirements(dist: str) -> list[str]:
    """``dist``'s requirements that the installed versions do not meet ("torch 2.11.0 (moshi wants
    <2.10,>=2.2.0)"; a missing one: "sphn missing")."""
    from importlib import metadata

    broken = []
    for req in requirements(dist):
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            broken.append(f"{req.name} missing")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            broken.append(f"{req.name} {have} ({dist} wants {req.specifier})")
    return broken


def part_runtime(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    for case in cases:
        events.write(event="start", case=case["id"])
        try:
            events.row(_runtime_row(s, case))
        except Exception as exn:  # noqa: BLE001 - moshi does not import or run here: that is the row
            versions = installed_versions()
            events.row(Row(RUNTIME, case["id"], "OOM" if is_oom(exn) else "FAIL",
                           ", ".join(f"{k} {versions[k]}" for k in ("torch", "moshi", "numpy")), note=error(exn),
                           data={"versions": versions}))
        free_memory()
        events.write(event="done", case=case["id"])


def _runtime_row(s: Settings, case: dict) -> Row:
    """moshi imported, its LMModel built (its 7B config shrunk) and run forward once on the device."""
    import platform

    t0 = time.perf_counter()
    import moshi
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    import_s = time.perf_counter() - t0
    versions = installed_versions()
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    dtype = torch.bfloat16 if s.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = LMModel(**{**loaders._lm_kwargs, **TINY_LM}, device=s.device, dtype=dtype).eval()
    codes = random_codes(model, s.runtime_frames, s.device)
    with torch.no_grad():
        model(codes)  # the first call pays CUDA's and the allocator's start
        sync(s.device)
        t0 = time.perf_counter()
        out = model(codes)
        sync(s.device)
    forward_s = time.perf_counter() - t0
    T = codes.shape[-1]
    want = (1, model.dep_q, T, model.card)
    if tuple(out.logits.shape) != want:
        raise ValueError(f"LMModel logits {tuple(out.logits.shape)}, expected {want}")
    valid = out.logits[out.mask.bool()]
    text_valid = out.text_logits[out.text_mask.bool()]
    if valid.numel() == 0 or not torch.isfinite(valid).all() or not torch.isfinite(text_valid).all():
        raise FloatingPointError("LMModel forward: no or non-finite logits at the valid positions")
    broken = broken_requirements("moshi")
    missing = [k for k in CHECK_DISTRIBUTIONS if versions[k] is None]
    warn = [k for k in missing if s.device.startswith("cuda") or k not in CUDA_ONLY_DISTRIBUTIONS]
    unmet = {}
    for dist in STRICT_REQUIREMENTS_OF:
        with contextlib.suppress(Exception):  # not installed: named in "missing"
            if bad := broken_requirements(dist):
                unmet[dist] = bad
    notes = [f"tiny LMModel ({model.num_codebooks} codebooks, {T} frames, {dtype}) forward {1e3 * forward_s:.1f} ms "
             f"on {s.device}, logits finite; import moshi {import_s:.1f} s"]
    if broken:
        notes.append("outside moshi's requirements: " + ", ".join(broken))
    others = [f"{k} {versions[k]}" for k in CHECK_DISTRIBUTIONS if k not in ("torch", "numpy", "moshi") and versions[k]]
    notes.append(", ".join([f"python {versions['python']}", *others]))
    if missing:
        notes.append("missing: " + ", ".join(missing) + ("" if warn else " (not needed on the CPU)"))
    if unmet:
        notes.append("unmet requirements: " + "; ".join(f"{d}: {', '.join(b)}" for d, b in unmet.items()))
    if s.peak_note:
        notes.append(s.peak_note)
    wants = {r.name: str(r.specifier) for r in requirements("moshi")}
    reference = "moshi wants " + ", ".join(f"{k} {wants[k]}" for k in ("torch", "numpy") if wants.get(k))
    data = {"versions": versions, "moshi_broken_requirements": broken, "missing": missing, "unmet": unmet,
            "import_s": import_s,
            "forward_s": forward_s, "logits_shape": list(out.logits.shape)}
    return Row(RUNTIME, case["id"], "WARN" if warn or unmet else "PASS",
               f"torch {versions['torch']}, moshi {moshi.__version__}, numpy {versions['numpy']}", reference,
               "", "; ".join(notes), data)
