#!/usr/bin/env bash
# The GPU check: the one prepared script that makes the GPU numbers of docs/performance.md, on one H100/H200,
# in under 8 minutes, from a bare machine that has a CUDA build of torch and reaches no package registry.
#
#   bash scripts/gpu_wheels.sh                                   # before, where PyPI is reachable
#   bash scripts/gpu_check.sh [--dry-run | --rehearse] [--out DIR] [--wheels DIR]
#
# Steps: (1) the device and torch; (2) install what is missing from the carried wheels (no index, into a
# private folder on PYTHONPATH); (3) the GPU tier, pytest -m gpu; (4) StableLM-3B as published (seq 4096,
# micro-batch 4, full recompute, bf16) through --path engine, the train.py step; (5) the same shape through
# --path model --compare hf, both eager; (6) while the time budget lasts: engine without recompute at
# micro-batch 1, with selective recompute, an MoE of that width with grouped and with sequential experts, compiled; (7) one table: tokens/s, MFU, HFU, peak memory, ratio.
# Every result is also kept as JSON in the output folder (default /tmp/gpu_check, or GPU_CHECK_OUT).
# --dry-run prints every step and runs none. --rehearse runs every step on this machine's CPU with
# configs/tiny.yml at a small shape and no CUDA check: with PYTHON set to a copy of the GPU image's Python
# packages (docs/performance.md says how to make one) it tries the wheels and every command before device
# minutes are spent. Exit status: non-zero if any step failed. Each step has a time limit; the optional ones
# start only if they would end inside GPU_CHECK_BUDGET_S (470 s).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
REHEARSE=0
OUT_DIR=${GPU_CHECK_OUT:-/tmp/gpu_check}
WHEELS=wheels/gpu
BUDGET=${GPU_CHECK_BUDGET_S:-470}  # an optional run starts only if its time limit ends within this
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --rehearse) REHEARSE=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --wheels) WHEELS=$2; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;  # the comment block above
        *) echo "error: unknown argument '$1'; valid: --dry-run, --rehearse, --out DIR, --wheels DIR" >&2; exit 2 ;;
    esac
    shift
done

START=$SECONDS
FAILED=()
step() {  # step NAME COMMAND: print it; run it unless --dry-run; remember a failure and go on
    echo "== [$((SECONDS - START))s] $1"
    echo "   $2"
    [ "$DRY" = 1 ] && return 0
    bash -o pipefail -c "$2" || { echo "   FAILED: $1"; FAILED+=("$1"); }
}
optional() {  # optional NAME LIMIT_S COMMAND: a step, if it would end within the budget even at its limit
    if [ "$DRY" = 0 ] && [ $((SECONDS - START + $2)) -gt "$BUDGET" ]; then
        echo "== [$((SECONDS - START))s] $1: skipped (its ${2}s limit would pass the ${BUDGET}s budget)"
        return 0
    fi
    step "$1" "timeout $2 $3"
}

SITE=$OUT_DIR/site
CFG=configs/stablelm-3b-4e1t.yml
BENCH_ARGS="--steps 6 --warmup 2 --json"
CUDA_CHECK="assert torch.cuda.is_available(), 'no CUDA device'; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(), 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
DEVICE="nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "
if [ "$REHEARSE" = 1 ]; then
    echo "== rehearsal: every step on the CPU, configs/tiny.yml at micro-batch 2 x seq 64"
    CFG=configs/tiny.yml
    BENCH_ARGS="--micro-batch 2 --seq-length 64 --steps 2 --warmup 1 --json"
    CUDA_CHECK="print(sys.version.split()[0], torch.__version__, 'CUDA' if torch.cuda.is_available() else 'no CUDA (rehearsal)')"
    DEVICE=""
fi
BENCH="$PY tools/benchmark.py --config $CFG $BENCH_ARGS"
[ "$DRY" = 1 ] || mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step "1. device" "$DEVICE$PY -c \"import torch, sys; $CUDA_CHECK\"; git log -1 --format='commit %h %s' 2>/dev/null || true"
step "2. install from $WHEELS" "ls $WHEELS/*.whl >/dev/null && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl && $PY -c \"import deepspeed, megatron.core, transformers; print('deepspeed', deepspeed.__version__, 'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)\""
step "3. GPU tier" "timeout 240 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_kernels_match_references.py 2>&1 | tee $OUT_DIR/gpu_tier.log"
step "4. 3B engine, published config" "timeout 150 $BENCH --path engine > $OUT_DIR/engine_full_mb4.json"
step "5. 3B model vs transformers, eager" "timeout 210 $BENCH --path model --compare hf > $OUT_DIR/model_vs_hf.json"
optional "6a. 3B engine, no recompute" 120 "$BENCH --path engine --checkpoint-activations false --micro-batch 1 > $OUT_DIR/engine_none_mb1.json"
optional "6b. 3B engine, selective recompute" 120 "$BENCH --path engine --checkpoint-activations selective --micro-batch 1 > $OUT_DIR/engine_selective_mb1.json"
# MoE at StableLM-3B's width: 8 layers, 4 experts, top 2 (2.2B parameters, 1.0B active), experts as two grouped
# GEMMs (moe_grouped_gemm: null picks them in bf16) and then one GEMM pair per expert
MOE="$OUT_DIR/moe.yml"
[ "$DRY" = 1 ] || printf '%s\n' '{"num_layers": 8, "moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk",' \
    ' "moe_aux_loss_coeff": 0.01}' > "$MOE"
[ "$DRY" = 1 ] || printf '%s\n' '{"moe_grouped_gemm": false}' > "$OUT_DIR/moe_sequential.yml"
optional "6c. MoE engine, grouped GEMM experts" 120 "$PY tools/benchmark.py --config $CFG $MOE $BENCH_ARGS --path engine --micro-batch 1 > $OUT_DIR/moe_grouped_mb1.json"
optional "6d. MoE engine, sequential experts" 120 "$PY tools/benchmark.py --config $CFG $MOE $OUT_DIR/moe_sequential.yml $BENCH_ARGS --path engine --micro-batch 1 > $OUT_DIR/moe_sequential_mb1.json"
optional "6e. 3B engine, compiled layers" 180 "$BENCH --path engine --torch-compile true > $OUT_DIR/engine_full_mb4_compiled.json"
step "7. table" "$PY tools/benchmark.py --table \$(ls $OUT_DIR/*.json 2>/dev/null | while read f; do [ -s \"\$f\" ] && echo \"\$f\"; done) | tee $OUT_DIR/table.md"

echo "== [$((SECONDS - START))s] done${FAILED:+; failed: ${FAILED[*]}}"
[ ${#FAILED[@]} -eq 0 ]
