"""The `mla-zoo` command line: one subcommand per stage of recipe -> convert -> ... -> publish.

Each subcommand's flags are generated (transformers' `HfArgumentParser`) from settings
dataclasses: the stage's own settings, which a recipe section is validated against too, and the
command's (what to read, where to write, how to print). Every value is checked when those are
built, before any work starts. Errors of mla-zoo (`MlaZooError`) print one line that names the
flag, and exit with status 2 (1 for a failed release gate).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import sys
import types
import typing

from mla_zoo.modeling.common import GateFailed, MlaZooError, name_fields
from transformers import HfArgumentParser

from . import convert, export, pipeline, release, train
from .command import Command

GROUPS = (convert.COMMANDS, train.COMMANDS, export.COMMANDS, release.COMMANDS, pipeline.COMMANDS)


def _base_type(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def flag(field: dataclasses.Field) -> str:
    """How the command line names a field: its documented long alias, else --name-with-dashes."""
    if field.metadata.get("positional"):
        return field.metadata.get("metavar", field.name.upper())
    aliases = [a for a in field.metadata.get("aliases", []) if a.startswith("--")]
    return aliases[0] if aliases else "--" + field.name.replace("_", "-")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one and the help line does not already say it."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == () or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class SettingsParser(HfArgumentParser):
    """HfArgumentParser with the flags mla-zoo documents: `--name-with-dashes` plus `aliases`,
    positional fields (`positional=True`), on/off flags for booleans (`--x`, or `--x/--no-x` when
    the default is not False) and comma lists (`sep=","`). Values are checked by the dataclasses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_Help, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        meta = field.metadata
        kind = _base_type(field.type)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if field.default is dataclasses.MISSING else field.default
        common = {"default": default, "help": meta.get("help")}
        if meta.get("positional"):
            parser.add_argument(field.name, nargs=None if required else "?", metavar=flag(field), **common)
            return
        names = ["--" + field.name.replace("_", "-"), *meta.get("aliases", [])]
        if kind is bool:
            action = "store_true" if default is False else argparse.BooleanOptionalAction
            parser.add_argument(*names, dest=field.name, action=action, **common)
        elif "sep" in meta:
            parser.add_argument(*names, dest=field.name, metavar=meta.get("metavar", f"A{meta['sep']}B"),
                                type=lambda v: tuple(x.strip() for x in v.split(meta["sep"]) if x.strip()), **common)
        else:
            many = typing.get_origin(kind) in (list, tuple)
            parser.add_argument(*names, dest=field.name, required=required, choices=meta.get("choices"),
                                type=typing.get_args(kind)[0] if many else kind, nargs="+" if many else None,
                                metavar=meta.get("metavar"), **common)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mla-zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"mla-zoo {importlib.metadata.version('mla-zoo')}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SettingsParser)
    for group in GROUPS:
        for command in group:
            sub.add_parser(command.name, help=command.help, description=command.help,
                           dataclass_types=command.schema).set_defaults(run=command)
    return p


def run(command: Command, args: argparse.Namespace) -> int:
    """Build the command's settings from the parsed flags (checking every value), then run it."""
    values = [cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}) for cls in command.schema]
    return command.run(*values)


def quiet_progress_bars() -> None:
    """No progress bars in logs: when stderr is not a terminal, transformers' and huggingface_hub's
    bars are turned off (mla-zoo's own check it themselves, `common.progress_bar`)."""
    if sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_progress_bars()
    command = args.run
    flags = {f.name: flag(f) for cls in command.schema for f in dataclasses.fields(cls)}
    try:
        return run(command, args)
    except GateFailed as e:
        print(f"mla-zoo {command.name}: {e}", file=sys.stderr)
        return 1
    except MlaZooError as e:
        print(f"mla-zoo {command.name}: error: {name_fields(str(e), flags.get)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
