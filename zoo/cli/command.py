"""What a subcommand of `mla-zoo` is: a name, a help line, the settings dataclasses its flags are
generated from, and a function that runs it with one instance of each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mla_zoo.modeling.schema import Settings, setting


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    schema: tuple[type, ...]  # settings dataclasses (no field name twice)
    run: Callable[..., int]  # run(*instances) -> exit status


@dataclass
class Output(Settings):
    json: bool = setting(False, help="print the result as JSON")
