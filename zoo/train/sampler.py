"""The engines that sample the teacher for `mla-zoo synth-data` (`synth.py`): `generate()` in fixed, left-padded
batches (a static cache on CUDA, so transformers compiles the decode step), or transformers' continuous batching
(`generate_batch`), where a finished row leaves the batch at once and a waiting one takes its place. A `Sampler`
counts the seconds and tokens of every call it makes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Sampler:
    """Samples answers to token-id prompts with one engine; counts the time and tokens it generates."""

    model: object
    pad_id: int
    eos_ids: list[int]
    engine: str  # continuous | generate
    cache: str  # static | dynamic (generate only)
    temperature: float | None  # None: greedy
    cache_len: int | None = None  # static cache slots of every call (the prompts' calls and the samples' share one
    # compiled decode step: a new cache length recompiles, ~30 s on an H100); None: each call's own length
    decode_attention: str | None = None  # packed | flex: the attention generate() decodes with (`packed_gqa.py`,
    # `flex_decode.py`), switched on while the engine is generate (from the start, or once continuous batching
    # failed); None: the model's own
    seconds: float = 0.0
    generated: int = 0
    calls: list[tuple[float, int]] = field(default_factory=list)  # (seconds, tokens) per call
    kept: tuple | None = None  # (temperature, max_new_tokens) of the continuous-batching manager kept on the model
    static: tuple | None = None  # ((rows, slots), StaticCache): reset and reused by the next call of that shape
    log_every: float | None = None  # seconds between progress lines to a log (stderr no terminal: no bar there)
    said: float = field(default_factory=time.time)  # when the last one went out (`sample_chunks`)

    def __post_init__(self):
        if self.engine == "generate":
            self._use_decode_attention()

    def _use_decode_attention(self) -> None:
        """The model decodes generate()'s fixed batches with `decode_attention` (continuous batching has its own)."""
        from .flex_decode import use_flex_decode
        from .packed_gqa import use_packed_gqa

        if self.decode_attention is not None:
            {"flex": use_flex_decode, "packed": use_packed_gqa}[self.decode_attention](self.model)

    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Each prompt's answer, cut after its first EOS."""
        return self._timed(lambda: [self._cut(a) for a in self._answers(prompts, max_new_tokens)])

    def fill(self, prompts: list[list[int]], length: int) -> list[list[int]]:
        """Each prompt's continuation, on past any EOS, to `length` tokens with the prompt (a prompt shorter than
        the batch's padded width gets the same number of new tokens as the longest): fixed batches of
        `generate()`, in which no row ends early and the static cache has one length."""
        return self._timed(lambda: self._generate(prompts, length, fill=True))

    def _answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        if self.engine == "continuous":
            try:
                return self._continuous(prompts, max_new_tokens)
            except Exception as e:  # noqa: BLE001 - fall back once, say so
                print(f"synth-data: continuous batching failed ({type(e).__name__}: {e}); using generate()")
                self.close()
                self.engine = "generate"
                self._use_decode_attention()
        return self._generate(prompts, max_new_tokens)

    def _timed(self, sample) -> list[list[int]]:
        """`sample()`'s answers, its time and tokens counted."""
        t0 = time.time()
        answers = sample()
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
        tokens = sum(len(a) for a in answers)
        self.seconds += seconds
        self.generated += tokens
        self.calls.append((seconds, tokens))
        return answers

    def _cut(self, answer: list[int]) -> list[int]:
        cut = next((k for k, t in enumerate(answer) if t in self.eos_ids), None)
        return answer if cut is None else answer[: cut + 1]

    def _kwargs(self) -> dict:
        if self.temperature is None:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, fill: bool = False) -> list[list[int]]:
        """Left-padded fixed batches; `fill`: `max_new_tokens` is the whole row (prompt width + answer), and no EOS
        stops a row (eos_token_id None)."""
        width = -(-max(len(p) for p in prompts) // 16) * 16  # few distinct shapes for a static cache
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        if fill:
            max_new_tokens = max(1, max_new_tokens - width)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=None if fill else self.eos_ids, **self._kwargs())
        if self.cache == "static":
            try:
                from transformers.generation.utils import ALL_CACHE_NAMES

                cache = self._static_cache(len(prompts), max(self.cache_len or 0, width + max_new_tokens))
                name = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"  # renamed in transformers 5.2x
                out = self.model.generate(input_ids=ids, attention_mask=mask, **{name: cache}, **kwargs)
            except Exception as e:  # noqa: BLE001 - fall back once, say so
                print(f"synth-data: static cache failed ({type(e).__name__}: {e}); using the dynamic cache")
                self.cache = "dynamic"
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return [row.tolist() for row in out[:, width:].cpu()]

    @torch.no_grad()
    def _continuous(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids, **self._kwargs())
        cb = None
        if self.model.device.type != "cuda":  # size the paged cache for the requests (not by free memory)
            page = 16
            longest = max(len(p) for p in prompts) + max_new_tokens
            known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
            size = "page_size" if "page_size" in known else "block_size"  # the name before 5.2x
            cb = ContinuousBatchingConfig(**{size: page}, num_blocks=len(prompts) * -(-longest // page) + 1,
                                          max_batch_tokens=max(256, longest))
        # One manager for every call of the same sampling (its paged cache, its CUDA graphs warmed up once),
        # kept on the model between calls: a new one per call costs the allocation and the warm-up each time.
        key = (self.temperature, max_new_tokens)
        if self.kept not in (None, key):  # the kept manager samples another way (the prompt writer's temperature)
            self.close()
        with _quiet("transformers.generation.continuous_batching.continuous_api"):  # "the manager will be kept"
            results = self.model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb,
                                                max_new_tokens=max_new_tokens, progress_bar=False,
                                                warmup=self.model.device.type == "cuda", persistent_manager=True)
        self.kept = key
        outputs = list(results.values())
        failed = [o for o in outputs if o.error is not None]
        if len(outputs) != len(prompts) or failed:
            raise RuntimeError(f"{len(outputs)} of {len(prompts)} requests came back"
                               + (f", {len(failed)} failed: {failed[0].error}" if failed else ""))
        return [list(o.generated_tokens) for o in outputs]

    def _static_cache(self, rows: int, slots: int):
        """The static cache of the last call, emptied, where this call has its shape (as generate()'s own
        `cache_implementation="static"` reuses its cache): the same tensors for the compiled step; else a new one."""
        from transformers import StaticCache

        if self.static is not None and self.static[0] == (rows, slots):
            self.static[1].reset()
        else:
            self.static = None  # the old one's memory first
            self.static = ((rows, slots), StaticCache(config=self.model.config, max_cache_len=slots))
        return self.static[1]

    def close(self) -> None:
        """Frees the continuous-batching manager kept on the model (its paged cache) and the kept static cache."""
        if self.kept is not None:
            self.model.destroy_cached_continuous_batching_manager()
            self.kept = None
        self.static = None

    @property
    def rate(self) -> float:
        """Generated tokens/s so far."""
        return self.generated / max(self.seconds, 1e-9)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Holds back a library logger's warnings (not its errors) for the duration."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def has_continuous_batching(model) -> bool:
    return hasattr(model, "generate_batch")
