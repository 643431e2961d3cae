"""``python -m moshi_ttt.config explain [KEY] [OVERRIDE ...]``: what each setting means.

Without KEY: every config group with its options and every typed key. With KEY (a group such
as ``optim`` or a key such as ``curriculum.stages.1.attention_window``): its type, default,
meaning and the value it takes in ``conf/train.yaml`` composed with the overrides.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import ListConfig, OmegaConf

from moshi_ttt.config.errors import EXIT_BAD_SETTING, describe
from moshi_ttt.config.explain import CONF_DIR, lookup, normalise, overview, renamed, render
from moshi_ttt.config.groups import apply_renames

_ABSENT = object()


def _values(key: str, overrides: list[str], entries) -> dict[str, object]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    apply_renames(cfg, overrides)  # an old name among the overrides shows as the value of its new key
    values = {}
    for e in entries:
        concrete = key if normalise(key) == e.key else e.key
        if ".N." in concrete or concrete.endswith(".N"):
            continue
        value = OmegaConf.select(cfg, concrete, default=_ABSENT, throw_on_resolution_failure=False)
        if isinstance(value, ListConfig) and not any(OmegaConf.is_config(v) for v in value):
            value = OmegaConf.to_container(value, resolve=True)  # a list of values (optim.betas, ttt.layer_indices)
        if value is _ABSENT or OmegaConf.is_config(value):
            continue  # not in this composition (e.g. no such stage), or a whole group
        values[e.key] = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moshi_ttt.config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="what each key means (all, a group, or one key)")
    ex.add_argument("key", nargs="?", default=None, help="a group (optim) or a key (optim.lr); omit for all")
    ex.add_argument("overrides", nargs="*", help="Hydra overrides, to show the values they give (experiment=demo)")
    args = parser.parse_args(argv)
    if args.key is None or "=" in args.key:
        print(overview())
        return 0
    try:
        entries = lookup(args.key)
        values = _values(args.key, args.overrides, entries)
    except KeyError as exn:
        print(f"error: {exn.args[0]}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except Exception as exn:  # noqa: BLE001 - a bad override is reported in one line, anything else raised
        line = describe(exn)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_SETTING
    new = renamed(args.key)
    if new is not None:
        print(f"{args.key} is the deprecated name of {new} (still accepted, with a warning)")
    print(render(entries, values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
