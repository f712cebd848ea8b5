#!/usr/bin/env bash
# The GPU suite: everything a session with a lent GPU measures, in one call of under 10 minutes.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# Writes under OUT_DIR (default: $OUT, the device tool's output folder, else
# bench-out/gpu-<date>):
#   env/          nvidia-smi, library versions, which optional modules are present
#   kernels/      pytest -m gpu (kernel checks at real sizes) and any benchmarks/kernel*.py
#   paths/        benchmarks/gpu_paths.py: the GPU post stage (CuPy and torch paste-back, I420
#                 on the GPU, frames on the device until the planes' copy) and the batched and
#                 compiled (and TensorRT) paths at batch 1, 8 and 32, recompiles counted
#   tiny-eager/ base-eager/        talkstream bench on cuda, torch eager: bf16 vs fp32, custom
#                                  ops vs reference kernels, 2 steps, batched sessions (1, 8,
#                                  32 sessions in one render call), end-to-end latency,
#                                  sessions per GPU; every frame through the GPU post stage
#                                  and VP8 as serve sends it
#   tiny-backends/ base-backends/  compiled, onnxruntime, tensorrt side by side
#   anchors/      MuseTalk- and Wav2Lip-equivalents against ours, fp16, same run
#   summary.md    the short table printed last
#
# Needs no network: the GPU image has torch, Triton, CuPy and onnxruntime but reaches no
# registry. Optional modules that are missing (diffusers for the MuseTalk anchor, matplotlib for
# plots) are reported and the parts that need them are skipped or run without them. To bring
# them along, put their wheels in an ignored folder that travels with the call (64 MiB at most)
# and set WHEELHOUSE to it; they are then installed offline (pip --no-index).
#
# Environment: PYTHON (python3), QUICK=1 (short runs, to test the script), ALLOW_CPU=1 (run on
# a machine without a GPU, on the CPU, to test the script), WHEELHOUSE (see above).
set -uo pipefail # not -e: a failing part must not lose the other parts' results

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-bench-out/gpu-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$OUT_DIR"/env "$OUT_DIR"/kernels
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STATUS="$OUT_DIR/status.txt"
: >"$STATUS"
# The whole call stays under the device tool's 10 minutes: every part's limit is cut to what
# is left of SUITE_S, less a reserve for the summary.
SUITE_S=${SUITE_S:-570}
RESERVE_S=20

note() { echo "== $*" | tee -a "$STATUS"; }
BENCH=("$PY" -m talkstream.cli bench)
# Run a part with a time limit; its output to a log; its exit status to status.txt.
part() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS left=$((SUITE_S - RESERVE_S - SECONDS))
  ((limit > left)) && limit=$left
  mkdir -p "$(dirname "$OUT_DIR/$name")"
  if ((limit < 10)); then
    note "$name: skipped: out of time (suite budget ${SUITE_S} s)"
    return 0
  fi
  timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc after $((SECONDS - t0)) s (log: $name.log)"
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/   /'
  return 0
}

# -- 1. environment ----------------------------------------------------------------------------
# Each part below runs under a time limit (LIMIT, 60 s; kernel parts 45-50 s; paths 130 s), and
# never past what is left of SUITE_S: the whole suite stays under the device tool's 10 minutes.
DEVICE=cuda
if ! nvidia-smi >"$OUT_DIR/env/nvidia-smi.txt" 2>&1; then
  if [[ ${ALLOW_CPU:-0} == 1 ]]; then
    DEVICE=cpu
    note "no GPU (nvidia-smi failed); ALLOW_CPU=1: running on the CPU to test the script"
  else
    cat "$OUT_DIR/env/nvidia-smi.txt"
    echo "gpu_suite: no GPU here (nvidia-smi failed); set ALLOW_CPU=1 to test the script" >&2
    exit 1
  fi
fi
if [[ -n ${WHEELHOUSE:-} && -d ${WHEELHOUSE} ]]; then
  note "installing optional modules offline from $WHEELHOUSE"
  "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" -q "$WHEELHOUSE"/*.whl \
    >"$OUT_DIR/env/pip-wheelhouse.log" 2>&1 || note "wheelhouse install failed (see env/)"
fi
"$PY" - >"$OUT_DIR/env/versions.txt" 2>&1 <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for mod in ("torch", "triton", "cupy", "onnxruntime", "onnx", "numpy", "av", "soundfile",
            "PIL", "safetensors", "skimage", "tqdm", "matplotlib", "diffusers", "pytest"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:12s} {getattr(m, '__version__', '?')}")
    except Exception as e:  # report every failure kind: a broken install is a finding too
        print(f"{mod:12s} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda available", torch.cuda.is_available(), "runtime", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB",
          f"sm_{p.major}{p.minor}")
EOF
cat "$OUT_DIR/env/versions.txt"
if ! "$PY" -c "import talkstream.engine.pipeline" 2>"$OUT_DIR/env/import-error.txt"; then
  cat "$OUT_DIR/env/import-error.txt"
  echo "gpu_suite: the engine does not import here (a core module is missing, see above)" >&2
  exit 1
fi
PLOTS=()
"$PY" -c "import matplotlib" 2>/dev/null || {
  PLOTS=(--no-plots)
  note "matplotlib missing: no PNG plots"
}
"$PY" -c "import diffusers" 2>/dev/null || note "diffusers missing: the MuseTalk anchor is skipped"
ENCODE=()
"$PY" -c "import av, aiortc.codecs.vpx" 2>/dev/null || {
  ENCODE=(--no-encode)
  note "PyAV or aiortc missing: no VP8 encode stage (serve's encoder)"
}

if [[ ${QUICK:-0} == 1 ]]; then
  ITERS=(--iters 5 --warmup 2)
  STREAM=(--e2e-seconds 1 --max-sessions 4 --confirm-seconds 0.5)
  ANCHOR_ITERS=1
  SESSIONS="2"
  LIMIT=120
  PATHS=(--iters 1 --batches 1,8)
else
  ITERS=(--iters 40 --warmup 10)
  STREAM=(--e2e-seconds 4 --max-sessions 512 --confirm-seconds 2)
  ANCHOR_ITERS=20
  SESSIONS="8 32"
  LIMIT=60
  PATHS=(--iters 10 --batches 1,8,32)
fi
KLIMIT=$((LIMIT < 50 ? LIMIT : 50))
PLIMIT=130
# The low precision of the eager runs; the CPU test run keeps float32 for everything (CPU
# half-precision convolutions are slow and say nothing about the GPU).
LOW=bfloat16
[[ $DEVICE == cpu ]] && LOW=float32

# -- 2. kernels --------------------------------------------------------------------------------
if "$PY" -c "import pytest" 2>/dev/null; then
  # Exit 5 means no test carries the gpu marker (yet): recorded, not an error.
  part kernels/pytest-gpu "$KLIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests
else
  note "kernels: pytest is not installed here; kernel checks skipped"
fi
shopt -s nullglob
for f in benchmarks/kernel*.py benchmarks/bench_kernels*.py; do
  name=$(basename "$f" .py)
  args=()
  # Scripts that can write JSON (benchmarks/kernels_gpu.py: --json) keep it with the results.
  grep -q -- '"--json"' "$f" && args=(--json "$OUT_DIR/kernels/$name.json")
  part "kernels/$name" 45 "$PY" "$f" "${args[@]}"
done
shopt -u nullglob

# -- 3. the GPU paths --------------------------------------------------------------------------
# The GPU post stage, and torch / compiled / TensorRT at batch 1, 8 and 32 in one process (GPU-
# only parts report "skipped: no CUDA" on the CPU). Stops starting new work 15 s before its limit.
part paths/gpu-paths "$PLIMIT" "$PY" benchmarks/gpu_paths.py --device "$DEVICE" \
  --out "$OUT_DIR/paths" --deadline-s $((PLIMIT - 15)) "${PATHS[@]}"

# -- 4. the engine -----------------------------------------------------------------------------
# Two runs per preset, each its own part (a slow backend build must not cost the eager numbers):
#   eager:    torch in LOW and fp32, custom ops vs reference kernels, 2 steps, batched sessions;
#             the first scenario also drives end-to-end latency and sessions per GPU
#   backends: compiled, onnxruntime, tensorrt (skipped with the reason where they cannot run)
write_scenarios() { # preset kind -> scenario file on stdout
  "$PY" - "$1" "$2" "$DEVICE" "$LOW" "${#ENCODE[@]}" "$SESSIONS" <<'EOF'
import json, sys
preset, kind, device, low, no_encode, sessions = sys.argv[1:]
base = {"preset": preset, "device": device, "encode": no_encode == "0"}
if kind == "eager":
    rows = [
        {"backend": "torch", "dtype": low},
        {"backend": "torch", "dtype": "float32"},
        {"backend": "torch", "dtype": low, "kernels": "reference"},
        {"backend": "torch", "dtype": low, "steps": 2},
    ]
    rows += [{"backend": "torch", "dtype": low, "sessions": int(n)} for n in sessions.split()]
else:
    rows = [
        {"backend": "compiled", "dtype": low},
        {"backend": "onnxruntime", "dtype": "float32"},
        {"backend": "tensorrt", "dtype": "float16" if device != "cpu" else "float32"},
    ]
print(json.dumps([base | r for r in rows], indent=1))
EOF
}
for preset in tiny base; do
  for kind in eager backends; do
    scen="$OUT_DIR/$preset-$kind.scenarios.json"
    write_scenarios "$preset" "$kind" >"$scen"
    if [[ $kind == eager ]]; then
      extra=("${STREAM[@]}")
    else
      extra=(--e2e-seconds 0 --no-throughput)
    fi
    # Built artifacts (ONNX graphs, engines) are cached inside OUT_DIR, beside the results.
    part "$preset-$kind/bench" "$LIMIT" "${BENCH[@]}" --scenario-file "$scen" \
      --skip-unavailable --keep-going "${ITERS[@]}" "${extra[@]}" "${PLOTS[@]}" \
      --cache-dir "$OUT_DIR/cache" --out "$OUT_DIR/$preset-$kind"
  done
done

# -- 5. anchors --------------------------------------------------------------------------------
ADTYPE=float16
[[ $DEVICE == cpu ]] && ADTYPE=float32
part anchors/bench "$LIMIT" "${BENCH[@]}" --device "$DEVICE" --dtype "$ADTYPE" --anchors \
  --anchor-iters "$ANCHOR_ITERS" --sessions 1 "${ITERS[@]}" "${ENCODE[@]}" --e2e-seconds 0 \
  --no-throughput "${PLOTS[@]}" --out "$OUT_DIR/anchors"

# -- 6. summary, printed last --------------------------------------------------------------------
{
  echo "# GPU suite $(date -Iseconds)"
  echo
  grep -m1 '^device' "$OUT_DIR/env/versions.txt" || echo "device: $DEVICE"
  grep -E '^(torch|triton|cupy|onnxruntime) ' "$OUT_DIR/env/versions.txt"
  echo
  "${BENCH[@]}" --summarize "$OUT_DIR"
  echo
  cat "$OUT_DIR/paths/gpu_paths.md" 2>/dev/null || echo "gpu paths: no result (see paths/)"
  echo
  cat "$STATUS"
  echo "suite: $SECONDS s in all (budget $SUITE_S s)"
} >"$OUT_DIR/summary.md"
echo
cat "$OUT_DIR/summary.md"
