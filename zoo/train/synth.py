"""`mla-zoo synth-data`: distillation data sampled from the original model itself (no corpus needed).

The data is a MIX of the teacher's own distribution, in shares of tokens (`mix`, default `chat=0.4+bos=0.2+text=0.4`):

* `chat` (an instruct model, i.e. its tokenizer has a chat template): the teacher WRITES the prompts,
  then answers them. It is asked, for each of ~100 broad topics and a few request kinds
  (`prompts.build_prompts`), to write one question or instruction a user might send; its reply (sampled at
  `prompt_temperature` 0.7: a 135M model's prompts at 1.0 are often garbled; first line, cleaned)
  becomes a user prompt, and its sampled answer to that prompt is
  one sample (prompt + answer in chat format). A base model continues short openings instead.
* `bos`: unconditional samples from BOS (or EOS where the tokenizer has no BOS) at the temperature:
  whatever the model writes when nothing is asked.
* `text`: the teacher continues short plain-text openings (`prompts.build_openings`, no chat template) across the kinds
  of text a user serves: prose on the topics, source code in several languages, documentation, dialogue,
  encyclopedic and news-like prose. An instruct model's chat answers and BOS samples hardly reach raw
  source code or manuals; these openings do, still in the teacher's own words.

With `fill_rows` (the default) a sample does not stop at its EOS: the teacher writes on (its next
turn, or a next document) until prompt + sample fill a row of `seq_len` tokens. That is still the
teacher's own distribution, now over whole rows, which is what the KL is computed on; and no row of a
fixed batch ends early, so every generated token is kept. Without it, answers stop at their EOS (at most
`max_new_tokens`).

No evaluation prompt enters (`prompts.py`): the shipped topics and request kinds are held out from data/eval
(tests/test_eval_data.py), and a written prompt that equals or contains an evaluation prompt is
dropped at run time. Samples are concatenated (EOS after each) and packed into rows of `seq_len`
tokens, written as `shard-NNNNN.safetensors` (`input_ids` int32 [rows, seq_len], `attention_mask`
uint8: only the last row may hold padding) plus `synth.json`. `--data DIR` of `mla-zoo finetune`
reads such a directory, and `--data teacher:MIX` makes finetune sample one itself (`data.py`).

Engines (`engine`, `sampler.py`): `continuous` = transformers' continuous batching (`generate_batch`): a finished
row leaves the batch at once and a waiting one takes its place; `generate` = `generate()` in
fixed batches (static cache on CUDA, compiled by transformers), every row running to the longest,
the teacher's GQA decode attention packed instead of repeating K/V (`packed_gqa.py`), or with
`decode_attention` flex reading only the filled cache slots (`flex_decode.py`). `auto` takes
`generate` with `fill_rows`, else continuous batching on CUDA where the installed transformers has it
(5.17 and 5.24 do), falling back to `generate` (said on stdout) if it fails.

Several processes (`torchrun --nproc_per_node N` or `accelerate launch`, one machine) share the work
data-parallel and write the same shards as one process: see "chunks and processes" below.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from mla_zoo.modeling.common import SynthError, atomic_directory, check_output_dir, progress_bar
from mla_zoo.modeling.schema import Report
from mla_zoo.modeling.sources import SourceInfo

from .prompts import build_openings, build_prompts, chat_ids, evaluation_prompts, write_prompts
from .sampler import Sampler, has_continuous_batching
from .settings import SynthSettings

SOURCES = ("chat", "bos", "text")
SHARD_ROWS = 2048


def parse_mix(mix: str) -> dict[str, float]:
    """`chat=0.7+bos=0.3` -> {"chat": 0.7, "bos": 0.3} (shares normalised to sum 1)."""
    parts = [p.split("=") for p in mix.split("+")]
    shares = {name: float(value) for name, value in parts}
    if len(shares) != len(parts) or sum(shares.values()) <= 0:
        raise SynthError(f"`mix` {mix}: name each source once, with a positive share")
    total = sum(shares.values())
    return {name: value / total for name, value in shares.items() if value > 0}


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    ids = list(eos) if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids if i is not None]


class _ShardWriter:
    """Packs a token stream into [rows, seq_len] and writes shards of SHARD_ROWS rows."""

    def __init__(self, out: Path, seq_len: int, pad_id: int, shard_rows: int = SHARD_ROWS):
        self.out, self.seq_len, self.pad_id, self.shard_rows = out, seq_len, pad_id, shard_rows
        self.buf: list[int] = []
        self.rows: list[list[int]] = []
        self.shards = 0
        self.total_rows = 0

    def add(self, tokens: list[int]) -> None:
        self.buf.extend(tokens)
        while len(self.buf) >= self.seq_len:
            self.rows.append(self.buf[: self.seq_len])
            self.buf = self.buf[self.seq_len :]
            if len(self.rows) >= self.shard_rows:
                self._write()

    def _write(self, last_len: int | None = None) -> None:
        from safetensors.torch import save_file

        ids = torch.tensor(self.rows, dtype=torch.int32)
        mask = torch.ones_like(ids, dtype=torch.uint8)
        if last_len is not None:
            mask[-1, last_len:] = 0
        save_file({"input_ids": ids, "attention_mask": mask}, str(self.out / f"shard-{self.shards:05d}.safetensors"))
        self.shards += 1
        self.total_rows += len(self.rows)
        self.rows = []

    def close(self) -> None:
        last_len = None
        if self.buf:
            last_len = len(self.buf)
            self.rows.append(self.buf + [self.pad_id] * (self.seq_len - len(self.buf)))
            self.buf = []
        if self.rows:
            self._write(last_len)


@dataclass
class SynthReport(Report):
    """synth.json: what was sampled, and how fast."""

    SCHEMA_VERSION = 5  # 2: mix, per-source tokens, the engine, teacher-written prompts; 3: chunks, world_size;
    # 4: fill_rows (samples past EOS to seq_len), the attention; 5: the main process's calls, steady without prompts
    FILE = "synth.json"

    model: str
    source: SourceInfo
    settings: SynthSettings  # resolved: max_new_tokens, engine, cache and dtype as used
    tokens: int
    generated_tokens: int
    samples: int
    rows: int
    shards: int
    prompt_count: int  # distinct user prompts (the teacher's own, for the chat share)
    chat: bool
    device: str
    seconds: float
    generation_seconds: float
    generated_tokens_per_second: float
    tokens_per_second: float
    steady_generated_tokens_per_second: float | None  # the samples without their first call (compilation, warm-up)
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    prompt_seconds: float = 0.0  # writing the prompts (part of generation_seconds)
    example_prompts: list[str] = field(default_factory=list)
    world_size: int = 1  # processes that sampled (torchrun / accelerate launch)
    attention: str = "sdpa"  # the teacher's attention while sampling (generate: packed_gqa or flex_decode NAME)
    call_seconds: list[float] = field(default_factory=list)  # each generation call of the main process, in order:
    call_tokens: list[int] = field(default_factory=list)  # ... the prompts' calls first (prompt_calls of them)
    prompt_calls: int = 0

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        """Version 1: the fixed template prompts, one engine, a padded prompt length. Versions 1 and 2:
        one process, sampling batch after batch from one seed (not in chunks)."""
        data = dict(data)
        data.pop("prompt_pad_len", None)
        if version == 1:  # its settings had the padded prompt length, not the token target
            data["settings"] = {k: v for k, v in data["settings"].items() if k != "prompt_pad_len"}
            data["settings"].setdefault("tokens", data["tokens"])
            data["settings"].setdefault("mix", "chat=1")  # prompts only, from templates
        data.setdefault("world_size", 1)
        if version < 4:  # answers stopped at EOS
            data["settings"] = {**data["settings"], "fill_rows": False}
        return data


# ----------------------------------------------------------------------------- the sources


def _encoded(source: str, chat: bool, tokenizer, prompts: list[str], seed: int) -> list[list[int]]:
    """The prompt ids of a source, cycled through by its requests: the chat prompts (a base model: its
    openings), BOS, or the text openings."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if source == "bos":
        return [bos or [tokenizer.eos_token_id]]
    if source == "chat" and chat:
        return [chat_ids(tokenizer, p) for p in prompts]
    openings = prompts if source == "chat" else build_openings(seed)
    return [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in openings]


# ----------------------------------------------------------------------------- chunks and processes
#
# The samples are drawn in CHUNKS that do not depend on the number of processes: chunk k of a source
# is its k-th batch of `chunk` requests (request j asks prompt j of the source's cycled prompt list),
# sampled right after the RNG is seeded from (seed, source, k). Launched by `torchrun` or `accelerate
# launch`, process i of N samples chunks i, i+N, ... of each source (round by round, until the chunks
# sampled hold the source's share) and saves them in the main process's temporary output directory;
# the main process then packs them in chunk order, sample by sample until the share is reached. So
# the shards are the same for any N (bit for bit on CPU). The teacher's prompts are written by the
# main process alone and sent to the others. All processes must see one file system (one machine).

LOG_EVERY = 60.0  # seconds between progress lines when stderr is a log, not a terminal (no bar there)
CHUNKS = ".chunks"  # inside the temporary output directory; removed before it is renamed into place


def chunk_seed(seed: int, source: str, k: int) -> int:
    """The RNG seed of chunk k of a source: the same whichever process samples it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source}:{k}".encode()).digest()[:8], "little") >> 1


def _chunk_file(tmp: Path, source: str, k: int) -> Path:
    return tmp / CHUNKS / f"{source}-{k:06d}.safetensors"


def _all(value, world: int) -> list:
    """`value` of every process, in rank order (every process must call it)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def _from_main(value, world: int):
    """The main process's `value`, in every process (every process must call it)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wait(world: int) -> None:
    """Until every process gets here."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def sample_chunks(sampler: Sampler, encoded: list[list[int]], source: str, target: int, chunk: int, max_new: int,
                  eos: int, seed: int, tmp: Path, rank: int, world: int, bar, fill_to: int | None = None) -> int:
    """Sample chunks of a source, this process's share of each round (see above), into `tmp`/CHUNKS until
    the chunks of all processes hold `target` tokens; returns how many chunks were sampled. `fill_to`: each
    sample runs on to that many tokens (`Sampler.fill`) instead of answers of up to `max_new` ending at EOS."""
    from safetensors.torch import save_file

    sampled = done = 0
    while done < target:
        k = sampled + rank
        torch.manual_seed(chunk_seed(seed, source, k))  # all devices too
        batch = [encoded[(k * chunk + j) % len(encoded)] for j in range(chunk)]
        answers = sampler.fill(batch, fill_to) if fill_to else sampler(batch, max_new)
        samples = [p + a for p, a in zip(batch, answers, strict=True)]
        if not fill_to:  # an answer cut by max_new ends with an EOS too (a filled row runs on to the next sample)
            samples = [x if x[-1] == eos else x + [eos] for x in samples]
        tokens = torch.tensor([t for x in samples for t in x], dtype=torch.int32)  # [sum of lengths]
        lengths = torch.tensor([len(x) for x in samples], dtype=torch.int64)  # [chunk]
        save_file({"tokens": tokens, "lengths": lengths}, str(_chunk_file(tmp, source, k)))
        added = sum(_all(tokens.numel(), world))
        done, sampled = done + added, sampled + world
        bar.update(added)
        bar.set_postfix(gen_tok_s=f"{sampler.rate:.0f}")
        if sampler.log_every is not None and time.time() - sampler.said >= sampler.log_every:
            sampler.said = time.time()
            print(f"synth-data: {source} {done:,} of {target:,} tokens, {sampler.rate:,.0f} generated tokens/s so far",
                  file=sys.stderr, flush=True)
    return sampled


def pack_chunks(tmp: Path, source: str, target: int, writer: _ShardWriter) -> tuple[int, int]:
    """The chunks of a source, in chunk order, into `writer`, sample by sample until `target` tokens;
    returns (tokens, samples) written."""
    from safetensors.torch import load_file

    tokens = samples = k = 0
    while tokens < target:
        chunk = load_file(_chunk_file(tmp, source, k))
        for sample in torch.split(chunk["tokens"], chunk["lengths"].tolist()):  # [length] each
            if tokens >= target:
                break
            writer.add(sample.tolist())
            tokens, samples = tokens + sample.numel(), samples + 1
        k += 1
    return tokens, samples


# ----------------------------------------------------------------------------- the run


def synth_data(source: str, out: str | Path, settings: SynthSettings, *, overwrite: bool = False,
               progress: bool = True, distributed: bool = False) -> SynthReport:
    """Sample about `settings.tokens` tokens from SOURCE into shards under `out` (written atomically,
    with synth.json). `distributed`: share the work with the other processes of a `torchrun` /
    `accelerate launch` (every one of them calls this; the main process writes `out`)."""
    from mla_zoo.modeling import sources

    s, out = settings, Path(out)
    check_output_dir(out, marker=SynthReport.FILE, overwrite=overwrite, inputs={"source": source})
    shares = parse_mix(s.mix)
    started = time.time()
    cuda = torch.cuda.is_available()
    if distributed:
        from accelerate import PartialState

        state = PartialState(cpu=not cuda)  # joins the process group under torchrun / accelerate launch
        device, rank, world = state.device, state.process_index, state.num_processes
    else:
        device, rank, world = torch.device("cuda" if cuda else "cpu"), 0, 1
    main = rank == 0
    torch_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16}[s.dtype]
    model, tokenizer, info = sources.resolve(source, dtype=torch_dtype)
    model.to(device).eval()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and s.seq_len > max_pos:
        raise SynthError(f"`seq_len` {s.seq_len} is beyond the model's max_position_embeddings ({max_pos})")
    if tokenizer.eos_token_id is None:
        raise SynthError("the tokenizer has no EOS token to end the samples with")
    chat = bool(getattr(tokenizer, "chat_template", None))
    engine = s.engine if s.engine != "auto" else "continuous" if cuda and not s.fill_rows else "generate"
    if engine == "continuous" and not has_continuous_batching(model):
        print("synth-data: this transformers has no continuous batching (generate_batch); using generate()")
        engine = "generate"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler_cache = "static" if s.cache == "static" or (s.cache == "auto" and cuda) else "dynamic"
    decode = s.decode_attention  # generate()'s decode attention (`packed_gqa.py`, `flex_decode.py`)
    if decode == "auto":
        decode = "flex" if cuda and sampler_cache == "static" else "packed"
    sampler = Sampler(model, pad, _eos_ids(model, tokenizer), engine, sampler_cache, s.temperature,
                      cache_len=s.seq_len, decode_attention=decode)
    if progress and main and not sys.stderr.isatty():
        sampler.log_every = LOG_EVERY
    try:  # the sampler's continuous-batching manager holds a paged cache on the GPU: always freed
        torch.manual_seed(s.seed)  # the prompts; each chunk of samples seeds its own (`chunk_seed`)

        batch_size = s.batch_size or (1024 if cuda else 64)
        prompts = build_prompts(chat, s.seed) if "chat" in shares else []  # the chat share's (text: its own)
        if chat and "chat" in shares:
            if main:
                pool = min(s.prompt_pool, math.ceil(shares["chat"] * s.tokens / 128))  # no more than the share can use
                prompts = write_prompts(sampler, tokenizer, prompts, pool, batch_size, evaluation_prompts(),
                                        s.prompt_temperature)
            prompts = _from_main(prompts, world)
            if not prompts:
                raise SynthError(f"{source} wrote no usable prompts; use `mix` bos=1 for unconditional samples only")
        prompt_seconds, prompt_calls = sampler.seconds, len(sampler.calls)
        max_new = s.seq_len if s.fill_rows else s.max_new_tokens or s.seq_len
        targets = {name: math.ceil(share * s.tokens) for name, share in shares.items()}
        # every chunk a full batch where a call's shape compiles (a static cache): a smaller last source's chunk
        # recompiled the decode step (64 s against 25 s on an H100), more than the rows it saves
        chunks = {name: batch_size if sampler.cache == "static" else min(batch_size, math.ceil(target / max_new))
                  for name, target in targets.items()}
        with atomic_directory(out) if main else contextlib.nullcontext() as tmp:
            tmp = _from_main(tmp, world)  # the main process's temporary directory
            if main:
                (tmp / CHUNKS).mkdir()
            _wait(world)  # ... and holds the chunk directory before anyone writes into it
            with progress_bar(total=s.tokens, desc="synth-data", unit="tok", unit_scale=True,
                              enabled=progress and main) as bar:
                for name, target in targets.items():
                    sample_chunks(sampler, _encoded(name, chat, tokenizer, prompts, s.seed), name, target, chunks[name],
                                  max_new, tokenizer.eos_token_id, s.seed, tmp, rank, world, bar,
                                  fill_to=s.seq_len if s.fill_rows else None)
            first = prompt_calls + 1 if main else 1  # the samples' calls after their first (which compiles)
            stats = _all((sampler.seconds, sampler.generated, sampler.calls[first:]), world)  # every chunk is saved now
            if main:
                writer = _ShardWriter(tmp, s.seq_len, tokenizer.eos_token_id)
                by_source, samples = {}, 0
                for name, target in targets.items():
                    by_source[name], n = pack_chunks(tmp, name, target, writer)
                    samples += n
                writer.close()
                shutil.rmtree(tmp / CHUNKS)
                generated = sum(g for _, g, _ in stats)
                generation_seconds = max(t for t, _, _ in stats)  # the processes sample side by side
                rest = [c for _, _, calls in stats for c in calls]  # without the prompts and each first sample call
                steady_seconds = max(sum(t for t, _ in calls) for _, _, calls in stats)
                seconds = time.time() - started
                written = sum(by_source.values())
                used = replace(s, max_new_tokens=None if s.fill_rows else max_new, engine=sampler.engine,
                               cache=sampler.cache, batch_size=batch_size, dtype=str(torch_dtype).replace("torch.", ""),
                               decode_attention=decode if sampler.engine == "generate" else s.decode_attention)
                report = SynthReport(
                    model=info.name, source=info, settings=used, tokens=written, generated_tokens=generated,
                    samples=samples, rows=writer.total_rows, shards=writer.shards, prompt_count=len(prompts), chat=chat,
                    device=torch.cuda.get_device_name() if cuda else "cpu", seconds=round(seconds, 2),
                    generation_seconds=round(generation_seconds, 2),
                    generated_tokens_per_second=round(generated / max(generation_seconds, 1e-9), 1),
                    tokens_per_second=round(written / max(seconds, 1e-9), 1),
                    steady_generated_tokens_per_second=round(sum(n for _, n in rest) / steady_seconds, 1) if rest
                    and steady_seconds > 0 else None,
                    tokens_by_source=by_source, prompt_seconds=round(prompt_seconds, 2), example_prompts=prompts[:20],
                    world_size=world, attention=model.config._attn_implementation,
                    call_seconds=[round(t, 2) for t, _ in sampler.calls],
                    call_tokens=[n for _, n in sampler.calls], prompt_calls=prompt_calls,
                )
                report.write(tmp)
        _wait(world)  # the main process has renamed the directory into place
        return report if main else SynthReport.read(out)
    finally:
        sampler.close()
