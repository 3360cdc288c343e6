"""`mla-zoo export CKPT -o DIR`: an MLA checkpoint -> one ONNX decoder-with-past graph.

Flow: load the checkpoint -> DecoderWithPast (export/wrapper.py) -> `torch.onnx.export(dynamo=True)`
with a custom translation that writes each attention block as ONE `mla_zoo.MultiHeadLatentAttention`
node -> rename inputs/outputs as optimum-onnx does -> attach the op's portable function body (the
exporter would inline it, so it goes in afterwards), or inline it with `portable` -> save the model,
the tokenizer and genai_config.json into DIR (atomically: a failed export leaves no half DIR).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from mla_zoo.modeling.common import MlaZooError, atomic_directory, check_output_dir, progress_bar
from mla_zoo.modeling.schema import Settings, setting

from .contract import DATA_FILE, IR_VERSION, MODEL_FILE, input_names, output_names, past_name, require

DTYPES = {"fp32": "float32", "fp16": "float16"}
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf caps a file at 2 GiB)


class ExportError(MlaZooError):
    """Bad export input (unsupported dtype, existing output, ...)."""


@dataclass
class ExportSettings(Settings):
    checkpoint: str = setting(positional=True, recipe=False,
                              help="a converted MLA checkpoint directory (config.json with llama_mla)")
    output_dir: str = setting(aliases=["-o"], recipe=False,
                              help="where the ONNX model, tokenizer and genai_config.json go")
    portable: bool = setting(False, help="inline the op's standard-ONNX body (runs anywhere; no custom node, "
                                         "no fused kernel)")
    dtype: str = setting("fp32", choices=tuple(DTYPES), help="fp32 (CPU) or fp16 (GPU); weights and cache "
                                                             "(no bf16: onnxruntime's CPU provider has no bf16 MatMul)")
    fp32_residual: bool = setting(True, help="fp16 exports: the residual stream between the blocks stays fp32 "
                                             "(each block reads it cast to fp16 after its norm; weights, cache "
                                             "and logits stay fp16): SmolLM2's fp16 logits error on the CUDA "
                                             "provider 8.2e-3..1.2e-2 -> 4.7e-3 (bench/RESULTS.md). "
                                             "--no-fp32-residual: an all-fp16 graph. An fp32 export's residual "
                                             "is fp32 either way")
    shared_cache: bool = setting(False, help="op version 2: each past tensor is a buffer of a capacity the runner "
                                             "picks, shared with its present (bind both to one OrtValue: only the "
                                             "new rows are written), plus an input past_length (export/op_spec.md); "
                                             "not yet capturable in a CUDA graph")
    overwrite: bool = setting(False, recipe=False, help="replace an existing output_dir")


@dataclass
class ExportReport:
    output_dir: str
    model_path: str
    dtype: str
    portable: bool
    num_layers: int
    mla_nodes: int  # MultiHeadLatentAttention nodes in the main graph (0 when portable)
    latent_dims: list[int]  # r per layer: kv_lora_ranks (rank allocation), or kv_lora_rank in every layer
    key_rope_dim: int  # n_kv * 2R, the same in every layer
    cache_bytes_per_token: int  # all layers, in dtype
    external_data: bool
    seconds: float
    fp32_residual: bool = True  # the residual stream between the blocks is fp32 (always so in an fp32 export)
    shared_cache: bool = False  # op version 2: past and present share one buffer (input past_length)

    def to_dict(self) -> dict:
        return asdict(self)


def check_settings(settings: ExportSettings) -> None:  # (`dtype`: ExportSettings checks its choices)
    ckpt = Path(settings.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise ExportError(f"{ckpt} has no config.json: not a checkpoint directory")
    from .wrapper import check_mla_config

    class _Config:  # read the fields the check needs without loading remote code
        def __init__(self, d):
            self.__dict__.update(d)

    check_mla_config(_Config(json.loads((ckpt / "config.json").read_text())))
    check_output_dir(settings.output_dir, marker="genai_config.json", overwrite=settings.overwrite,
                     inputs={"checkpoint": ckpt}, field="output_dir")  # the output rule of every command


def load_checkpoint(path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=getattr(torch, DTYPES[dtype]))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# torch -> ONNX IR
# ----------------------------------------------------------------------------------------------


def export_ir(model, fp32_residual: bool = True, shared_cache: bool = False):
    """The decoder-with-past as an onnx_ir.Model with one MultiHeadLatentAttention node per layer
    (the node's function body is NOT attached yet: see attach_body). `fp32_residual`: the residual stream
    between the blocks in fp32 (a no-op for an fp32 model). `shared_cache`: op version 2 (past buffers of a
    capacity picked at run time, shared with the presents; an input past_length)."""
    import torch

    from . import op
    from .wrapper import DecoderWithPast

    wrapper = DecoderWithPast(model, residual_dtype=torch.float32 if fp32_residual else None).eval()
    n = len(wrapper.attns)
    batch, seq, past = 2, 3, 4  # >= 2 each: sizes 0 and 1 get specialised by torch.export
    rows = past + seq + 2 if shared_cache else past  # version 2: a buffer with spare rows
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, rows if shared_cache else past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq)[None].expand(batch, -1).contiguous()
    past_tensors = wrapper.empty_past(batch, rows)
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
    total = p if shared_cache else torch.export.Dim("total")  # v1: past + sequence; the op checks it at run time
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: total},
        "position_ids": {0: b, 1: s},
        "past": [{0: b, 2: p} for _ in range(2 * n)],
    }
    args = (ids, mask, pos, past_tensors)
    if shared_cache:
        args += (torch.tensor([past]),)
        dynamic_shapes["past_length"] = None
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=op.ONNX_OPSET,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={torch.ops.mla_zoo.multi_head_latent_attention.default: op.translate},
            optimize=True, verbose=False, report=False,
        )
    registration.setLevel(level)
    ir_model = program.model
    graph = ir_model.graph
    for value, name in zip(graph.inputs, input_names(n) + (["past_length"] if shared_cache else []), strict=True):
        value.name = name
    for value, name in zip(graph.outputs, output_names(n), strict=True):
        value.name = name
    _name_dims(graph, shared_cache)
    if shared_cache:  # version 2's nodes pick their own function body (IR 10 overload)
        for node in graph:
            if node.domain == op.DOMAIN and node.op_type == op.OP_NAME:
                node.overload = op.SHARED_CACHE_OVERLOAD
    ir_model.producer_name = "mla-zoo"
    return ir_model


def _name_dims(graph, shared_cache: bool = False) -> None:
    """Symbolic dim names users expect (batch_size, sequence_length, past/total_sequence_length; a shared
    cache's buffers and mask: cache_capacity)."""
    import onnx_ir as ir

    def rename(value, dims: dict[int, str]):
        if value.shape is None:
            return
        shape = list(value.shape)
        for axis, name in dims.items():
            if not isinstance(shape[axis], int):
                shape[axis] = ir.SymbolicDim(name)
        value.shape = ir.Shape(shape)

    for v in graph.inputs:
        if v.name in ("input_ids", "position_ids"):
            rename(v, {0: "batch_size", 1: "sequence_length"})
        elif v.name == "attention_mask":
            rename(v, {0: "batch_size", 1: "cache_capacity" if shared_cache else "total_sequence_length"})
        elif v.name != "past_length":
            rename(v, {0: "batch_size", 2: "cache_capacity" if shared_cache else "past_sequence_length"})
    for v in graph.outputs:
        if v.name == "logits":
            rename(v, {0: "batch_size", 1: "sequence_length"})
        else:
            rename(v, {0: "batch_size", 2: "cache_capacity" if shared_cache else "total_sequence_length"})


def cache_widths(ir_model, num_layers: int) -> tuple[list[int], int]:
    """(latent width per layer, RoPE-key width) as the graph's past inputs declare them (static dims)."""
    inputs = {v.name: v for v in ir_model.graph.inputs}
    latent_dims = [int(inputs[past_name(i, "latent")].shape[3]) for i in range(num_layers)]
    return latent_dims, int(inputs[past_name(0, "key_rope")].shape[3])


def count_mla_nodes(ir_model) -> int:
    from . import op

    return sum(1 for node in ir_model.graph if node.domain == op.DOMAIN and node.op_type == op.OP_NAME)


def attach_body(ir_model, shared_cache: bool = False) -> None:
    """Adds the op's function body (and helpers) as model-local functions + the domain's opset import."""
    import onnx_ir as ir

    from . import op

    for proto in op.function_protos():
        fn = ir.serde.deserialize_function(proto)
        ir_model.functions[fn.identifier()] = fn
    ir_model.opset_imports[op.DOMAIN] = op.SHARED_CACHE_VERSION if shared_cache else op.OP_VERSION


def inline_body(ir_model) -> None:
    """Replaces every MultiHeadLatentAttention node by its body (standard ops only)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import InlinePass, RemoveUnusedOpsetsPass

    from . import op

    attach_body(ir_model)
    InlinePass()(ir_model)
    ir_model.functions.clear()
    RemoveUnusedOpsetsPass()(ir_model)
    ir_model.opset_imports.pop(op.DOMAIN, None)
    assert not any(node.domain == op.DOMAIN for node in ir.traversal.RecursiveGraphIterator(ir_model.graph))


def initializer_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_model(ir_model, directory: Path) -> bool:
    """Writes model.onnx (+ model.onnx.data when large); returns whether external data was used."""
    import onnx_ir as ir

    external = initializer_bytes(ir_model) > EXTERNAL_DATA_BYTES
    ir_model.ir_version = IR_VERSION
    ir.save(ir_model, directory / MODEL_FILE, external_data=DATA_FILE if external else None)
    return external


# ----------------------------------------------------------------------------------------------
# Side files: tokenizer, genai_config.json
# ----------------------------------------------------------------------------------------------


def genai_head_size(latent_dims: list[int]) -> int | None:
    """genai_config's head_size: the latent width when every layer has the same, else None (genai has one
    head_size for all layers; per-layer kv_lora_ranks have none to write)."""
    return latent_dims[0] if len(set(latent_dims)) == 1 else None


def genai_config(config, head_size: int | None, library: str | None, context_length: int | None = None,
                 shared_cache: bool = False) -> dict:
    """onnxruntime-genai's config for this model. genai loads it and our library, but cannot run the
    cache layout: it allocates past key and value with ONE head_size (export/README.md). head_size is
    the latent width (the RoPE-key cache is narrower); None (per-layer widths) leaves it out.
    shared_cache (op version 2): past and present are one buffer of the context's capacity
    (`past_present_share_buffer`), and the graph takes the filled length as `past_length`."""
    eos = config.eos_token_id
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE,
        "hidden_size": config.hidden_size,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.latent",
            "past_value_names": "past_key_values.%d.key_rope",
            **({"past_sequence_length": "past_length"} if shared_cache else {}),
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.latent",
            "present_value_names": "present.%d.key_rope",
        },
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": 1,
    }
    if head_size is not None:
        decoder["head_size"] = head_size
    if library:
        decoder["session_options"]["custom_ops_library"] = library
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context_length or config.max_position_embeddings,
            "decoder": decoder,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else (
                eos[0] if isinstance(eos, list) else eos),
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "do_sample": False, "early_stopping": True, "max_length": context_length or config.max_position_embeddings,
            "min_length": 0, "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": shared_cache,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def copy_tokenizer(checkpoint: Path, directory: Path) -> list[str]:
    """Copies the checkpoint's tokenizer files (and generation_config.json) as they are."""
    copied = []
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, directory / name)
            copied.append(name)
    if not any(name.startswith("tokenizer") for name in copied):
        warnings.warn(f"{checkpoint} has no tokenizer files: the export has none either", stacklevel=2)
    return copied


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def copy_library(directory: Path) -> str | None:
    """Copies the kernel library into the export (genai loads one only from there); returns its name.

    The export travels to other machines, so the most portable build there is goes in: portable, then
    avx2, and a native build (this CPU's instruction set) only with a warning."""
    from .kernels.build import ISAS, LIBRARY_NAME, library_dir

    for isa in reversed(ISAS):  # portable, avx2, native
        for variant in ("cuda", "cpu"):
            lib = library_dir(isa, variant) / LIBRARY_NAME
            if lib.is_file():
                if isa == "native":
                    warnings.warn("the export ships a kernel library built for this CPU (-march=native); run "
                                  "`mla-zoo build-kernels --isa portable` first for one that runs anywhere",
                                  stacklevel=3)
                shutil.copyfile(lib, directory / LIBRARY_NAME)
                return LIBRARY_NAME
    warnings.warn("the kernel library is not built: genai_config.json names none", stacklevel=3)
    return None


def export_model(model, directory: str | Path, dtype: str = "fp32", portable: bool = False,
                 checkpoint: str | Path | None = None, fp32_residual: bool = True,
                 shared_cache: bool = False) -> ExportReport:
    """Exports an in-memory MLA model into `directory` (created; must be empty or absent)."""
    import onnx
    import torch

    start = time.perf_counter()
    directory = Path(directory)
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)} "
                          "(onnxruntime's CPU provider has no bfloat16 MatMul)")
    param_dtype = next(model.parameters()).dtype
    if param_dtype != getattr(torch, DTYPES[dtype]):
        raise ExportError(f"the model is {param_dtype}, but dtype={dtype!r}: cast it first (model.to(...))")
    bar = progress_bar(total=3, desc="export", unit="stage")
    bar.set_postfix_str("torch.onnx.export")
    ir_model = export_ir(model, fp32_residual, shared_cache)
    bar.update()
    n_layers = model.config.num_hidden_layers
    mla_nodes = count_mla_nodes(ir_model)
    if mla_nodes != n_layers:
        raise RuntimeError(f"expected one MultiHeadLatentAttention node per layer ({n_layers}), found {mla_nodes}")
    latent_dims, key_rope_dim = cache_widths(ir_model, n_layers)
    bar.set_postfix_str("inline body" if portable else "attach body")
    if portable:
        inline_body(ir_model)
        mla_nodes = 0
    else:
        attach_body(ir_model, shared_cache)
    bar.update()
    bar.set_postfix_str("save + check")

    try:
        with atomic_directory(directory) as staging:
            external = save_model(ir_model, staging)
            onnx.checker.check_model(str(staging / MODEL_FILE), full_check=False)
            library = None
            if not portable:  # genai loads a custom-op library only from inside the model directory
                library = copy_library(staging)
            cfg = genai_config(model.config, genai_head_size(latent_dims), library, shared_cache=shared_cache)
            (staging / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            if checkpoint is not None:
                copy_tokenizer(Path(checkpoint), staging)
    finally:
        bar.update()
        bar.close()
    itemsize = 4 if dtype == "fp32" else 2
    return ExportReport(
        output_dir=str(directory), model_path=str(directory / MODEL_FILE), dtype=dtype, portable=portable,
        num_layers=n_layers, mla_nodes=mla_nodes, latent_dims=latent_dims, key_rope_dim=key_rope_dim,
        cache_bytes_per_token=(sum(latent_dims) + n_layers * key_rope_dim) * itemsize, external_data=external,
        seconds=time.perf_counter() - start, fp32_residual=fp32_residual or dtype == "fp32", shared_cache=shared_cache,
    )


def run_export(settings: ExportSettings) -> ExportReport:
    """`mla-zoo export`: checks the input first (fast, clear errors), then loads and exports."""
    require("onnx", "onnxscript", "onnx_ir")
    check_settings(settings)
    model = load_checkpoint(settings.checkpoint, settings.dtype)
    return export_model(model, settings.output_dir, settings.dtype, settings.portable, settings.checkpoint,
                        settings.fp32_residual, settings.shared_cache)
