#!/usr/bin/env bash
# The GPU check in one script: the `gpu`-marked tests, then benchmarks/train.py (bf16, ZeRO-3,
# packed 4096-token rows, synthetic shards of the model's own vocabulary) on the SmolLM2-135M shape
# and the Qwen2-0.5B shape, reporting tokens/s and MFU against the chip's dense bf16 peak
# (cprec.train.mfu.GPU_PEAKS; H200/H100: 989 TFLOP/s).
#
#   launch/gpu_check.sh wheels        on a machine that reaches PyPI: put what a bare CUDA+PyTorch
#                                     image lacks (DeepSpeed, liger-kernel, webdataset, pydantic, ...)
#                                     as Python 3.12 wheels into .whl/ (git-ignored via .git/info/exclude)
#   launch/gpu_check.sh [OUT_DIR]     on the GPU machine (default out/gpu_check): installs .whl/ if
#                                     present, runs everything, writes OUT_DIR/{tests.log, *.json,
#                                     summary.json} and prints the summary. ~8-10 min on one H200
#                                     (DeepSpeed JIT-builds its fused Adam on the first run).
#   DRY_RUN=1 launch/gpu_check.sh     print the test and benchmark commands instead of running them
#
# flash-attn has no wheel on PyPI (it builds from source for an hour): where it is absent the flash
# tests skip and attention takes the flex_attention path, which the summary names. SMOLLM2_DIR=<HF
# folder> benchmarks the real SmolLM2-135M weights instead of its shape.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    print_usage "${BASH_SOURCE[0]}"
    exit 0
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
dry=${DRY_RUN:-0}

if [[ "${1:-}" == "wheels" ]]; then
    mkdir -p .whl
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d .whl hjson "pydantic>=2" pydantic-core annotated-types typing-inspection \
        "webdataset>=0.2.100" braceexpand "liger-kernel>=0.5" "mlflow-skinny>=2.16" sqlparse
    # DeepSpeed ships as a source archive only: a wheel without prebuilt ops (they JIT-build there).
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps -w .whl "deepspeed==0.19.8"
    ls -la .whl
    exit 0
fi

OUT=${1:-out/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ $dry != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cprec-site .whl/*.whl
    export PYTHONPATH=/tmp/cprec-site${PYTHONPATH:+:$PYTHONPATH}
fi
# The repository as the import root (cprec and cprec_kernels are both top-level folders).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=/tmp/cprec-torch-ext
unset DS_ACCELERATOR

[[ $dry == 1 ]] || {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" - <<'EOF'
import importlib
for name in ("torch", "transformers", "deepspeed", "flash_attn", "liger_kernel", "triton"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "absent:", type(exc).__name__, exc)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUT/env.txt"

# 1. The gpu-marked tests (flash varlen packed == one by one, Liger CE == reference, flex, a run).
set +e
run_cmd timeout 420 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
set -e

# 2. Throughput: SmolLM2-135M and Qwen2-0.5B shapes, bf16, ZeRO-3, packed 4096-token rows.
smol=(model.arch=llama model.hidden_size=576 model.num_layers=30 model.num_heads=9 model.num_kv_heads=3
    model.intermediate_size=1536 model.tie_word_embeddings=true model.rope_theta=100000)
if [[ -n "${SMOLLM2_DIR:-}" ]]; then smol=("model.name_or_path=$SMOLLM2_DIR"); fi
qwen=(model.arch=qwen2 model.hidden_size=896 model.num_layers=24 model.num_heads=14 model.num_kv_heads=2
    model.intermediate_size=4864 model.tie_word_embeddings=true model.rope_theta=1000000)
common=(--device cuda --no-baseline --no-readme --repeats 1 --seq-len 4096 --zero-stage 3 --warmup 3
    --steps 10 --synthetic-dir /tmp/cprec-synthetic)
bench_rc=0
run_cmd timeout 600 "$PY" benchmarks/train.py "${common[@]}" --synthetic-vocab 49152 --micro-batch 8 \
    --out "$OUT/train_smollm2_135m.json" model.dtype=bf16 "${smol[@]}" 2>&1 | tail -40 || bench_rc=1
run_cmd timeout 600 "$PY" benchmarks/train.py "${common[@]}" --synthetic-vocab 151936 --micro-batch 4 \
    --out "$OUT/train_qwen2_05b.json" model.dtype=bf16 "${qwen[@]}" 2>&1 | tail -40 || bench_rc=1
[[ $dry == 1 ]] && exit 0

"$PY" - "$OUT" "$tests_rc" <<'EOF'
import json, re, sys
from pathlib import Path
out, tests_rc = Path(sys.argv[1]), int(sys.argv[2])
log = (out / "tests.log").read_text() if (out / "tests.log").is_file() else ""
tail = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed|skipped)", ln)]
summary = {"gpu_tests_rc": tests_rc, "gpu_tests": tail[-1] if tail else "no result", "train": {}}
for f in sorted(out.glob("train_*.json")):
    r = json.loads(f.read_text())
    entry = r["models"][0]
    ours = entry["sides"]["cprec"]
    summary["train"][f.stem] = {
        "params": entry["params"],
        "tokens_per_s": round(ours["tokens_per_s"]["median"]),
        "mfu": round(ours["mfu"], 4),
        "step_breakdown_s": ours.get("step_breakdown_s"),
        "peak_flops": r["peak_flops_per_device"],
        "peak_source": r["peak_source"],
        "rows": f'{r["settings"]["micro_batch"]} x {r["settings"]["seq_len"]}',
    }
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
exit $((tests_rc != 0 || bench_rc != 0))
