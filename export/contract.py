"""Names and versions every part of the export agrees on (import-light: no torch, no onnx), so that
running an exported model with onnxruntime needs neither torch nor the exporter."""

DOMAIN = "mla_zoo"
OP_NAME = "MultiHeadLatentAttention"
OP_VERSION = 1  # bump with any change of the contract in op_spec.md (and kOpVersion in the kernel)
SHARED_CACHE_VERSION = 2  # the domain version of an `export --shared-cache` graph (op_spec.md "Version 2")
ONNX_OPSET = 18  # the torch exporter's native opset (TORCHLIB_OPSET): no version conversion
IR_VERSION = 10  # written explicitly: onnx 1.23 defaults to IR 14, which onnxruntime 1.31 refuses (max 13)
OP_INPUTS = (
    "query", "latent", "key_rope", "past_latent", "past_key_rope", "attention_mask", "cos", "sin", "w_uk", "w_uv",
)
OP_OUTPUTS = ("output", "present_latent", "present_key_rope")

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def past_name(layer: int, kind: str) -> str:
    """kind: "latent" ([B, 1, P, kv_lora_rank]) or "key_rope" ([B, 1, P, n_kv*2R])."""
    return f"past_key_values.{layer}.{kind}"


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [past_name(i, "latent"), past_name(i, "key_rope")]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.latent", f"present.{i}.key_rope"]
    return names


def require(*modules: str) -> None:
    """Fails with a clear error, not a traceback, when the `onnx` extra is not installed."""
    import importlib.util

    from mla_zoo.modeling.common import MlaZooError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MlaZooError(f"this needs {', '.join(missing)}, which are not installed: pip install 'mla-zoo[onnx]'")
