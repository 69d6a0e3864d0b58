"""Command lines generated from config dataclasses (train's TrainConfig, eval's EvalConfig).

Each field declares its help next to itself with ``opt(default, "help", ...)``; ``parser_for`` turns the
fields into flags (``--out-dir`` for ``out_dir``), so a new field is a new flag with its help, and the
two entry points spell flags the same way. No config framework: a dataclass plus argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Optional


def opt(default: Any = None, help: str = "", *, factory: Optional[Callable[[], Any]] = None, cli: bool = True,
        **argparse_kw: Any) -> Any:
    """A dataclass field with its --help text; ``argparse_kw`` (choices, aliases, action, required, nargs,
    metavar, type) go to ``add_argument``; ``cli=False``: not a flag (filled in by the program)."""
    metadata = {"help": help, "cli": cli, **argparse_kw}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(field_name: str) -> str:
    """The command-line spelling of a config field: ``out_dir`` -> ``--out-dir``."""
    return "--" + field_name.replace("_", "-")


_SCALARS = {"int": int, "float": float, "str": str}


def _scalar(type_name: str) -> Callable[[str], Any]:
    for name, fn in _SCALARS.items():
        if name in type_name:
            return fn
    return str


def parser_for(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass ``cls`` whose metadata has cli=True."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        md = dict(f.metadata)
        if not md.pop("cli", True):
            continue
        names = [flag(f.name), *md.pop("aliases", ())]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"help": md.pop("help", "") or " ", "dest": f.name, **md}
        if "action" not in kw and "nargs" not in kw and "bool" in str(f.type):
            kw["action"] = argparse.BooleanOptionalAction
        elif "action" not in kw and "list[" in str(f.type):
            kw.setdefault("nargs", "+")
            kw["type"] = _scalar(str(f.type).split("list[", 1)[1])
        elif "action" not in kw and "nargs" not in kw:
            kw.setdefault("type", _scalar(str(f.type)))  # a field may bring its own parser (type=...)
        elif kw.get("action") == "append":
            kw["type"] = _scalar(str(f.type).split("list[", 1)[1])
        if kw.get("action") == "append":
            default = None  # argparse appends to the default list otherwise
        p.add_argument(*names, default=default, **kw)
    return p


def config_from(cls: type, ns: argparse.Namespace) -> Any:
    """The dataclass from parsed flags; fields that are not flags keep their defaults."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    for f in dataclasses.fields(cls):
        if f.name in values and values[f.name] is None and f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return cls(**values)


def given_fields(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> set[str]:
    """The fields whose flags appear in ``argv`` (parsed again with every default suppressed)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:  # argparse has no public copy; the actions are its documented parts
        if action.option_strings and action.dest != "help":
            kw = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, argparse.BooleanOptionalAction):
                quiet.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kw)
            elif action.nargs == 0:
                quiet.add_argument(*action.option_strings, action="store_const", const=action.const, **kw)
            else:
                quiet.add_argument(*action.option_strings, nargs=action.nargs, const=action.const,
                                   action="append" if isinstance(action, argparse._AppendAction) else "store", **kw)
    ns, _ = quiet.parse_known_args(argv)
    return set(vars(ns))
