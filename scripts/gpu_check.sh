#!/usr/bin/env bash
# The GPU checks of the README ("GPUs"), in one script: the benchmark, then three short training runs of vit_b
# (random weights saved in the official checkpoint format, 16 generated boards) under bf16 autocast, each
# evaluated on the GPU with its report: experiment=pcb (whole model, zoom crops), finetune=lora, and the
# default decoder-only run with the embedding cache. A few minutes on one H200.
#
#   bash scripts/gpu_check.sh                       # writes outputs/gpu_check/<time>/
#   MODEL=sam_tiny DEVICE=cpu bash scripts/gpu_check.sh   # the same commands on a CPU (to try the script)
#
# Prints one line per check (exit status, precision, box mIoU zero-shot -> fine-tuned); exits 1 if any failed.
set -u
MODEL=${MODEL:-vit_b}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
OUT=${OUT:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
if [ -e "$OUT" ]; then echo "gpu_check: $OUT exists; refusing to write into it" >&2; exit 2; fi
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then TRAINER=gpu; BENCH="--images 16 --bf16"; else TRAINER=cpu; BENCH="--images 2 --prompts 4 --quick"; fi
CKPT=""
if [ "$MODEL" != sam_tiny ]; then
  CKPT="model.checkpoint=$OUT/${MODEL}_random.pth"
  $PY - "$MODEL" "$OUT/${MODEL}_random.pth" <<'PY' || exit 1
import sys, torch
from segment_anything import sam_model_registry
torch.manual_seed(0)
torch.save(sam_model_registry[sys.argv[1]]().state_dict(), sys.argv[2])  # the official format: a plain state dict
PY
fi
fail=0
$PY scripts/benchmark.py --model "$MODEL" --device "$DEVICE" $BENCH > "$OUT/benchmark.jsonl" 2> "$OUT/benchmark.log"
rc=$?; [ $rc -eq 0 ] || fail=1
echo "benchmark rc=$rc $(tail -n 1 "$OUT/benchmark.jsonl")"
COMMON="trainer=$TRAINER logger=csv model=$MODEL $CKPT data.generator_params.n_train=16 data.generator_params.n_val=4
  data.generator_params.n_test=4 data.root=$OUT/pcb_synth cache.dir=$OUT/embedding_cache eval.overlays=1"
run() {
  name=$1; shift
  $PY train.py $COMMON "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || fail=1
  precision=$(grep -o -m1 -E "Using (bfloat16|16bit) [A-Za-z ]*\(AMP\)" "$OUT/$name.log" || echo "32-bit")
  miou=$($PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['zero_shot']['box']['miou'],3), '->', round(r['finetuned']['box']['miou'],3))" "$OUT/$name/report.json" 2>/dev/null)
  echo "$name rc=$rc precision: $precision, box mIoU ${miou:-(no report)}"
}
run full experiment=pcb trainer.max_epochs=1
run lora experiment=pcb finetune=lora trainer.max_epochs=1
run cached trainer.max_epochs=2
echo "logs and reports in $OUT"
exit $fail
