"""`mla-zoo synth-data`: the teacher's own distribution (prompts it writes, BOS samples), both engines."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_source
from mla_zoo.zoo.cli import main
from mla_zoo.zoo.train import data, prompts
from mla_zoo.zoo.train.prompts import build_openings, build_prompts, clean_prompt, held_out
from mla_zoo.zoo.train.sampler import Sampler
from mla_zoo.zoo.train.synth import parse_mix


def test_synth_data_writes_the_mix_in_shards_that_finetune_reads(source_dir, tokenizer, tmp_path, capsys):
    src = source_dir("llama-gqa")
    out = tmp_path / "synth"
    code = main(["synth-data", str(src), "-o", str(out), "--tokens", "600", "--seq-len", "32", "--batch-size", "8",
                 "--seed", "1", "--mix", "chat=0.5+bos=0.5", "--prompt-pool", "6"])
    assert code == 0
    assert "tokens/s" in capsys.readouterr().out
    report = json.loads((out / "synth.json").read_text())
    assert report["tokens"] >= 600 and report["chat"] and 1 <= report["prompt_count"] <= 6
    assert set(report["tokens_by_source"]) == {"chat", "bos"} and min(report["tokens_by_source"].values()) >= 300
    assert report["generated_tokens_per_second"] > 0 and report["settings"]["engine"] == "generate"  # auto on CPU
    calls = report["call_tokens"]  # every generation call: the prompts' first, then the samples'
    assert len(report["call_seconds"]) == len(calls) > report["prompt_calls"] >= 1
    assert sum(calls) == report["generated_tokens"]
    from safetensors.torch import load_file

    shard = load_file(out / "shard-00000.safetensors")
    ids, mask = shard["input_ids"], shard["attention_mask"]
    assert ids.dtype == torch.int32 and ids.shape[1] == 32 and int(mask.sum()) == report["tokens"]
    stream = tokenizer.decode(ids[mask.bool()].tolist())
    assert stream.startswith("<s>user: ") and "assistant:" in stream  # the chat share first: prompt, then answer
    # `--data DIR` reads it, at its own row length or re-packed to another
    rows = data.pack_rows(str(out), tokenizer, 32, progress=False)
    assert torch.equal(rows, ids[: rows.shape[0]])
    repacked = data.pack_rows(str(out), tokenizer, 20, progress=False)
    assert repacked.flatten().tolist() == ids[mask.bool()].tolist()[: repacked.numel()]
    assert main(["synth-data", str(src), "-o", str(out), "--tokens", "10"]) == 2  # exists: needs --overwrite


def test_a_kept_sample_is_reused_only_for_the_same_data_settings(source_dir, tmp_path):
    """finetune's teacher:MIX data keeps an earlier session's sample where every setting that shapes the data
    matches; the settings the machine resolves (batch size, engine, cache, dtype) do not count."""
    from mla_zoo.zoo.train.data import _same_synth
    from mla_zoo.zoo.train.settings import SynthSettings

    out = tmp_path / "kept"
    assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(out), "--tokens", "40", "--seq-len", "24",
                 "--batch-size", "2", "--mix", "bos=1"]) == 0
    same = SynthSettings(tokens=40, seq_len=24, mix="bos=1")
    assert _same_synth(out, same) and _same_synth(out, SynthSettings(tokens=40, seq_len=24, mix="bos=1", batch_size=9))
    for other in ({"fill_rows": False}, {"temperature": 0.5}, {"tokens": 41}, {"seed": 1}):
        assert not _same_synth(out, SynthSettings(**{"tokens": 40, "seq_len": 24, "mix": "bos=1", **other})), other
    assert not _same_synth(tmp_path / "none", same)


def test_bos_only_mix_needs_no_prompts(source_dir, tmp_path):
    out = tmp_path / "bos"
    assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(out), "--tokens", "100", "--seq-len", "16",
                 "--batch-size", "4", "--max-new-tokens", "10", "--mix", "bos=1", "--no-fill-rows"]) == 0
    report = json.loads((out / "synth.json").read_text())
    assert report["tokens_by_source"] == {"bos": report["tokens"]} and report["samples"] >= 100 // 11
    assert report["settings"]["fill_rows"] is False and report["settings"]["max_new_tokens"] == 10
    assert main(["synth-data", "x", "-o", str(tmp_path / "y"), "--tokens", "1", "--mix", "chat=0.5+code=0.5"]) == 2


def test_the_text_source_continues_plain_openings(source_dir, tokenizer, tmp_path):
    """`text`: BOS + an opening, no chat template, continued by the teacher; the openings reach code,
    documentation, dialogue and news-like prose, not only prose about the topics."""
    from safetensors.torch import load_file

    out = tmp_path / "text"
    assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(out), "--tokens", "64", "--seq-len", "16",
                 "--batch-size", "4", "--mix", "text=1", "--seed", "2"]) == 0
    report = json.loads((out / "synth.json").read_text())
    assert report["tokens_by_source"] == {"text": report["tokens"]} and report["prompt_count"] == 0
    stream = load_file(out / "shard-00000.safetensors")["input_ids"].flatten().tolist()  # rows of 16
    opening = [tokenizer.bos_token_id] + tokenizer(build_openings(2)[0], add_special_tokens=False)["input_ids"]
    assert stream[: len(opening)] == opening and "user:" not in tokenizer.decode(stream)

    openings = build_openings()
    assert build_openings(seed=1) != openings and sorted(build_openings(seed=1)) == sorted(openings)
    for kind in (prompts.CODE_OPENINGS, prompts.DOC_OPENINGS, prompts.TALK_OPENINGS, prompts.NEWS_OPENINGS):
        assert 0.05 < sum(o in kind for o in openings) / len(openings) < 0.3
    assert all(len(o.split()) <= 8 for o in openings), "an opening is a few words, never a passage of text"


def test_filled_rows_run_past_eos_to_the_row_length(source_dir, tmp_path):
    """fill_rows (the default): a sample is the prompt's padded width plus seq_len minus that width of new tokens,
    whatever EOS it writes, and nothing is appended; the teacher (GQA) samples with the packed attention."""
    from mla_zoo.zoo.train.packed_gqa import NAME
    from safetensors.torch import load_file

    out = tmp_path / "fill"
    assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(out), "--tokens", "200", "--seq-len", "40",
                 "--batch-size", "4", "--mix", "bos=1", "--temperature", "3"]) == 0
    report = json.loads((out / "synth.json").read_text())
    assert report["settings"]["fill_rows"] is True and report["attention"] == NAME
    assert report["generated_tokens"] == report["samples"] * (40 - 16)  # BOS padded to a width of 16
    ids = load_file(out / "shard-00000.safetensors")["input_ids"].flatten().tolist()
    sample = ids[: 1 + 40 - 16]
    assert sample[0] == 1 and ids[len(sample)] == 1  # the next sample starts right after: no EOS appended
    for refused in (["--engine", "continuous"], ["--max-new-tokens", "8"]):  # no rows to fill / no answers to cap
        assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(tmp_path / "x"), "--tokens", "10",
                     *refused]) == 2


def test_a_static_cache_samples_full_batches_only(source_dir, tmp_path):
    """With a static cache (CUDA's default: a compiled decode step per shape) every call has batch_size rows,
    even where a source needs fewer: a smaller batch would compile the step again."""
    out = tmp_path / "static"
    assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(out), "--tokens", "30", "--seq-len", "40",
                 "--batch-size", "4", "--mix", "bos=1", "--cache", "static"]) == 0
    report = json.loads((out / "synth.json").read_text())
    assert report["settings"]["cache"] == "static" and report["prompt_calls"] == 0
    assert report["call_tokens"] == [4 * (40 - 16)]  # one call of 4 rows, where 2 would do
    dynamic = tmp_path / "dynamic"
    assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(dynamic), "--tokens", "30", "--seq-len", "40",
                 "--batch-size", "4", "--mix", "bos=1", "--cache", "dynamic"]) == 0
    assert json.loads((dynamic / "synth.json").read_text())["call_tokens"] == [40 - 16] * 2  # chunks of 1 row


def test_a_filled_answer_goes_on_where_an_answer_stops():
    """Sampler.fill against __call__ on the same greedy path, with that path's first token as the EOS."""
    model = tiny_source("llama-gqa")
    prompts = [[1, 5, 6, 7], [1, 9]]
    first = Sampler(model, 0, [], "generate", "dynamic", None)(prompts, 1)[0][0]
    sampler = Sampler(model, pad_id=0, eos_ids=[first], engine="generate", cache="dynamic", temperature=None)
    stopped, filled = sampler(prompts, 20), sampler.fill(prompts, 32)
    assert stopped[0] == [first] and len(filled[0]) == len(filled[1]) == 32 - 16
    assert filled[0][0] == first and filled[0][:2] != stopped[0] and sampler.generated == 1 + len(stopped[1]) + 32


def test_a_static_cache_of_the_row_length_gives_the_dynamic_cache_s_answers():
    """The static cache (CUDA's default) of `cache_len` slots whatever the call's length, greedy, left padding,
    against the dynamic cache: answers that stop at EOS and filled rows."""
    model = tiny_source("llama-gqa")
    prompts = [[1, 5, 6, 7], [1, 9], [1, 30, 31, 32, 33, 34, 35]]
    dynamic = Sampler(model, pad_id=0, eos_ids=[2], engine="generate", cache="dynamic", temperature=None)
    static = Sampler(model, pad_id=0, eos_ids=[2], engine="generate", cache="static", temperature=None, cache_len=48)
    assert static(prompts, 12) == dynamic(prompts, 12)
    kept = static.static[1]
    assert static.fill(prompts, 48) == dynamic.fill(prompts, 48) and static.cache == "static"
    assert static.static[1] is kept  # the same shape: the cache is reset and reused
    assert len(static.fill(prompts, 48)[0]) == 48 - 16


def test_continuous_batching_gives_generate_s_greedy_answers():
    """The continuous-batching engine against generate(), greedy, prompts of different lengths (CPU)."""
    model = tiny_source("llama-gqa")
    prompts = [[1, 5, 6, 7], [1, 9], [1, 30, 31, 32, 33, 34, 35], [1, 200, 201]]
    answers = {}
    for engine in ("generate", "continuous"):
        sampler = Sampler(model, pad_id=0, eos_ids=[2], engine=engine, cache="dynamic", temperature=None)
        answers[engine] = sampler(prompts, 12)
        assert sampler.engine == engine and sampler.generated == sum(len(a) for a in answers[engine])
    assert answers["continuous"] == answers["generate"]
    assert all(0 < len(a) <= 12 for a in answers["generate"])


def test_a_failed_continuous_batching_falls_back_to_generate_with_the_decode_attention(capsys):
    """Continuous batching that fails (here: the model's generate_batch broken) -> generate(), and from then on the
    model decodes with the sampler's decode attention (packed GQA), as a sampler that started with generate()."""
    from mla_zoo.zoo.train.packed_gqa import NAME

    model = tiny_source("llama-gqa")
    reference = tiny_source("llama-gqa")
    assert model.config._attn_implementation == "sdpa"
    prompts = [[1, 5, 6, 7], [1, 9]]

    def broken(*args, **kwargs):
        raise RuntimeError("no paged cache here")

    model.generate_batch = broken
    sampler = Sampler(model, pad_id=0, eos_ids=[2], engine="continuous", cache="dynamic", temperature=None,
                      decode_attention="packed")
    assert model.config._attn_implementation == "sdpa"  # continuous batching keeps the model's attention
    expected = Sampler(reference, pad_id=0, eos_ids=[2], engine="generate", cache="dynamic", temperature=None,
                       decode_attention="packed")
    assert reference.config._attn_implementation == NAME
    assert sampler(prompts, 12) == expected(prompts, 12)
    assert sampler.engine == "generate" and model.config._attn_implementation == NAME
    assert "continuous batching failed (RuntimeError: no paged cache here); using generate()" in capsys.readouterr().out


def test_continuous_batching_keeps_one_manager_per_way_of_sampling():
    """Calls of the same sampling reuse the manager kept on the model (its cache, its warm-up); another
    temperature or length gets a new one; close() frees it. The answers stay generate()'s."""
    model = tiny_source("llama-gqa")
    reference = Sampler(model, pad_id=0, eos_ids=[2], engine="generate", cache="dynamic", temperature=None)
    sampler = Sampler(model, pad_id=0, eos_ids=[2], engine="continuous", cache="dynamic", temperature=None)
    first, second = [[1, 5, 6, 7], [1, 9]], [[1, 30, 31, 32], [1, 200, 201]]
    assert sampler(first, 12) == reference(first, 12)
    kept = model._cached_continuous_batching_manager
    assert sampler(second, 12) == reference(second, 12) and sampler.kept == (None, 12)
    assert model._cached_continuous_batching_manager is kept  # the same manager, not a new one per call
    assert sampler(first, 6) == reference(first, 6) and model._cached_continuous_batching_manager is not kept
    sampler.close()
    assert not hasattr(model, "_cached_continuous_batching_manager") and sampler.engine == "continuous"


def test_an_answer_stops_at_its_first_eos():
    sampler = Sampler(None, pad_id=0, eos_ids=[2, 7], engine="generate", cache="dynamic", temperature=None)
    assert sampler._cut([5, 6, 7, 2, 9]) == [5, 6, 7] and sampler._cut([5, 6]) == [5, 6]


def test_the_request_set_is_varied_and_prompts_are_cleaned():
    chat = build_prompts(chat=True)
    assert len(set(chat)) == len(chat) >= 600
    assert build_prompts(chat=True, seed=1) != chat and len(build_prompts(chat=False)) > 50
    assert clean_prompt('Question: "How do tides work?"\nMore text') == "How do tides work?"
    assert clean_prompt('Here is a question a student could ask: "Why is the sea salty?') == "Why is the sea salty?"
    assert clean_prompt("Sure! Here is a question") is None and clean_prompt("Why?") is None
    assert clean_prompt("I'm ready to help. What's your request?") is None
    assert clean_prompt("Ask: Why do friends drift apart?") == "Why do friends drift apart?"
    assert held_out(["What is the capital of France? Tell me.", "Name a river."],
                    ["what is the capital of  France?"]) == ["Name a river."]
    assert parse_mix("chat=3+bos=1") == {"chat": 0.75, "bos": 0.25}


@pytest.mark.parametrize("mix", ["chat=0+bos=0", "chat=1+chat=2"])
def test_bad_mixes_are_refused(mix):
    from mla_zoo.modeling.common import SynthError

    with pytest.raises(SynthError, match="mix"):
        parse_mix(mix)


def test_no_evaluation_prompt_survives_the_run_time_filter():
    """The prompts the teacher writes are filtered against every held-out prompt of data/eval."""
    from mla_zoo.zoo.evaluate.reports import DEFAULT_SUITE
    from mla_zoo.zoo.train.prompts import evaluation_prompts

    found = evaluation_prompts()
    chat = [x for x in (DEFAULT_SUITE / "chat_prompts.txt").read_text().splitlines() if x.strip()]
    behaviour = [x for x in (DEFAULT_SUITE / "behaviour.jsonl").read_text().splitlines() if x.strip()]
    assert len(found) == len(chat) + len(behaviour) >= 90
    written = [f"Please answer this: {p.upper()}" for p in found] + ["How do volcanoes form?"]
    assert held_out(written, found) == ["How do volcanoes form?"]


def test_synth_reports_of_the_first_format_still_load():
    from conftest import REPO
    from mla_zoo.zoo.train.synth import SynthReport

    report = SynthReport.read(REPO / "bench" / "results" / "recovery" / "synth.json")  # unversioned
    assert report.world_size == 1 and report.settings.tokens == report.tokens and report.settings.mix == "chat=1"
    assert SynthReport.from_json(report.to_json()) == report


def test_a_log_gets_a_progress_line_now_and_then(source_dir, tmp_path, monkeypatch, capsys):
    """stderr that is no terminal (a log file) gets no bar, so sampling says how far it is every LOG_EVERY
    seconds (0 here: after every chunk); progress=False (finetune --no-progress) keeps it quiet."""
    from mla_zoo.zoo.train import synth

    monkeypatch.setattr(synth, "LOG_EVERY", 0.0)
    args = ["synth-data", str(source_dir("llama-gqa")), "--tokens", "60", "--seq-len", "16", "--batch-size", "2",
            "--mix", "bos=1"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("synth-data: bos ")]
    assert len(lines) >= 2 and lines[-1].endswith("generated tokens/s so far") and " of 60 tokens" in lines[-1]
    settings = synth.SynthSettings(tokens=60, seq_len=16, batch_size=2, mix="bos=1")
    synth.synth_data(str(source_dir("llama-gqa")), tmp_path / "b", settings, progress=False)  # finetune --no-progress
    assert "synth-data: bos " not in capsys.readouterr().err


def test_the_flex_decode_attention_samples_what_the_packed_one_does(source_dir, tmp_path, monkeypatch):
    """`decode_attention` flex (filled cache slots only) against the packed SDPA default: same seed, same static
    cache, the same shards (eager on CPU: flex's reference path, exact to float32 rounding), and flex ran."""
    from mla_zoo.zoo.train import flex_decode
    from safetensors.torch import load_file

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return flex_attention(*args, **kwargs)

    flex_attention = flex_decode.flex_attention
    monkeypatch.setattr(flex_decode, "flex_attention", counted)
    shards = {}
    for attention in ("packed", "flex"):
        out = tmp_path / attention
        assert main(["synth-data", str(source_dir("llama-gqa")), "-o", str(out), "--tokens", "100", "--seq-len", "40",
                     "--batch-size", "4", "--mix", "bos=1", "--cache", "static", "--decode-attention", attention]) == 0
        report = json.loads((out / "synth.json").read_text())
        assert report["settings"]["decode_attention"] == attention
        shards[attention] = load_file(out / "shard-00000.safetensors")["input_ids"]
    assert report["attention"] == flex_decode.NAME and len(calls) > 0  # every decode step of the flex run
    assert torch.equal(shards["packed"], shards["flex"])
