"""`mla-zoo synth-data` under `torchrun` (2 CPU processes, gloo): the processes share the chunks, and
the main process writes the same shards as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

ARGS = ["--tokens", "600", "--seq-len", "32", "--batch-size", "4", "--seed", "3",
        "--mix", "chat=0.5+bos=0.5", "--prompt-pool", "4"]


def synth(source, out, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    launch = launch if processes > 1 else []
    cmd = [sys.executable, *launch, "-m", "mla_zoo.zoo.cli", "synth-data", str(source), "-o", str(out), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_write_the_shards_of_one(source_dir, tmp_path):
    src = source_dir("llama-gqa")
    one, two = tmp_path / "one", tmp_path / "two"
    synth(src, one, 1)
    proc = synth(src, two, 2)
    assert proc.stdout.count("wrote ") == 1 and "x 2 processes" in proc.stdout  # one summary, by the main process

    shards = sorted(p.name for p in one.glob("shard-*.safetensors"))
    assert shards and shards == sorted(p.name for p in two.glob("shard-*.safetensors"))
    for name in shards:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    a, b = (json.loads((d / "synth.json").read_text()) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for key in ("tokens", "samples", "rows", "tokens_by_source", "prompt_count", "example_prompts"):
        assert a[key] == b[key], key
    assert min(a["tokens_by_source"].values()) >= 300
    # the chunks go with the temporary directory; nothing else is left next to the output
    assert sorted(p.name for p in two.iterdir()) == sorted(shards + ["synth.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
