"""ONNX export of MLA checkpoints (fused MultiHeadLatentAttention op) and the kernel library."""
