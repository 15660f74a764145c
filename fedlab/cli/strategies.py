"""``fedlab strategies``: the registered strategies, one line each, or one strategy's options."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any

from fedlab import registry

# reST and Sphinx markup in docstrings: ``code``, :class:`~x.Y`, *emphasis*.
_ROLE = re.compile(r":[a-z]+:`~?\.?([^`]+)`")
_CODE = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
# A sentence ends at ". " before a capital letter, digit or quote, or at the end of the text.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_SECTION = re.compile(r"^(Args|Attributes|Raises|Returns|Example|Examples|Note|Notes):\s*$")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "strategies",
        help="list the registered strategies, or show one strategy's options",
        description="Without NAME: every registered strategy with a one-line description. "
        "With NAME: its description and its --strategy-opt options with types and defaults.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="a strategy to describe")
    p.set_defaults(func=run)


def plain(text: str) -> str:
    """``text`` without docstring markup, on one line."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = _CODE.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    return " ".join(text.split())


def _paragraphs(doc: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]


def description(cls: Any) -> str:
    """The docstring's first paragraph, without markup, on one line."""
    paragraphs = _paragraphs(cls.__doc__ or "")
    return plain(paragraphs[0]) if paragraphs else ""


def summary(cls: Any) -> str:
    """The first whole sentence of :func:`description`."""
    return _SENTENCE_END.split(description(cls), maxsplit=1)[0]


def option_docs(cls: Any) -> dict[str, str]:
    """``{name: description}`` from the ``Args:`` sections of ``cls`` and its bases.

    The class's own words win over a base's (FedAvg explains ``server_lr`` its own way).
    """
    out: dict[str, str] = {}
    for klass in reversed(inspect.getmro(cls)):
        lines = inspect.cleandoc(klass.__doc__ or "").splitlines()
        current: str | None = None
        in_args = False
        for line in lines:
            if _SECTION.match(line.strip()):
                in_args = line.strip() == "Args:"
                current = None
                continue
            if not in_args:
                continue
            if not line.strip():
                continue
            if not line.startswith(" "):  # the section ended
                in_args = False
                continue
            m = re.match(r"^ {2,8}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
            if m and len(line) - len(line.lstrip()) <= 8 and not line.startswith(" " * 9):
                current = m.group(1)
                out[current] = m.group(2)
            elif current is not None:
                out[current] += " " + line.strip()
    return {k: plain(v) for k, v in out.items()}


def _type_name(cls: Any, f: dataclasses.Field[Any]) -> str:
    try:
        hint = typing.get_type_hints(cls)[f.name]
    except Exception:  # a forward reference a plugin cannot resolve here
        return str(f.type)
    if isinstance(hint, type):
        return hint.__name__
    # fedlab.data.PublicSample | None -> PublicSample | None
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(hint))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def options(cls: Any) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, description)`` of every option of a dataclass strategy."""
    if not dataclasses.is_dataclass(cls):
        return []
    docs = option_docs(cls)
    return [
        (f.name, _type_name(cls, f), _default(f), docs.get(f.name, ""))
        for f in dataclasses.fields(cls)
        if f.init
    ]


def run(args: argparse.Namespace) -> int:
    """Print every strategy's one-line summary, or one strategy's options."""
    if args.name:
        return _describe(args.name)
    names = registry.names("strategies")
    width = max((len(n) for n in names), default=0) + 2
    for name in names:
        try:
            line = summary(registry.resolve("strategies", name))
        except Exception as e:  # a broken plugin must not hide the others
            line = f"(cannot load: {e})"
        print(f"{name:{width}s}{line}".rstrip())
    return 0


def _describe(name: str) -> int:
    cls = registry.resolve("strategies", name)  # ValueError with the close names if unknown
    print(f"{name}: {description(cls)}")
    rows = options(cls)
    if not rows:
        print("\nno options")
        return 0
    print("\noptions (--strategy-opt NAME=VALUE):")
    name_w = max(len(r[0]) for r in rows) + 2
    type_w = max(len(r[1]) for r in rows) + 2
    default_w = max(len(r[2]) for r in rows) + 2
    for option, kind, default, doc in rows:
        print(f"  {option:{name_w}s}{kind:{type_w}s}{default:{default_w}s}{doc}".rstrip())
    return 0
