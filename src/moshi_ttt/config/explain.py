"""What each key means: the schema's field docstrings, with types, defaults and group options.

``python -m moshi_ttt.config explain [KEY] [overrides...]`` prints every typed group, one group
(``optim``) or one key (``curriculum.stages.1.attention_window``), and the value that key takes
in ``conf/train.yaml`` composed with the overrides. The keys inside ``trainer.strategy`` (DDP,
DeepSpeed) are untyped and documented by ``schema.STRATEGY_DOCS``; an old (renamed) key shows
its new name.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from functools import cache
from pathlib import Path

from omegaconf import MISSING

from moshi_ttt.config.groups import RENAMED_KEYS
from moshi_ttt.config.schema import GROUP_DOCS, STRATEGY_DOCS, TrainConfig

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field (litgpt's convention) or ``#:`` comments above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    docs: dict[str, str] = {}
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[name] = " ".join(inspect.cleandoc(nxt.value.value).split())
            continue
        comments = []
        for line in reversed(lines[: node.lineno - 1]):
            if not line.strip().startswith("#:"):
                break
            comments.insert(0, line.strip()[2:].strip())
        if comments:
            docs[name] = " ".join(comments)
    return docs


def _type_name(tp) -> str:
    text = str(tp).replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)  # moshi_ttt.config.schema.Stage -> Stage


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value == MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(group)"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


@dataclasses.dataclass
class KeyDoc:
    key: str
    type: str
    default: str
    doc: str
    nested: type | None  # a dataclass to descend into (a group, or a list's elements)


def _entries(cls: type, prefix: str) -> list[KeyDoc]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        nested = _dataclass_in(tp)
        key = f"{prefix}{f.name}"
        doc = docs.get(f.name) or (" ".join(inspect.cleandoc(nested.__doc__ or "").split()) if nested else "")
        out.append(KeyDoc(key, _type_name(tp), _default(f), doc, nested))
    return out


def _dataclass_in(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[KeyDoc]:
    """Every documented key, depth first; list elements appear as ``<key>.N.<field>``."""
    out = []
    for entry in _entries(cls, prefix):
        out.append(entry)
        if entry.nested is not None and entry.key not in RENAMED_KEYS:  # an old name: documented by its new one
            is_list = entry.type.startswith("list[")
            out.extend(all_keys(entry.nested, f"{entry.key}.N." if is_list else f"{entry.key}."))
    return out


def normalise(key: str) -> str:
    """``curriculum.stages.1.steps`` -> ``curriculum.stages.N.steps`` (list indices as N)."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", key.strip().strip("."))


def strategy_keys() -> list[KeyDoc]:
    """The documented keys inside ``trainer.strategy`` (DDP and DeepSpeed, conf/trainer/)."""
    return [KeyDoc(k, tp, "", doc, None) for k, (tp, doc) in STRATEGY_DOCS.items()]


def component_keys() -> list[KeyDoc]:
    return [KeyDoc(k, "component", "", v, None) for k, v in GROUP_DOCS.items()]


def renamed(key: str) -> str | None:
    """The current name of a renamed key (``ttt.layer.num_heads`` -> ``ttt.ttt_layer.num_heads``), else None."""
    want = normalise(key)
    for old, new in RENAMED_KEYS.items():
        if want == old or want.startswith(old + "."):
            return new + want[len(old):]
    return None


def lookup(key: str) -> list[KeyDoc]:
    """The key itself and, for a group, everything under it; raises KeyError naming close keys."""
    want = normalise(key)
    keys = all_keys()
    hits = [k for k in keys if k.key == want or k.key.startswith(want + ".")]
    hits += [k for k in strategy_keys() + component_keys() if k.key == want or k.key.startswith(want + ".")]
    if not hits and renamed(key) is not None:  # an old name below a renamed group: what it is now
        return lookup(renamed(key))
    if hits:
        return hits
    close = [k.key for k in keys if want.rsplit(".", 1)[-1] in k.key][:8]
    raise KeyError(f"{key}: no such documented key" + (f"; did you mean: {', '.join(close)}" if close else ""))


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[tuple[str, str]]:
    """(option, first comment line) of each ``conf/<group>/*.yaml``."""
    out = []
    for path in sorted((conf_dir / group).glob("*.yaml")):
        if path.stem.startswith("_"):
            continue
        comment = next((line.lstrip("# ").strip() for line in path.read_text().splitlines()
                        if line.startswith("#") and "@package" not in line), "")
        out.append((path.stem, comment))
    return out


def full_doc(e: KeyDoc) -> str:
    """The key's documentation, naming the new key when it is an old (renamed) one."""
    new = RENAMED_KEYS.get(e.key)
    return e.doc + (f" Deprecated: use {new}." if new and "eprecated" not in e.doc else "")


def config_groups(conf_dir: Path = CONF_DIR) -> list[str]:
    """The groups a user picks with GROUP=OPTION (``hydra/`` holds Hydra's own settings)."""
    return sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra")


def render(entries: list[KeyDoc], values: dict[str, object] | None = None, width: int = 100) -> str:
    lines = []
    for e in entries:
        head = f"{e.key}  [{e.type}]" + (f"  default: {e.default}" if e.default else "")
        if values is not None and e.key in values:
            head += f"  now: {values[e.key]}"
        lines.append(head)
        doc = full_doc(e)
        if doc:
            lines.extend(textwrap.wrap(doc, width=width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)


def overview(conf_dir: Path = CONF_DIR) -> str:
    """Every group with its options, then every typed key."""
    out = ["Config groups (choose one with GROUP=OPTION, e.g. `python train.py curriculum=demo`):"]
    for group in config_groups(conf_dir):
        out.append(f"  {group}:")
        out += [f"    {name:<24} {comment}" for name, comment in group_options(group, conf_dir)]
    out += ["", "Keys (override with KEY=VALUE; list elements by index: curriculum.stages.1.steps=2000):",
            render(all_keys()), "", strategy_heading(), render(strategy_keys()), "",
            "Named components (callbacks.NAME, logger.NAME):", render(component_keys()), "", renamed_list()]
    return "\n".join(out)


def strategy_heading() -> str:
    return ("Strategy keys (trainer.strategy.*, set by trainer=ddp* / deepspeed_*; each DeepSpeed key is passed "
            "to DeepSpeed as is):")


def renamed_list() -> str:
    return "Renamed keys (the old name still works, with a warning):\n" + "\n".join(
        f"  {old} -> {new}" for old, new in RENAMED_KEYS.items())
