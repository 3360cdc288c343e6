"""Training data for `mla-zoo finetune`: data specs, tokenisation and packing into fixed-length rows.

A data SPEC is one of:
* a local file: `.txt` / `.md` (one document per file), `.jsonl` (one document per line, field
  `text`, or `messages` rendered with the tokenizer's chat template), `.parquet` (column `text`);
* a directory (all such files under it, sorted) or a glob (`data/*.jsonl`, `corpus/**/*.txt`);
* a directory written by `mla-zoo synth-data` (its `shard-*.safetensors`, already tokenised);
* `hf:NAME[:CONFIG][:SPLIT]`: a Hugging Face `datasets` dataset, streamed (needs `datasets` and
  a network; split defaults to `train`), field `text` or `messages`;
* `teacher:MIX` (e.g. `teacher:chat=0.4+bos=0.2+text=0.4`, the recipes' mix): no corpus at all: `mla-zoo finetune`
  first samples as many tokens as the run needs from its teacher (`synth.synth_data`, MIX as its `mix`) into
  OUT/synth/, then reads that directory (`sample_teacher_parts`);
* several of these joined by commas (`teacher:chat=1,data/train.txt`): a mix with an equal share of
  rows from each (a part that runs short is repeated), e.g. the teacher's own samples to keep its
  general behaviour plus real text of a domain the user cares about.

Documents are tokenised without special tokens and concatenated with EOS after each one; the
stream is cut into rows of exactly `seq_len` tokens (the remainder is dropped). Only as many
rows as the run needs are made, so a large corpus is read only as far as required.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from mla_zoo.modeling.common import DataError, progress_bar, synth_shards
from mla_zoo.modeling.hub_client import hub_call

from .settings import MIX, SynthSettings
from .synth import SynthReport

TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
TEXT_BLOCK = 1 << 20  # read large text files in ~1 MB pieces (split at line ends)
TOKENIZE_BATCH = 256
TEACHER = "teacher:"


# ----------------------------------------------------------------------------------------------
# Specs -> sources
# ----------------------------------------------------------------------------------------------


def is_synth_dir(path: Path) -> bool:
    return path.is_dir() and ((path / SynthReport.FILE).is_file() or bool(synth_shards(path)))


def resolve_files(spec: str) -> list[Path]:
    """The local files a (non-hf:) spec names, sorted; raises DataError if there are none."""
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
    else:
        path = Path(spec)
        if path.is_dir():
            if is_synth_dir(path):
                files = synth_shards(path)
            else:
                files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"`data` {spec}: no such file or directory")
    if not files:
        raise DataError(f"`data` {spec} matches no files (readable: {', '.join(FILE_SUFFIXES)}, "
                        f"a synth-data directory, or hf:NAME[:CONFIG][:SPLIT])")
    unknown = [f for f in files if not f.name.endswith((*FILE_SUFFIXES, ".safetensors"))]
    if unknown:
        raise DataError(f"`data` {spec}: cannot read {unknown[0]} (readable: {', '.join(FILE_SUFFIXES)})")
    return files


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"`data` {spec}: expected hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def split_spec(spec: str) -> list[str]:
    return [part for part in spec.split(",") if part]


def teacher_mix(spec: str) -> str:
    """The MIX of a `teacher:MIX` part, checked."""
    import re

    mix = spec[len(TEACHER):]
    if not re.fullmatch(MIX, mix):
        raise DataError(f"`data` {spec}: expected teacher:SOURCE=SHARE[+SOURCE=SHARE], sources chat, bos and text "
                        "(e.g. teacher:chat=0.4+bos=0.2+text=0.4)")
    return mix


def sample_teacher_parts(spec: str, teacher: str, out: Path, rows: int | None, seq_len: int, seed: int = 0, *,
                         run: bool = True, progress: bool = True) -> str:
    """`spec` with each `teacher:MIX` part replaced by a synth-data directory under `out` that holds
    enough tokens for its share of `rows` rows (sampled now when `run`, kept from an earlier session
    of the same run when it matches). Under DDP only the main process runs it; the others get the
    same spec back with run=False once it is done."""
    from .synth import synth_data

    parts = split_spec(spec)
    if not any(p.startswith(TEACHER) for p in parts):
        return spec
    if rows is None:
        raise DataError(f"`data` {spec}: samples of the teacher need a run length: give `tokens` or `max_steps`")
    share = -(-rows // len(parts))
    resolved = []
    for i, part in enumerate(parts):
        if not part.startswith(TEACHER):
            resolved.append(part)
            continue
        target = out / f"part-{i}"
        settings = SynthSettings(tokens=(share + 1) * seq_len, mix=teacher_mix(part), seq_len=seq_len, seed=seed)
        if run and not _same_synth(target, settings):
            synth_data(teacher, target, settings, overwrite=True, progress=progress)
        resolved.append(str(target))
    return ",".join(resolved)


# resolved by the machine that samples (auto / None)
SAMPLED_ON = ("batch_size", "engine", "cache", "dtype", "decode_attention")


def _same_synth(path: Path, settings: SynthSettings) -> bool:
    """Whether `path` holds a finished synth-data run of these settings (all but how the machine ran them)."""
    if not (path / SynthReport.FILE).is_file():
        return False
    done = SynthReport.read(path).settings
    return all(getattr(done, f.name) == getattr(settings, f.name) for f in fields(SynthSettings)
               if f.name not in SAMPLED_ON)


@dataclass
class DataSource:
    """What a data spec resolves to, for run reports."""

    spec: str
    kind: str  # files | synth | hf | teacher | mix
    files: int | None = None  # files, synth: how many, and the first
    first: str | None = None
    name: str | None = None  # hf: the dataset; teacher: the mix
    config: str | None = None
    split: str | None = None
    parts: list[DataSource] = field(default_factory=list)  # mix


def describe(spec: str) -> DataSource:
    """What a spec resolves to; raises DataError when it names nothing readable."""
    if "," in spec:
        return DataSource(spec, "mix", parts=[describe(part) for part in split_spec(spec)])
    if spec.startswith("hf:"):
        name, config, split = parse_hf_spec(spec)
        return DataSource(spec, "hf", name=name, config=config, split=split)
    if spec.startswith(TEACHER):
        return DataSource(spec, "teacher", name=teacher_mix(spec))
    files = resolve_files(spec)
    kind = "synth" if files[0].suffix == ".safetensors" else "files"
    return DataSource(spec, kind, files=len(files), first=str(files[0]))


# ----------------------------------------------------------------------------------------------
# Sources -> documents (text pieces or token lists)
# ----------------------------------------------------------------------------------------------


def _render(record: dict, tokenizer, where: str) -> str:
    if "text" in record and isinstance(record["text"], str):
        return record["text"]
    if "messages" in record:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: 'messages' need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(list(record["messages"]), tokenize=False)
    raise DataError(f"{where}: a record needs a 'text' string or a 'messages' list")


def _text_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document): a text file in ~1 MB pieces cut at line ends."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        buf: list[str] = []
        size = 0
        for line in fh:
            buf.append(line)
            size += len(line)
            if size >= TEXT_BLOCK:
                yield "".join(buf), False
                buf, size = [], 0
        yield "".join(buf), True


def _jsonl_docs(path: Path, tokenizer) -> Iterator[tuple[str, bool]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e})") from e
            yield _render(record, tokenizer, f"{path}:{n}"), True


def _parquet_docs(path: Path) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading .parquet needs pyarrow: pip install pyarrow (or pip install 'mla-zoo[train]')") from e
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text, True


def _hf_docs(spec: str, tokenizer) -> Iterator[tuple[str, bool]]:
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"`data` {spec} needs the datasets package: pip install datasets "
                        "(or pip install 'mla-zoo[train]')") from e
    with hub_call(f"reading the dataset {spec}"):  # its streamed requests too: time limits, bounded attempts
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:
            raise DataError(f"`data` {spec}: cannot open the dataset ({type(e).__name__}: {e})") from e
        for n, record in enumerate(ds):
            yield _render(record, tokenizer, f"{spec} record {n}"), True


def _synth_tokens(files: list[Path]) -> Iterator[torch.Tensor]:
    """Token rows of synth-data shards, padding removed."""
    from safetensors.torch import load_file

    for f in files:
        shard = load_file(f)
        if "input_ids" not in shard:
            raise DataError(f"{f}: not a synth-data shard (no input_ids tensor)")
        ids, mask = shard["input_ids"], shard.get("attention_mask")
        for i in range(ids.shape[0]):
            yield ids[i] if mask is None else ids[i][mask[i].bool()]


def iter_token_pieces(spec: str, tokenizer) -> Iterator[list[int] | torch.Tensor]:
    """Token pieces of the data in order; EOS already follows each document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    if spec.startswith(TEACHER):
        raise DataError(f"`data` {spec}: the teacher's samples are made by `mla-zoo finetune` (sample_teacher_parts)")
    if spec.startswith("hf:"):
        sources = [_hf_docs(spec, tokenizer)]
    else:
        files = resolve_files(spec)
        if files[0].suffix == ".safetensors":
            yield from _synth_tokens(files)
            return
        sources = []
        for f in files:
            if f.name.endswith(TEXT_SUFFIXES):
                sources.append(_text_pieces(f))
            elif f.suffix == ".jsonl":
                sources.append(_jsonl_docs(f, tokenizer))
            else:
                sources.append(_parquet_docs(f))
    batch: list[tuple[str, bool]] = []

    def flush():
        ids = tokenizer([t for t, _ in batch], add_special_tokens=False)["input_ids"]
        for (_, end), piece in zip(batch, ids, strict=True):
            yield list(piece) + [eos] if end else list(piece)
        batch.clear()

    for source in sources:
        for item in source:
            batch.append(item)
            if len(batch) >= TOKENIZE_BATCH:
                yield from flush()
    if batch:
        yield from flush()


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def check_seq_len(seq_len: int, config, field: str = "seq_len") -> None:
    """A row length the model can take (`field` names the setting in the error)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(f"`{field}` {seq_len} is beyond the model's max_position_embeddings ({limit})")


def pack_rows(spec: str, tokenizer, seq_len: int, max_rows: int | None = None, progress: bool = True) -> torch.Tensor:
    """Tokenise and pack the data into [rows, seq_len] int32 (at most max_rows rows)."""
    if "," in spec:  # a mix: an equal share of rows from each part, short parts repeated
        parts = split_spec(spec)
        packed = [pack_rows(p, tokenizer, seq_len, -(-max_rows // len(parts)) if max_rows else None, progress)
                  for p in parts]
        share = max(len(r) for r in packed)
        return torch.cat([r.repeat((share + len(r) - 1) // len(r), 1)[:share] for r in packed])[:max_rows]
    rows: list[torch.Tensor] = []
    buf: list[torch.Tensor] = []
    held = 0
    bar = progress_bar(total=max_rows, desc="packing data", unit="row", enabled=progress, leave=False)
    try:
        for piece in iter_token_pieces(spec, tokenizer):
            t = piece if isinstance(piece, torch.Tensor) else torch.tensor(piece, dtype=torch.int32)
            buf.append(t.to(torch.int32))
            held += t.numel()
            if held >= seq_len:
                flat = torch.cat(buf)
                n = flat.numel() // seq_len
                if max_rows is not None:
                    n = min(n, max_rows - len(rows))
                rows.extend(flat[: n * seq_len].view(n, seq_len))
                bar.update(n)
                rest = flat[n * seq_len :]
                buf, held = [rest], rest.numel()
                if max_rows is not None and len(rows) >= max_rows:
                    break
    finally:
        bar.close()
    if not rows:
        raise DataError(f"`data` {spec} holds {held} tokens, fewer than one row of `seq_len` {seq_len}")
    return torch.stack(rows)


class PackedDataset(torch.utils.data.Dataset):
    """Rows of packed token ids; items are {"input_ids": LongTensor[seq_len]}."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i].long()}


def collate(items: list[dict]) -> dict:
    return {"input_ids": torch.stack([it["input_ids"] for it in items])}
