"""Run an exported MLA decoder in onnxruntime: sessions (with or without the kernel library), one
decode step with checked cache shapes, and a greedy / sampling generate loop; plus
`mla-zoo generate CKPT_OR_ONNX_DIR "prompt" --backend torch|onnx` (GenerateSettings, run_generate).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mla_zoo.modeling.common import MlaZooError
from mla_zoo.modeling.schema import Settings, setting

from .contract import DOMAIN, MODEL_FILE, past_name, require

NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class CacheShapeError(MlaZooError):
    """A past tensor does not have the shape the model expects."""


def model_uses_op(model_path: str | Path) -> bool:
    """Whether the graph has MultiHeadLatentAttention nodes (False for a --portable export)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(o.domain == DOMAIN for o in model.opset_import)


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def session_options(use_kernels: bool | None, model_path: str | Path, threads: int | None = None,
                    device: str = "cpu"):
    """SessionOptions with the kernel library registered when wanted and available.

    use_kernels: True = require the library, False = run the function body, None = use it if built,
    else fall back to the body with a warning that says how to build it. device "cuda" needs a library
    built with the CUDA kernels (`--cuda`): a CPU-only one would run the op on the CPU between CUDA
    nodes. Returns (options, used)."""
    import onnxruntime as ort

    from .kernels.build import BUILD_HINT, KernelLibraryNotBuilt, get_library_path

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if use_kernels is False or not model_uses_op(model_path):
        return so, False
    try:
        library = get_library_path(cuda=True if device == "cuda" else None)
    except KernelLibraryNotBuilt as e:
        if use_kernels:
            raise
        hint = "build it with `mla-zoo build-kernels --cuda`" if device == "cuda" else BUILD_HINT
        warnings.warn(
            f"{e.args[0].split(':')[0]}: running MultiHeadLatentAttention through its portable function body "
            f"(slower). To use the fused kernel, {hint}.", stacklevel=2)
        return so, False
    so.register_custom_ops_library(library)
    return so, True


def providers_by_op(session) -> dict[str, list[str]]:
    """op type -> the providers its nodes ran on, from the profiling output of a session made with
    `enable_profiling` (ends the profile): which nodes a CUDA session left on the CPU."""
    placed: dict[str, set[str]] = {}
    for e in json.loads(Path(session.end_profiling()).read_text()):
        args = e.get("args", {})
        if e.get("cat") == "Node" and "op_name" in args and "provider" in args:
            placed.setdefault(args["op_name"], set()).add(args["provider"])
    return {op: sorted(providers) for op, providers in sorted(placed.items())}


@dataclass
class CacheSpec:
    """The past tensors an exported decoder takes, read from its session's inputs. Each layer has its own
    latent width (per-layer `kv_lora_ranks`); the RoPE-key width n_kv*2R is one for all layers."""

    latent_dims: list[int]  # r_i of past_key_values.{i}.latent, per layer
    key_rope_dim: int  # n_kv * 2R
    dtype: type

    @classmethod
    def from_inputs(cls, inputs: dict) -> CacheSpec:
        """From {name: NodeArg} of the session's inputs (the past's last dims are static)."""
        layers = sum(1 for name in inputs if name.endswith(".latent"))
        latent = [inputs[past_name(i, "latent")] for i in range(layers)]
        return cls([int(v.shape[3]) for v in latent], int(inputs[past_name(0, "key_rope")].shape[3]),
                   NP_DTYPES[latent[0].type])

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    def widths(self) -> list[int]:
        """The last dim of every past tensor, in feed order [latent_0, key_rope_0, latent_1, ...]."""
        return [w for r in self.latent_dims for w in (r, self.key_rope_dim)]


class OnnxDecoder:
    """One onnxruntime session over an exported decoder-with-past (model.onnx in a directory)."""

    def __init__(self, path: str | Path, use_kernels: bool | None = None, threads: int | None = None,
                 device: str = "cpu"):
        require("onnxruntime")
        import onnxruntime as ort

        if device not in PROVIDERS:
            raise ValueError(f"device must be one of {', '.join(PROVIDERS)}, got {device!r}")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MlaZooError(f"device='cuda' needs onnxruntime-gpu: this onnxruntime ({ort.__version__}) has "
                              f"{', '.join(ort.get_available_providers())}")
        path = Path(path)
        self.model_path = path / MODEL_FILE if path.is_dir() else path
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path} does not exist: export the checkpoint with `mla-zoo export`")
        so, self.uses_kernels = session_options(use_kernels, self.model_path, threads, device)
        self.session = ort.InferenceSession(str(self.model_path), so, providers=PROVIDERS[device])
        self.device = device
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.cache = CacheSpec.from_inputs(inputs)
        self.shared_cache = "past_length" in inputs  # `export --shared-cache` (op version 2)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The first step's past: every tensor [batch, 1, 0, width], each layer at its own widths."""
        return [np.zeros((batch, 1, 0, width), self.cache.dtype) for width in self.cache.widths()]

    def check_past(self, past: list[np.ndarray], batch: int, past_len: int) -> None:
        c = self.cache
        if len(past) != 2 * c.num_layers:
            raise CacheShapeError(
                f"expected {2 * c.num_layers} past tensors (latent, key_rope per layer), got {len(past)}")
        for i, (t, width) in enumerate(zip(past, c.widths(), strict=True)):
            want = (batch, 1, past_len, width)
            if tuple(t.shape) != want or t.dtype != c.dtype:
                name = past_name(i // 2, "latent" if i % 2 == 0 else "key_rope")
                raise CacheShapeError(f"{name} has shape {tuple(t.shape)} ({t.dtype}), expected {want} "
                                      f"({np.dtype(c.dtype).name}): [batch, 1, past_len, width]")

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits [B, S, vocab] and the presents (the next step's past)."""
        if self.shared_cache:
            raise MlaZooError("this export shares past and present (`export --shared-cache`): use step_in_place "
                              "with cache_buffers, or generate()")
        batch, seq = input_ids.shape
        past_len = attention_mask.shape[1] - seq
        if attention_mask.shape[0] != batch or past_len < 0:
            raise CacheShapeError(f"attention_mask {attention_mask.shape} must be [batch, past_len + {seq}]")
        self.check_past(past, batch, past_len)
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        for i, t in enumerate(past):
            feed[past_name(i // 2, "latent" if i % 2 == 0 else "key_rope")] = t
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], outputs[1:]


    def cache_buffers(self, batch: int, capacity: int) -> list:
        """A shared-cache export's cache: zeroed OrtValues [batch, 1, capacity, width] on the session's device, in
        feed order; each is bound as its layer's past and present, so a step writes only its new rows."""
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1, capacity, w), self.cache.dtype), self.device, 0)
                for w in self.cache.widths()]

    def step_in_place(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                      past_length: int, buffers: list) -> np.ndarray:
        """One forward of a shared-cache export: rows [past_length, past_length + S) of `buffers` are written;
        attention_mask [B, capacity] (1 = token; columns from past_length + S on are not read). -> logits."""
        if not self.shared_cache:
            raise MlaZooError("this export has a growing cache: use step() (or export with --shared-cache)")
        batch, seq = input_ids.shape
        capacity = buffers[0].shape()[2]
        if attention_mask.shape != (batch, capacity) or past_length < 0 or past_length + seq > capacity:
            raise CacheShapeError(f"attention_mask {attention_mask.shape} must be [batch, {capacity}] and "
                                  f"past_length {past_length} + {seq} new tokens at most the buffers' {capacity} rows")
        binding = self.session.io_binding()
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64), "past_length": np.array([past_length], np.int64)}
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        for i, buffer in enumerate(buffers):
            kind = "latent" if i % 2 == 0 else "key_rope"
            binding.bind_ortvalue_input(past_name(i // 2, kind), buffer)
            binding.bind_ortvalue_output(f"present.{i // 2}.{kind}", buffer)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # the logits alone (copy_outputs_to_cpu would copy every buffer)


def position_ids_from_mask(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Positions of the last `seq` slots: count of real tokens before each (0 for left padding)."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.maximum(pos, 0)[:, -seq:]


def sample_next(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> np.ndarray:
    """Greedy when rng is None, else temperature / top-k / top-p sampling; logits [B, vocab] -> [B]."""
    if rng is None:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    if top_k:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p > top_p  # mass before a token already exceeds top_p
        keep = np.zeros_like(p, dtype=bool)
        np.put_along_axis(keep, order, ~drop, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def generate(decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_token_id: int | list[int] | None = None) -> np.ndarray:
    """Prefill + decode loop over the latent cache; returns the new tokens [B, <= max_new_tokens].
    Left padding: pass the attention_mask (0 = padding). Finished rows (eos) keep emitting eos."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch, seq = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    rng = np.random.default_rng(seed) if do_sample else None
    if decoder.shared_cache:  # one buffer per cache tensor, sized for the whole generation
        capacity = seq + max_new_tokens
        buffers = decoder.cache_buffers(batch, capacity)

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            full = np.zeros((batch, capacity), dtype=np.int64)  # [B, C]: the mask so far, then unused slots
            full[:, : mask.shape[1]] = mask
            return decoder.step_in_place(ids, full, position_ids_from_mask(mask, ids.shape[1]),
                                         mask.shape[1] - ids.shape[1], buffers)
    else:
        past = decoder.empty_past(batch)

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            nonlocal past
            logits, past = decoder.step(ids, mask, position_ids_from_mask(mask, ids.shape[1]), past)
            return logits

    ids, new = input_ids, []
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        logits = forward(ids, mask)
        token = sample_next(logits[:, -1], rng, temperature, top_k, top_p)
        if eos:
            token = np.where(done, next(iter(eos)), token)
            done |= np.isin(token, list(eos))
        new.append(token)
        if eos and done.all():
            break
        ids = token[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return np.stack(new, axis=1) if new else np.zeros((batch, 0), dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# mla-zoo generate
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerateSettings(Settings):
    model: str = setting(positional=True, path="dir",
                         help="an MLA checkpoint dir (torch) or an exported ONNX dir (onnx)")
    prompt: str = setting(positional=True, help="the prompt text")
    backend: str = setting("onnx", choices=("onnx", "torch"), help="onnx (onnxruntime) or torch")
    max_new_tokens: int = setting(32, min=1, help="tokens to generate")
    do_sample: bool = setting(False, help="sample instead of greedy decoding")
    temperature: float = setting(1.0, gt=0, help="sampling temperature")
    top_k: int = setting(0, min=0, help="keep the k most likely tokens (0 = all)")
    top_p: float = setting(1.0, gt=0, max=1, help="nucleus sampling mass")
    seed: int = setting(0, help="sampling seed")
    chat: bool = setting(False, help="wrap the prompt in the tokenizer's chat template")
    use_kernels: bool | None = setting(None, help="onnx: require (--use-kernels) or skip (--no-use-kernels) the "
                                                  "kernel library; default: use it if built")
    threads: int | None = setting(None, min=1, help="onnx: intra-op threads (default: all cores)")
    device: str = setting("cpu", choices=tuple(PROVIDERS), help="onnx: the execution provider (cuda: onnxruntime-gpu "
                                                               "and the library built with --cuda); torch: where "
                                                               "the model runs")


@dataclass
class GenerateReport:
    text: str
    new_tokens: int
    backend: str
    fused_kernel: bool
    seconds: float


def _encode(tokenizer, prompt: str, chat: bool) -> np.ndarray:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return np.asarray([ids], dtype=np.int64)


def run_generate(settings: GenerateSettings) -> GenerateReport:
    from transformers import AutoTokenizer

    if settings.backend not in ("onnx", "torch"):
        raise ValueError(f"backend must be 'onnx' or 'torch', got {settings.backend!r}")
    if not Path(settings.model).is_dir():
        raise MlaZooError(f"{settings.model} is not a directory: pass a checkpoint (--backend torch) or an "
                          "`mla-zoo export` directory (--backend onnx)")
    tokenizer = AutoTokenizer.from_pretrained(settings.model, trust_remote_code=True)
    ids = _encode(tokenizer, settings.prompt, settings.chat)
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    if settings.backend == "onnx":
        decoder = OnnxDecoder(settings.model, settings.use_kernels, settings.threads, settings.device)
        new = generate(decoder, ids, None, settings.max_new_tokens, settings.do_sample, settings.temperature,
                       settings.top_k, settings.top_p, settings.seed, eos)[0]
        fused = decoder.uses_kernels
    else:
        import torch
        from transformers import AutoModelForCausalLM

        if (Path(settings.model) / MODEL_FILE).exists():
            raise ValueError(f"{settings.model} is an ONNX export: use --backend onnx, or pass the checkpoint")
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise MlaZooError("--device cuda: this torch sees no CUDA device")
        model = AutoModelForCausalLM.from_pretrained(settings.model, trust_remote_code=True).eval().to(settings.device)
        torch.manual_seed(settings.seed)
        kwargs = dict(do_sample=settings.do_sample, max_new_tokens=settings.max_new_tokens, pad_token_id=eos)
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_k=settings.top_k or None, top_p=settings.top_p)
        with torch.no_grad():
            input_ids = torch.from_numpy(ids).to(settings.device)  # [1, S]
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new = out[0, ids.shape[1]:].cpu().numpy()
        fused = False
    seconds = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerateReport(text=text, new_tokens=len(new), backend=settings.backend, fused_kernel=fused,
                          seconds=seconds)
