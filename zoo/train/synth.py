"""`mla-zoo synth-data`: sample training data from the original model (data-free distillation).

An instruct model (its tokenizer has a chat template) answers a varied set of prompts built
combinatorially from topics x task templates plus factual questions; each sample is the prompt
and the answer in chat format, so the chat behaviour is what gets distilled. A base model
continues short text openings. Samples are concatenated (EOS after each) and packed into rows
of `seq_len` tokens, written as `shard-NNNNN.safetensors` (`input_ids` int32 [rows, seq_len],
`attention_mask` uint8: only the last row of the run may hold padding) plus `synth.json`.
`--data DIR` of `mla-zoo finetune` reads such a directory (`data.py`).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mla_zoo.modeling.common import SynthError, atomic_directory
from mla_zoo.modeling.schema import Report, Settings, setting
from mla_zoo.modeling.sources import SourceInfo
from tqdm.auto import tqdm

TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "volcanoes",
    "the human immune system", "climate change", "the Roman Empire", "quantum computing", "honeybees",
    "the printing press", "plate tectonics", "jazz music", "the water cycle", "vaccines",
    "the stock market", "ancient Egypt", "renewable energy", "the internet", "coral reefs",
    "chess", "the Moon landing", "sleep", "coffee", "electric cars", "the Industrial Revolution",
    "dinosaurs", "the solar system", "gardening", "friendship", "recycling", "the Olympic Games",
    "bread baking", "mountain climbing", "the history of mathematics", "rainforests", "robots",
    "public libraries", "the ocean tides", "learning a new language",
]
TASKS = [
    "Explain {topic} to a ten-year-old.",
    "Write a short story about {topic}.",
    "List five interesting facts about {topic}.",
    "How do I get started with learning about {topic}?",
    "What are the main pros and cons of {topic}?",
    "Write a short poem about {topic}.",
    "Summarize the history of {topic} in a few sentences.",
    "Give me three practical tips related to {topic}.",
    "Describe {topic} in simple terms.",
    "What are common misconceptions about {topic}?",
    "Write a dialogue between a teacher and a student about {topic}.",
    "Why does {topic} matter today?",
]
COUNTRIES = [
    "France", "Japan", "Brazil", "Kenya", "Canada", "Australia", "India", "Germany", "Mexico", "Egypt",
    "Italy", "Spain", "Norway", "Argentina", "China", "South Korea", "Peru", "Vietnam", "Morocco", "Greece",
    "Sweden", "Chile", "Turkey", "Thailand", "Nigeria", "Portugal", "Ireland", "New Zealand", "Poland", "Iceland",
]
FACT_TASKS = [
    "What is the capital of {country}?",
    "What languages are spoken in {country}?",
    "Describe the geography of {country}.",
    "What is {country} famous for?",
    "Suggest a one-week travel itinerary for {country}.",
]
OPENINGS = [
    "The", "In the beginning,", "Once upon a time,", "Scientists have discovered that", "The history of",
    "Here is a recipe for", "Chapter 1", "Dear friend,", "In this article, we", "It was a cold morning when",
    "The most important thing about", "Yesterday,", "According to recent research,", "Step 1:", "A long time ago",
]
SHARD_ROWS = 2048


def build_prompts(chat: bool, seed: int = 0) -> list[str]:
    """The prompt set, shuffled: 480 topic x task + 150 factual prompts (chat), or text openings."""
    if chat:
        prompts = [t.format(topic=x) for x, t in itertools.product(TOPICS, TASKS)]
        prompts += [t.format(country=c) for c, t in itertools.product(COUNTRIES, FACT_TASKS)]
    else:
        prompts = list(OPENINGS) + [f"{o} {x}" for o, x in itertools.product(("The", "The history of"), TOPICS)]
    random.Random(seed).shuffle(prompts)
    return prompts


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
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
class SynthSettings(Settings):
    """How distillation data is sampled from the original model (`mla-zoo synth-data`)."""

    tokens: int = setting(help="tokens to write (prompts + answers)", min=1)
    seq_len: int = setting(512, min=2, help="row length of the packed shards")
    batch_size: int = setting(64, min=1, help="prompts sampled at once")
    temperature: float = setting(1.0, gt=0, help="sampling temperature")
    max_new_tokens: int | None = setting(None, min=1, help="answer length cap (default: seq_len)")
    cache: str = setting("auto", choices=("auto", "static", "dynamic"),
                         help="generate()'s KV cache: static (fixed shapes, fast on CUDA), dynamic; auto = static on "
                              "CUDA")
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"),
                         help="sampling dtype (auto: bf16 on CUDA, fp32 on CPU)")
    seed: int = setting(0, min=0, help="random seed (prompt order and sampling)")


@dataclass
class SynthReport(Report):
    """synth.json: what was sampled, and how fast."""

    FILE = "synth.json"

    model: str
    source: SourceInfo
    settings: SynthSettings  # resolved: max_new_tokens, cache and dtype as used
    tokens: int
    generated_tokens: int
    samples: int
    rows: int
    shards: int
    prompt_count: int
    prompt_pad_len: int
    chat: bool
    device: str
    seconds: float
    generation_seconds: float
    generated_tokens_per_second: float
    tokens_per_second: float
    steady_generated_tokens_per_second: float | None  # without the first batch (a static cache compiles there)


def synth_data(source: str, out: str | Path, settings: SynthSettings, *, overwrite: bool = False,
               progress: bool = True) -> SynthReport:
    """Sample about `settings.tokens` tokens (prompts + answers) from SOURCE into shards under `out`
    (written atomically, with synth.json)."""
    from mla_zoo.modeling import sources

    s, out = settings, Path(out)
    if out.exists() and not overwrite:
        raise SynthError(f"{out} already exists; pass `overwrite` to replace it")
    cuda = torch.cuda.is_available()
    torch_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16}[s.dtype]
    model, tokenizer, info = sources.resolve(source, dtype=torch_dtype)
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device).eval()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and s.seq_len > max_pos:
        raise SynthError(f"`seq_len` {s.seq_len} is beyond the model's max_position_embeddings ({max_pos})")
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = build_prompts(chat, s.seed)
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
    else:
        texts = [(tokenizer.bos_token or "") + p for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt_len = max(len(e) for e in encoded)
    prompt_len = -(-prompt_len // 16) * 16  # one padded length for every batch: fixed shapes for a static cache
    used = SynthSettings(**{**vars(s), "max_new_tokens": s.max_new_tokens or s.seq_len,
                            "cache": "static" if s.cache == "static" or (s.cache == "auto" and cuda) else "dynamic",
                            "dtype": str(torch_dtype).replace("torch.", "")})
    with atomic_directory(out) as tmp:
        writer = _ShardWriter(tmp, s.seq_len, tokenizer.eos_token_id)
        counts = _sample(model, tokenizer, texts, prompt_len, used, writer, device, progress)
        writer.close()
        seconds = time.time() - counts["started"]
        report = SynthReport(
            model=info.name, source=info, settings=used, tokens=counts["written"],
            generated_tokens=counts["generated"], samples=counts["samples"], rows=writer.total_rows,
            shards=writer.shards, prompt_count=len(prompts), prompt_pad_len=prompt_len, chat=chat,
            device=torch.cuda.get_device_name() if cuda else "cpu", seconds=round(seconds, 2),
            generation_seconds=round(counts["gen_seconds"], 2),
            generated_tokens_per_second=round(counts["generated"] / max(counts["gen_seconds"], 1e-9), 1),
            tokens_per_second=round(counts["written"] / max(seconds, 1e-9), 1),
            steady_generated_tokens_per_second=counts["steady"],
        )
        report.write(tmp)
    return report


def _sample(model, tokenizer, texts: list[str], prompt_len: int, s: SynthSettings, writer: _ShardWriter,
            device: torch.device, progress: bool) -> dict:
    """Sample batches of prompts (cycling through them) until `s.tokens` tokens are written; the counts.
    `s.cache` may fall back from static to dynamic (said on stdout)."""
    eos_ids = _eos_ids(model, tokenizer)
    torch.manual_seed(s.seed)
    written = generated = samples = 0
    gen_seconds = 0.0
    batch_times: list[float] = []
    batch_counts: list[int] = []
    started = time.time()
    order = itertools.cycle(range(len(texts)))
    kwargs = dict(do_sample=True, temperature=s.temperature, top_k=0, top_p=1.0, max_new_tokens=s.max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids)
    with tqdm(total=s.tokens, desc="synth-data", unit="tok", unit_scale=True, disable=not progress) as bar:
        while written < s.tokens:
            idx = [next(order) for _ in range(s.batch_size)]
            batch = tokenizer([texts[i] for i in idx], add_special_tokens=False, padding="max_length",
                              max_length=prompt_len, return_tensors="pt").to(device)
            t0 = time.time()
            if s.cache == "static":
                try:
                    out_ids = model.generate(**batch, **kwargs, cache_implementation="static")
                except Exception as e:  # noqa: BLE001 - fall back once, say so
                    print(f"synth-data: static cache failed ({type(e).__name__}: {e}); using the dynamic cache")
                    s.cache = "dynamic"
                    out_ids = model.generate(**batch, **kwargs)
            else:
                out_ids = model.generate(**batch, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            gen_seconds += time.time() - t0
            batch_times.append(time.time() - t0)
            out_ids = out_ids.cpu()
            batch_generated = 0
            mask = batch["attention_mask"].cpu()
            for row in range(len(idx)):
                prompt = out_ids[row, :prompt_len][mask[row].bool()].tolist()
                answer = out_ids[row, prompt_len:].tolist()
                cut = next((k for k, t in enumerate(answer) if t in eos_ids), None)
                answer = answer if cut is None else answer[: cut + 1]
                generated += len(answer)
                batch_generated += len(answer)
                sample = prompt + answer
                if sample[-1] != tokenizer.eos_token_id:
                    sample.append(tokenizer.eos_token_id)
                writer.add(sample)
                written += len(sample)
                samples += 1
                bar.update(len(sample))
            batch_counts.append(batch_generated)
            bar.set_postfix(gen_tok_s=f"{generated / max(gen_seconds, 1e-9):.0f}")
    steady = round(sum(batch_counts[1:]) / sum(batch_times[1:]), 1) if len(batch_times) > 1 else None
    return {"written": written, "generated": generated, "samples": samples, "gen_seconds": gen_seconds,
            "started": started, "steady": steady}
