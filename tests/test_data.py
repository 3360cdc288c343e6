"""Data specs and packing for `mla-zoo finetune`, and `mla-zoo synth-data` shards."""

from __future__ import annotations

import json
import sys

import pytest
import torch
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

    from transformers import LlamaConfig

    config = LlamaConfig(max_position_embeddings=256)  # a real model config, as finetune passes it
    with pytest.raises(data.DataError, match=r"beyond the model's max_position_embeddings \(256\)"):
        data.check_seq_len(512, config)
    data.check_seq_len(256, config)  # the limit itself fits
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
