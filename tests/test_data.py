"""Data specs and packing for `mla-zoo finetune`, and `mla-zoo synth-data` shards."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from mla_zoo.zoo.cli import main
from mla_zoo.zoo.train import data


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text_files_pack_with_eos_between_documents(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("It is a truth universally acknowledged.")
    (tmp_path / "b.md").write_text("Emma Woodhouse, handsome, clever, and rich.")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    eos = tokenizer.eos_token_id
    stream = ids_of(tokenizer, "It is a truth universally acknowledged.") + [eos]
    stream += ids_of(tokenizer, "Emma Woodhouse, handsome, clever, and rich.") + [eos]
    rows = data.pack_rows(str(tmp_path), tokenizer, 8, progress=False)
    n = len(stream) // 8
    assert rows.dtype == torch.int32 and rows.shape == (n, 8)
    assert rows.flatten().tolist() == stream[: n * 8]
    assert data.pack_rows(str(tmp_path), tokenizer, 8, max_rows=2, progress=False).shape == (2, 8)
    # a glob names the same files
    assert torch.equal(data.pack_rows(str(tmp_path / "*.*t*"), tokenizer, 8, progress=False)[:1], rows[:1])


def test_jsonl_text_and_messages(tmp_path, tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "Plain words here."}) + "\n\n" + json.dumps({"messages": msgs}) + "\n")
    rows = data.pack_rows(str(f), tokenizer, 4, progress=False)
    eos = tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template(msgs, tokenize=False)
    stream = ids_of(tokenizer, "Plain words here.") + [eos] + ids_of(tokenizer, chat) + [eos]
    assert rows.flatten().tolist() == stream[: rows.numel()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: a record needs a 'text'"):
        data.pack_rows(str(bad), tokenizer, 4, progress=False)


def test_parquet_text_column(tmp_path, tokenizer):
    import pyarrow as pa  # the dev extra has it
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["First document.", "Second one."]}), tmp_path / "d.parquet")
    rows = data.pack_rows(str(tmp_path / "d.parquet"), tokenizer, 4, progress=False)
    eos = tokenizer.eos_token_id
    stream = ids_of(tokenizer, "First document.") + [eos] + ids_of(tokenizer, "Second one.") + [eos]
    assert rows.flatten().tolist() == stream[: rows.numel()]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(data.DataError, match="no 'text' column"):
        data.pack_rows(str(tmp_path / "e.parquet"), tokenizer, 4, progress=False)


def test_spec_errors(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(data.DataError, match="matches no files"):
        data.resolve_files(str(tmp_path / "*.jsonl"))
    with pytest.raises(data.DataError, match="matches no files"):
        data.resolve_files(str(tmp_path))  # an empty directory
    with pytest.raises(data.DataError, match="no such file"):
        data.resolve_files(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(data.DataError, match="cannot read"):
        data.resolve_files(str(tmp_path / "x.csv"))
    (tmp_path / "short.txt").write_text("Hi.")
    with pytest.raises(data.DataError, match="fewer than one row"):
        data.pack_rows(str(tmp_path / "short.txt"), tokenizer, 64, progress=False)

    class Cfg:
        max_position_embeddings = 256

    with pytest.raises(data.DataError, match=r"beyond the model's max_position_embeddings \(256\)"):
        data.check_seq_len(512, Cfg())
    with pytest.raises(data.DataError, match="hf:NAME"):
        data.parse_hf_spec("hf:")
    assert data.parse_hf_spec("hf:org/name") == ("org/name", None, "train")
    assert data.parse_hf_spec("hf:org/name:cfg:validation") == ("org/name", "cfg", "validation")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(data.DataError, match="needs the datasets package"):
        data.pack_rows("hf:some/dataset", tokenizer, 8, progress=False)


def test_hf_spec_streams_a_local_dataset(tmp_path, tokenizer):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"Line number {i}."}) + "\n" for i in range(20)))
    rows = data.pack_rows(f"hf:{folder}", tokenizer, 8, progress=False)
    want = data.pack_rows(str(folder / "train.jsonl"), tokenizer, 8, progress=False)
    assert torch.equal(rows, want)


def test_synth_data_writes_shards_that_finetune_reads(source_dir, tokenizer, tmp_path, capsys):
    src = source_dir("llama-gqa")
    out = tmp_path / "synth"
    code = main(["synth-data", str(src), "-o", str(out), "--tokens", "600", "--seq-len", "32", "--batch-size", "8",
                 "--max-new-tokens", "24", "--seed", "1"])
    assert code == 0
    assert "tokens/s" in capsys.readouterr().out
    report = json.loads((out / "synth.json").read_text())
    assert report["tokens"] >= 600 and report["chat"] and report["prompt_count"] >= 400
    assert report["generated_tokens_per_second"] > 0
    from safetensors.torch import load_file

    shard = load_file(out / "shard-00000.safetensors")
    ids, mask = shard["input_ids"], shard["attention_mask"]
    assert ids.dtype == torch.int32 and ids.shape[1] == 32 and int(mask.sum()) == report["tokens"]
    text = tokenizer.decode(ids[0].tolist())
    assert text.startswith("<s>user: ") and "assistant:" in text  # prompts in chat format, then the answer
    # `--data DIR` reads it, at its own row length or re-packed to another
    rows = data.pack_rows(str(out), tokenizer, 32, progress=False)
    assert torch.equal(rows, ids[: rows.shape[0]])
    repacked = data.pack_rows(str(out), tokenizer, 20, progress=False)
    assert repacked.flatten().tolist() == ids[mask.bool()].tolist()[: repacked.numel()]
    assert main(["synth-data", str(src), "-o", str(out), "--tokens", "10"]) == 2  # exists: needs --overwrite


def test_prompt_set_is_varied():
    from mla_zoo.zoo.train.synth import build_prompts

    chat = build_prompts(chat=True)
    assert len(set(chat)) == len(chat) >= 600
    assert any("capital of" in p for p in chat) and any("short story" in p for p in chat)
    assert build_prompts(chat=True, seed=1) != chat
    assert len(build_prompts(chat=False)) > 50


def test_a_mix_takes_an_equal_share_of_rows_from_each_part(tmp_path, tokenizer):
    from mla_zoo.zoo.train.data import describe, pack_rows

    long, short = tmp_path / "long.txt", tmp_path / "short.txt"
    long.write_text("It is a truth universally acknowledged. " * 200)
    short.write_text("The capital of France is Paris. " * 10)
    alone = pack_rows(str(short), tokenizer, 16, progress=False)
    rows = pack_rows(f"{long},{short}", tokenizer, 16, max_rows=40, progress=False)
    assert rows.shape == (40, 16)
    assert describe(f"{long},{short}").kind == "mix"
    # the second half is the short part, repeated to its share
    assert all(any(torch.equal(r, a) for a in alone) for r in rows[20:])
    assert not any(any(torch.equal(r, a) for a in alone) for r in rows[:20])
