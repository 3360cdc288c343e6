"""The remote code: the files copied VERBATIM into every checkpoint (see `REMOTE_CODE_FILES`).

They import only torch, transformers and each other, so a checkpoint loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` without mla-zoo installed.
"""

from pathlib import Path

REMOTE_CODE_DIR = Path(__file__).parent
REMOTE_CODE_FILES = ("configuration_llama_mla.py", "modeling_llama_mla.py", "mla_decode_triton.py")
