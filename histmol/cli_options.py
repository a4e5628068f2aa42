"""Typer options derived from the option specs (histmol.options), so no command copies them.

A command takes its own few parameters and ``**given``; `with_options(specs...)` gives it a
signature whose extra keyword parameters are the specs' options (flag, type, default, help; a
callback refuses what the spec refuses, with BuildConfig's message), which typer reads through
``inspect.signature``. Typer then passes their values by name into ``given``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from histmol.options import EXTRA, OptionSpec

F = TypeVar("F", bound=Callable[..., Any])


def checker(spec: OptionSpec) -> Callable[[Any], Any]:
    """A typer callback refusing what `spec` refuses, with the message BuildConfig gives."""
    def check(value: Any) -> Any:
        message = spec.problem(value)
        if message:
            raise typer.BadParameter(message)
        return value
    return check


def parameter(spec: OptionSpec) -> inspect.Parameter:
    """The keyword parameter typer reads as `spec`'s command-line option."""
    if spec.scope == EXTRA:  # passed through to the adapter: repeatable KEY=VALUE
        kind: Any = Optional[list[str]]  # noqa: UP045 - typer reads Optional
        info = typer.Option(spec.cli_flag, metavar="KEY=VALUE", help=f"{spec.help} Repeatable.")
        return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY,
                                 annotation=Annotated[kind, info], default=None)
    kind = Path if spec.path else str if spec.choices else spec.value_type
    if spec.default is None:
        kind = Optional[kind]  # noqa: UP045 - typer reads Optional
    show: bool | str = True  # typer shows a value as it is: "[default: 224]"
    if spec.default_text is not None:
        show = spec.default_text  # and a text in parentheses: "[default: (the platform's)]"
    elif spec.default in (None, ""):
        show = False
    bounds = spec.bounds_text()
    info = typer.Option(*([spec.cli_flag] if spec.flag else []),
                        help=spec.help + (f" Allowed: {bounds}." if bounds else ""),
                        show_default=show, metavar="|".join(spec.choices) or None,
                        callback=checker(spec))
    default = inspect.Parameter.empty if spec.required else spec.default
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=Annotated[kind, info], default=default)


def with_options(*groups: Iterable[OptionSpec], own_first: bool = False) -> Callable[[F], F]:
    """Give a command taking ``**given`` one keyword option per spec of `groups`.

    The command's own parameters follow the specs' (precede them with `own_first`); required
    options come first in help.
    """
    def decorate(command: F) -> F:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        derived = [parameter(spec) for group in groups for spec in group]
        names = [p.name for p in own] + [p.name for p in derived]
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: an option is declared twice in {names}")
        ordered = sorted(own + derived if own_first else derived + own,
                         key=lambda p: p.default is not inspect.Parameter.empty)
        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            ordered, return_annotation=None)
        return command
    return decorate


def pick(given: Mapping[str, Any], specs: Iterable[OptionSpec]) -> dict[str, Any]:
    """The values of `specs` among a command's ``given`` options, by name."""
    return {spec.name: given[spec.name] for spec in specs}
