"""The package is a house of floors: a module imports only from its own floor or below.

docs/design.md ("Floors") lists them; this test reads every ``import`` in ``src/moshi_ttt`` (those
inside functions too: a deferred import that climbs is still a climb) and names each one that
reaches a floor above its module's.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module belongs to the floor of its longest listed prefix.
FLOORS: list[tuple[str, ...]] = [
    ("moshi_ttt.constants", "moshi_ttt.signals"),
    ("moshi_ttt.ttt",),
    ("moshi_ttt.config",),
    ("moshi_ttt.models", "moshi_ttt.data"),
    ("moshi_ttt.config.validate",),  # a run's config checked against the variants, checkpoints and shards
    ("moshi_ttt.training",),
    ("moshi_ttt.eval", "moshi_ttt.diagnostics", "moshi_ttt.serving", "moshi_ttt.plan"),
    ("moshi_ttt.export", "moshi_ttt.memory_proof", "moshi_ttt.diagnose", "moshi_ttt.infer", "moshi_ttt.serve"),
]


def floor_of(module: str) -> int | None:
    best, level = -1, None
    for i, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    return level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from moshi_ttt import config` imports moshi_ttt.config
            found += [(node.lineno, f"{target}.{alias.name}" if floor_of(target) is None else target)
                      for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("moshi_ttt")]


def test_every_module_has_a_floor():
    unplaced = [module_name(p) for p in sorted((SRC / "moshi_ttt").rglob("*.py"))
                if module_name(p) != "moshi_ttt" and floor_of(module_name(p)) is None]
    assert not unplaced, f"modules on no floor (add them to FLOORS and docs/design.md): {unplaced}"


def test_no_import_climbs():
    climbs: set[str] = set()
    for path in sorted((SRC / "moshi_ttt").rglob("*.py")):
        module = module_name(path)
        here = floor_of(module)
        if here is None:  # moshi_ttt/__init__.py: the package's front door imports what it exposes
            continue
        for line, target in imports_of(path, module):
            there = floor_of(target)
            if there is not None and there > here:
                climbs.add(f"{path.relative_to(SRC)}:{line} ({module}, floor {here}) imports {target} (floor {there})")
    assert not climbs, "imports that climb:\n" + "\n".join(sorted(climbs))
