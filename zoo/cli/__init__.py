"""The `mla-zoo` command line (`main`), one module per command group: `convert` (convert, eval),
`train` (synth-data, finetune), `release` (build, publish, list, info, pull)."""

from .main import main

__all__ = ["main"]
