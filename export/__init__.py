"""ONNX export of MLA checkpoints (fused MultiHeadLatentAttention op) and the kernel library."""

from .exporter import ExportReport, ExportSettings, run_export

__all__ = ["ExportReport", "ExportSettings", "get_library_path", "run_export"]


def get_library_path() -> str:
    """Path of the onnxruntime kernel library for `SessionOptions.register_custom_ops_library`
    (built by `mla-zoo build-kernels`; raises FileNotFoundError with that hint when missing)."""
    from .kernels.build import get_library_path as _get

    return _get()
