#!/usr/bin/env bash
# Tiny end-to-end LongPO run on CPU (the README's main job):
#   sample data -> indexed dataset -> tiny base model (HF) -> Megatron checkpoint
#   -> reference cache on the SHORT contexts -> LongPO training (2 processes, TP=2) -> evaluation -> HF export.
# Steps whose output exists are skipped, so re-running resumes; extra args go to the trainer,
# e.g. `bash examples/quickstart.sh --parallel.tensor_model_parallel_size=1 --parallel.context_parallel_size=2`.
# Training runs under `python -m megatron_longpo.launch` (torchrun options): Ctrl-C saves at the next
# step and exits 0 (twice: stop now), and re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
OUT=runs/quickstart
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() { echo; echo "==> $*"; "$@"; }

[ -f $OUT/data/train.json ] || run $PY tools/preprocess_data.py --input examples/data/sample_longpo.jsonl \
  --tokenizer examples/data/tokenizer.model --output-prefix $OUT/data/train --max-seq-length 2048 --no-progress
[ -f $OUT/hf_base/config.json ] || run $PY examples/make_tiny_base_model.py --out $OUT/hf_base
[ -f $OUT/base/latest_checkpointed_iteration.txt ] || run $PY tools/convert_hf_to_megatron.py \
  --hf-dir $OUT/hf_base --out $OUT/base --dtype fp32 --verify
[ -f $OUT/ref_cache/meta.json ] || run $PY -m torch.distributed.run --nproc-per-node $NPROC \
  tools/precompute_reference.py --load $OUT/base --data $OUT/data/train --output $OUT/ref_cache --mode longpo
run $PY -m megatron_longpo.launch --nproc-per-node $NPROC pretrain_longpo.py --config examples/configs/tiny_cpu.yaml "$@"
# Long-context evaluation of the base and the trained policy (docs/evaluation.md); the PNG needs matplotlib.
PLOT=(); $PY -c "import matplotlib" 2>/dev/null && PLOT=(--plot $OUT/eval.png)
run $PY -m torch.distributed.run --nproc-per-node $NPROC tools/evaluate.py --load $OUT/base $OUT/ckpt --labels base,longpo \
  --tasks niah_single,variable_tracking,kv_retrieval --lengths 512,2k --samples 4 --output $OUT/eval.json "${PLOT[@]}" --no-progress
rm -rf $OUT/hf_final
run $PY tools/convert_megatron_to_hf.py --megatron-dir $OUT/ckpt --out $OUT/hf_final
echo; echo "[quickstart] trained checkpoint: $OUT/ckpt ; HF export: $OUT/hf_final"
