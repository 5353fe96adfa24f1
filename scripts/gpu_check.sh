#!/usr/bin/env bash
# Every GPU check of apt-deploy in one call, on a machine with an NVIDIA GPU and no package registry.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR default: benchmarks/results/gpu
#   bash scripts/gpu_check.sh --dry-run [DIR]  # CPU: the same wiring with each step's dry run (no GPU needed)
#
# Prepare here (PyPI reachable): bash scripts/gpu_wheelhouse.sh   (writes .whl/, ~0.5 MiB; carry it along)
# Steps (each with a time limit; the whole run stays under 8 minutes):
#   env        GPU, driver, torch/triton/transformers versions
#   install    the pinned wheels of scripts/gpu_wheels.txt that are missing (pip --no-index --find-links .whl),
#              then pip install --no-deps --no-build-isolation -e .  (PYTHONPATH is set to the checkout as well)
#   pytest_gpu pytest -m gpu (kernel vs numpy on CUDA, torch op dispatch, CUDA-graph replay; TensorRT tests
#              where tensorrt imports) -> pytest_gpu.xml
#   kernel     python -m engines.kernels.kernel_bench -> kernel_bench.json (fused vs unfused, fp16/bf16)
#   vilt       python -m apt_deploy.experiments.gpu_latency -> vilt_latency.json (ViLT-B base vs APT, CUDA graphs)
#   sync       pytest tests/test_torch_cuda.py (no host sync in the captured forward, on this image's transformers)
#   trt        python -m apt_deploy.experiments.gpu_trt_ab -> trt_ab.json (plugin vs --no-plugin; "skipped" without tensorrt)
# Writes gpu_check.log and summary.json beside the results (6 files: what the device tool brings back),
# prints a summary, exits 0 when every step exited 0.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [[ ${1:-} == --dry-run ]]; then DRY=--dry-run; shift; fi
OUT_DIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 APT_DEPLOY_NO_PROGRESS=1
START=$(date +%s)
STEPS=""

step() {  # step NAME LIMIT_S CMD... : run CMD with min(LIMIT_S, what is left of the budget), log its output
    local name=$1 limit=$2 t0 rc left
    shift 2
    left=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        echo "=== $name: skipped, ${left}s of the ${BUDGET_S}s budget left" | tee -a "$LOG"
        STEPS="$STEPS $name=skipped"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (time limit)')" | tee -a "$LOG"
    STEPS="$STEPS $name=$rc"
}

install() {
    local pins
    pins=$(grep -vE '^\s*(#|$)' scripts/gpu_wheels.txt)
    if compgen -G ".whl/*.whl" >/dev/null; then
        # pip skips pins that are already satisfied: only what is missing is installed
        "$PY" -m pip install -q --no-index --find-links .whl --no-deps $pins || return 1
    else
        echo "no .whl/ wheelhouse: run bash scripts/gpu_wheelhouse.sh where PyPI is reachable and carry .whl"
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed; PYTHONPATH=$PWD is used"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|onnx|onnxruntime|onnxscript|polygraphy|onnx.graphsurgeon|tensorrt|apt-deploy) '
}
export -f install
export PY

if [[ -z $DRY ]] && { ! command -v nvidia-smi >/dev/null || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; }; then
    echo "error: no NVIDIA GPU visible to torch here; scripts/gpu_check.sh runs on a GPU machine" | tee -a "$LOG" >&2
    exit 2
fi

COLLECT=${DRY:+--collect-only}
if [[ -z $DRY ]]; then
    step env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; "$PY" -c "
import torch, triton, transformers, platform
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"triton\", triton.__version__, \"transformers\", transformers.__version__, \"gpu\", torch.cuda.get_device_name(0))"'
    step install 60 bash -c install
fi
step pytest_gpu 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider $COLLECT --junitxml="$OUT_DIR/pytest_gpu.xml" tests
step kernel 90 "$PY" -m engines.kernels.kernel_bench $DRY --out "$OUT_DIR/kernel_bench.json"
step vilt 120 "$PY" -m apt_deploy.experiments.gpu_latency $DRY --out "$OUT_DIR/vilt_latency.json"
step sync 45 "$PY" -m pytest -q -p no:cacheprovider $COLLECT tests/test_torch_cuda.py -k "host_synchronisation or keeps_the_outputs"
step trt 120 "$PY" -m apt_deploy.experiments.gpu_trt_ab $DRY --out "$OUT_DIR/trt_ab.json"

DRY="$DRY" STEPS="$STEPS" ELAPSED=$(( $(date +%s) - START )) "$PY" - "$OUT_DIR" <<'EOF' | tee -a "$LOG"
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = dict(s.split("=", 1) for s in os.environ["STEPS"].split())
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None
summary = {"steps": steps, "elapsed_s": int(os.environ["ELAPSED"]), "dry_run": bool(os.environ.get("DRY"))}
print(f"gpu_check: {summary['elapsed_s']} s; steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()))
kernel = load("kernel_bench.json")
if kernel and not kernel.get("dry_run"):
    summary["kernel"] = {"all_checks_ok": kernel.get("all_checks_ok"), "target_met": kernel.get("target_met"),
                         "speedups": {f"{c['dtype']} {c['rows']}x{c['p']}": round(c["speedup"], 2) for c in kernel["cases"]}}
    print(f"kernel: checks ok {kernel.get('all_checks_ok')}, target (x1.5 at n*p >= 64k) met {kernel.get('target_met')}")
    for c in kernel["cases"]:
        print(f"  {c['dtype']:9s} n={c['rows']:5d} p={c['p']:3d}: fused {c['fused_ms']*1e3:8.1f} us, "
              f"unfused {c['unfused_ms']*1e3:8.1f} us, x{c['speedup']:.2f}")
vilt = load("vilt_latency.json")
if vilt and "timings" in vilt:
    t, v = vilt["timings"], vilt["verdict"]
    summary["vilt"] = {"p50_ms": {k: round(x["p50_ms"], 4) for k, x in t.items()}, **v}
    print("vilt-b: " + ", ".join(f"{k} {x['p50_ms']:.3f} ms" for k, x in t.items()) +
          f"; overhead {v['overhead_measured']:.3f} vs floor {v['overhead_floor']:.3f}; "
          f"latency within 1.3x floor {v['latency_within_1.3x_floor']}, overhead within 1.3x floor {v['overhead_within_1.3x_floor']}")
trt = load("trt_ab.json")
if trt:
    summary["trt"] = trt.get("results") or {"skipped": trt.get("skipped")}
    print("trt: " + (json.dumps(trt["results"]) if "results" in trt else f"skipped ({trt.get('skipped')})"))
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"results in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
EOF
for s in $STEPS; do [[ ${s#*=} == 0 ]] || exit 1; done
exit 0
