"""The tiny recipe workspace and the tiny release, shared by the zoo's test modules (test_zoo, test_hub_faults,
test_pipeline, test_gates). The fixtures are in conftest: `recipe_workspace` (a fresh copy of the workspace,
built once per session) and `tiny_release` (the tiny recipe's v0.1.0, built once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"

ORG = "mla-zoo"
REPO_ID = f"{ORG}/Tiny-Llama-MLA"

# The tiny release; written beside the workspace's files, so its relative paths are relative to them.
RECIPE = """\
# A tiny release for tests; relative paths are relative to this file.
[release]
name = "{release_name}"
repo_id = "{repo_id}"
version = "{version}"
description = "A tiny random Llama (GQA), converted for the tests."
base_model = "mla-zoo-tests/tiny-llama-gqa"

[source]
model = "src"

[conversion]
kv_rank_per_head = 8
rope_pairs = 2
rope_strategy = "2-norm"
calib_text = "calib.txt"
calib_tokens = 256
calib_seq_len = 64
dtype = "float32"
{extra}
[eval]
text = "heldout.txt"
seq_len = 128
max_tokens = {max_tokens}

[eval.gates]
max_perplexity_increase = {gate}
min_kv_reduction = 0.5
"""


def make_workspace(root: Path, source: Path) -> Path:
    """A recipe directory in `root`: the tiny source as `src` (its README gives the license) and short texts,
    `calib.txt` and `heldout.txt` (the first 8,000 characters of data/'s)."""
    shutil.copytree(source, root / "src")
    (root / "src" / "README.md").write_text("---\nlicense: mit\n---\n# tiny source\n")
    (root / "calib.txt").write_text((DATA / "calib.txt").read_text()[:8000])
    (root / "heldout.txt").write_text((DATA / "heldout.txt").read_text()[:8000])
    return root


def write_recipe(root: Path, name: str = "tiny", *, version: str = "0.1.0", gate: float = 1.0,
                 max_tokens: int = 256, extra: str = "", repo_id: str = REPO_ID, release_name: str = "Tiny-Llama-MLA",
                 load: bool = True):
    """RECIPE as `root/name.toml`, loaded (its path with load=False). `extra`: sections added before [eval]."""
    from mla_zoo.zoo.release.recipe import load_recipe

    path = root / f"{name}.toml"
    path.write_text(RECIPE.format(version=version, gate=gate, max_tokens=max_tokens, extra=extra, repo_id=repo_id,
                                  release_name=release_name))
    return load_recipe(path) if load else path
