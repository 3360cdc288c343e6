"""`python -m mla_zoo.export {export,build-kernels,generate} --help`: the export commands without the
main CLI (which wires the same settings dataclasses as `mla-zoo export / build-kernels / generate`)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from .exporter import ExportSettings, run_export
    from .kernels.build import BuildSettings, build_kernels
    from .runner import GenerateSettings, run_generate

    commands = {"export": (ExportSettings, run_export), "build-kernels": (BuildSettings, build_kernels),
                "generate": (GenerateSettings, run_generate)}
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in commands:
        print(f"usage: python -m mla_zoo.export {{{','.join(commands)}}} --help", file=sys.stderr)
        return 2
    settings_cls, run = commands[argv[0]]
    (settings,) = HfArgumentParser(settings_cls).parse_args_into_dataclasses(argv[1:])
    print(json.dumps(asdict(run(settings)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
