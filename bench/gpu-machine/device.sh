#!/bin/bash
# GPU machine, from the checkout's root: unpacks node, onnxruntime-node, the parscale bundle and
# the GL/Vulkan user-space libraries the NVIDIA ICD needs, then measures. One device call runs at
# most 600 s: steps run in the order given, each under its own limit and the call's deadline
# (BUDGET seconds from the start, default 570); a step that would not fit is skipped and said so.
# Usage: bash .carry/pscale/device.sh STEPS (comma list, run in that order) ; results under $OUT.
# Steps (issue 23): wgslgolden wgsl wgslalt wgslsafe wgslsweep wgslsweep2 wgslrows wgslloop wgsl18 wgslcli (hand-written kernels; need .carry/dawn.txz from pack.sh with DAWN=) probe longcall run golden gpuform int4 int4acc0 fp16 fp16w cpu16 eval evalfp16 evalacc0 synth18 profile gpubench gpuprofile oldgolden rss
#   (fp16: the half GPU form of an fp16 package; fp16w: the same package widened to float32, PARSCALE_GPU_FORM_HALF=0)
#   capture (needs .carry/ortweb.txz: onnxruntime-web + Dawn's webgpu, see ortweb-capture.mjs; after gpuform/int4 built the packages)
#   gfcapture (the same ortweb.txz: the engine's capture route, PARSCALE_WEBGPU_ROUTE=capture, through bench/gpu-form-decode.ts)
#   (and, from issue 19: forms ortdefaults cpu2).
set -u
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
BUDGET=${BUDGET:-570}
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
# step NAME LIMIT_S COMMAND…: runs COMMAND under min(LIMIT_S, time left); skipped under 20 s left
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  if (( rest < 20 )); then stamp "SKIPPED $name (deadline: ${rest}s left)"; return 0; fi
  (( limit > rest )) && limit=$rest
  stamp "$name (limit ${limit}s)"
  timeout "$limit" "$@"; local rc=$?
  (( rc == 124 )) && stamp "TIMED OUT $name after ${limit}s"
  return $rc
}
stamp setup
# the NVIDIA Vulkan ICD (libGLX_nvidia) loads libGLdispatch and X11/xcb: pack.sh downloads them
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
mkdir -p /tmp/node /tmp/nm/node_modules/onnxruntime-node
python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.carry/node.xz'),open('/tmp/node/node','wb'))" && chmod +x /tmp/node/node
python3 -c "import tarfile;tarfile.open('.carry/ort-node.txz').extractall('/tmp/nm/node_modules/onnxruntime-node')"
tar xzf .carry/pscale/ort-common.tgz -C /tmp/nm/node_modules
python3 -c "import tarfile;tarfile.open('.carry/pscale/bundle.tar.xz').extractall('.carry/pscale')"
ln -sfn /tmp/nm/node_modules node_modules
export PATH=/tmp/node:$PATH NODE_NO_WARNINGS=1 PARSCALE_CACHE=/tmp/pscache
B=.carry/pscale/x/y; CLI=$B/cli.js; EXP=$B/experiments.js; GF=$B/gpu-form.js; MEM=$B/gpu-memory.js
node --version; nvidia-smi -L; nproc; free -g | head -2
cat /proc/driver/nvidia/gpus/*/information 2>&1 | head -3
# Steps run in the order given (the probe first whenever it is named), so the list says what matters most.
PKG_OF() { ls -d /tmp/pscache/synthetic/h896-l24-* 2>/dev/null | grep -v -e int -e fp16 | head -1; }
PKG_INT4() { ls -d /tmp/pscache/synthetic/h896-l24-*int4* 2>/dev/null | head -1; }
# onnxruntime-web + Dawn's webgpu, unpacked once from the carried ortweb.txz
dawn_unpack() { [ -d /tmp/dawn/node_modules/webgpu ] || { mkdir -p /tmp/dawn/node_modules && python3 -c "import tarfile;tarfile.open('.carry/dawn.txz').extractall('/tmp/dawn/node_modules')"; }; export PARSCALE_DAWN=/tmp/dawn/node_modules; }
ortweb_unpack() { [ -d /tmp/ortweb/node_modules ] || { mkdir -p /tmp/ortweb && python3 -c "import tarfile;tarfile.open('.carry/ortweb.txz').extractall('/tmp/ortweb')"; } }
# Graph capture through onnxruntime-web + Dawn (ortweb-capture.mjs): per P, the decode-only GPU form
# recorded once and replayed, against the same bound buffers without capture; prompt 64 (+48 prefix rows)
capture_on() {
  local pkg=$1 label=$2 ps=$3 P F
  [ -n "$pkg" ] || { stamp "capture $label: no package (run gpuform/int4 first)"; return 0; }
  ortweb_unpack
  step "capture $label: write graphs" 90 node $EXP gpuform-graphs $pkg $ps >/dev/null
  for P in $ps; do
    F=$(( P > 1 ? 112 : 64 ))
    CAPACITY=$(( F + 33 )) FILLED=$F STEPS=${CAPTURE_STEPS:-48} NODE_PATH=/tmp/ortweb/node_modules \
      step "capture $label P=$P" 120 node bench/gpu-machine/ortweb-capture.mjs $pkg $P capture 2>&1 | grep -v '^Warning' | tee -a $OUT/capture.txt
  done
}
run_step() {
  case $1 in
  probe) step probe 60 node $EXP probe || {
    stamp "no adapter: stop"; ldconfig -p | grep -i -E "gldispatch|libGLX|libX11|libxcb" | head -6
    VK_LOADER_DEBUG=error,warn timeout 60 node $EXP probe 2>&1 | grep -v "^Warning" | head -12; exit 1; } ;;
  run) step "run --device webgpu (default model, P=8)" 120 node $CLI run --device webgpu --prompt "def fibonacci(n):" --max-new-tokens 32 --parallel 8 --temperature 0 ;;
  golden) step "golden: GPU form on WebGPU vs PyTorch and the CPU graph" 120 node $EXP gpuform-golden . $OUT/gpuform-golden.json ;;
  oldgolden) step "golden: WebGPU graph (before) vs CPU" 150 node $EXP golden . $OUT/golden.json ;;
  # The GPU form, 0.5b synthetic, prompt 64, 32 new tokens: decode ms/token per P, dispatches, floor, peak RSS
  gpuform) BENCH_PARALLEL=${GF_PARALLEL:-1,2,4,8} step "GPU form 0.5b fp32 (builds the package)" 240 node $GF > $OUT/gpuform-fp32.txt; cat $OUT/gpuform-fp32.txt ;;
  int4acc0) BENCH_QUANT=int4 PARSCALE_GPU_MATMUL_ACCURACY=0 step "GPU form 0.5b int4, MatMulNBits accuracy_level 0 (float activations, no DP4A)" 200 node $GF > $OUT/gpuform-int4-acc0.txt; cat $OUT/gpuform-int4-acc0.txt ;;
  int4) BENCH_QUANT=int4 step "GPU form 0.5b int4 (builds the package)" 200 node $GF > $OUT/gpuform-int4.txt; cat $OUT/gpuform-int4.txt ;;
  fp16) BENCH_DTYPE=fp16 PARSCALE_GPU_FORM_HALF=1 step "GPU form 0.5b fp16, the half form (builds the package)" 200 node $GF > $OUT/gpuform-fp16.txt; cat $OUT/gpuform-fp16.txt ;;
  fp16w) BENCH_DTYPE=fp16 PARSCALE_GPU_FORM_HALF=0 step "GPU form 0.5b fp16 widened to float32 (PARSCALE_GPU_FORM_HALF=0)" 200 node $GF > $OUT/gpuform-fp16w.txt; cat $OUT/gpuform-fp16w.txt ;;
  cpu16) step "CPU graph 0.5b, 16 threads (the ratio's base)" 300 node $CLI bench --synthetic 0.5b --parallel ${CPU_PARALLEL:-1,8} --threads 16 --repeat 1 --no-roofline --json-file $OUT/bench-cpu16.json ;;
  eval) step "held-out NLL through the GPU form: fp32, int8, int4 at P=1,8" 120 node $EXP gpuform-eval . $OUT/gpuform-eval.json ;;
  evalfp16) step "held-out NLL through the GPU form: fp32, fp16 half, fp16 widened at P=1,8" 120 node $EXP gpuform-eval-fp16 . $OUT/gpuform-eval-fp16.json ;;
  evalacc0) PARSCALE_GPU_MATMUL_ACCURACY=0 step "held-out NLL through the GPU form, MatMulNBits accuracy_level 0" 120 node $EXP gpuform-eval . $OUT/gpuform-eval-acc0.json ;;
  synth18) BENCH_SHAPE=1.8b BENCH_PARALLEL=1,8 BENCH_REPEAT=2 step "GPU form 1.8b fp32 (builds the package)" 300 node $GF > $OUT/gpuform-1.8b.txt; cat $OUT/gpuform-1.8b.txt ;;
  profile) PKG=$(PKG_OF); [ -n "$PKG" ] && step "profile of GPU form decode, P=8" 100 node $EXP gpuform-profile $PKG $OUT/gpuform-profile-p8.json 8 ;;
  gpubench) step "bench 0.5b webgpu, the WebGPU graph (before)" 300 node $CLI bench --synthetic 0.5b --parallel 1,8 --device webgpu --repeat 2 --json-file $OUT/bench-webgpu.json ;;
  forms) PKG=$(PKG_OF); [ -n "$PKG" ] && for f in ${FORMS:-nosplit t768 mlp down}; do step "decode form $f" 100 node $EXP decode $PKG $f 1 8; done ;;
  ortdefaults) PKG=$(PKG_OF); [ -n "$PKG" ] && PARSCALE_WEBGPU_OPTIONS='{"provider":{"validationMode":"basic"},"config":{"maxNumPendingDispatches":"16"}}' step "decode gemm, ORT's default provider settings" 100 node $EXP decode $PKG default 1 8 ;;
  gpuprofile) step "bench 0.5b webgpu with --profile: dispatches/step, floor and per-op GPU time per P" 200 node $CLI bench --synthetic 0.5b --parallel 1,8 --device webgpu --repeat 1 -n 9 --profile /tmp/gpuprof --json-file $OUT/bench-webgpu-profile.json ;;
  rss) BENCH_THREADS=16 BENCH_PARALLEL=8 step "peak host RSS: GPU form on webgpu vs CPU graph (0.5b, P=8, prompt 64, 4 tokens)" 120 node $MEM > $OUT/rss.txt; cat $OUT/rss.txt ;;
  # one long call through the GPU form against the CPU graph (default model): {limit, runs, worst} per length
  longcall) step "default model, P=8: the first run converts it" 60 node $CLI run --parallel 8 --prompt x --max-new-tokens 1 >/dev/null
    for n in 64 128; do step "GPU form: $n tokens in one call vs the CPU graph (P=8)" 60 node $B/long-call.js "$(dirname "$(ls /tmp/pscache/converted/default-model-*/parscale.json | head -1)")" 8 $n | tee -a $OUT/long-call.txt; done ;;
  cpu2) step "bench 0.5b cpu 2 threads" 300 node $CLI bench --synthetic 0.5b --parallel 1,2,4,8 --threads 2 --repeat 1 --no-roofline --json-file $OUT/bench-cpu2.json ;;
  capture) capture_on "$(PKG_OF)" fp32 "${CAPTURE_P:-8 1 2 4}" ;;
  # the engine's capture route (core/engine/webgpu-capture.ts): prefill through the dynamic form, decode replayed; each P's line says the route taken
  gfcapture) ortweb_unpack
    PARSCALE_WEBGPU_ROUTE=capture PARSCALE_ORTWEB=/tmp/ortweb/node_modules BENCH_PARALLEL=${GF_PARALLEL:-1,8} \
      step "GPU form 0.5b fp32 on the capture route (engine)" 300 node $GF 2>&1 | grep -v '^Warning' > $OUT/gpuform-capture.txt; cat $OUT/gpuform-capture.txt ;;
  capture4) capture_on "$(PKG_INT4)" int4 "8 1" ;;
  # the hand-written WebGPU kernels (src/core/wgsl/, Dawn's webgpu from the carried dawn.txz): golden logits, then decode per P
  wgslgolden) dawn_unpack; step "hand-written kernels: golden logits, every prompt position" 60 node $B/wgsl-golden.js fixtures/golden 2>&1 | grep -v '^Warning' | tee $OUT/wgsl-golden.txt ;;
  wgsl) dawn_unpack; BENCH_WEIGHTS=${WGSL_WEIGHTS:-f32,f16,q4} BENCH_PARALLEL=${WGSL_PARALLEL:-1,2,4,8} step "hand-written kernels: 0.5b decode per P and weight format" 360 node $B/wgsl-decode.js 2>&1 | grep -v '^Warning' | tee $OUT/wgsl-0.5b.txt ;;
  # Dawn's defaults (validation, bounds clamps, workgroup zeroing, quantized timestamps) against dawn.ts's flags, same call
  # the same end to end with other knob values (WGSL_ALT: VAR=value pairs, e.g. "PARSCALE_WGSL_MLP_ROWS=2 PARSCALE_WGSL_OUT_ROWS=4")
  wgslalt) dawn_unpack; BENCH_WEIGHTS=${WGSL_ALT_WEIGHTS:-f16} BENCH_PARALLEL=${WGSL_PARALLEL:-1,2,4,8} step "hand-written kernels: 0.5b decode with ${WGSL_ALT:-the defaults}" 200 env ${WGSL_ALT:-} node $B/wgsl-decode.js 2>&1 | grep -v '^Warning' | tee $OUT/wgsl-alt.txt ;;
  wgslsafe) dawn_unpack; PARSCALE_DAWN_FLAGS= BENCH_WEIGHTS=${WGSL_WEIGHTS:-f16} BENCH_PARALLEL=1,8 step "hand-written kernels: 0.5b with Dawn's default toggles (PARSCALE_DAWN_FLAGS=)" 120 node $B/wgsl-decode.js 2>&1 | grep -v '^Warning' | tee $OUT/wgsl-safe.txt ;;
  # the matrix-vector knobs (bench/wgsl-sweep.ts): GPU ms per kernel at P = 1 and 8 per variant
  wgslsweep) dawn_unpack; BENCH_VARIANTS=${SWEEP_VARIANTS:-base:} BENCH_WEIGHTS=${SWEEP_WEIGHTS:-f32} step "hand-written kernels: 0.5b ${SWEEP_WEIGHTS:-f32}, a sweep of the matrix-vector knobs" ${SWEEP_LIMIT:-300} node $B/wgsl-sweep.js 2>&1 | grep -v '^Warning' | tee -a $OUT/wgsl-sweep.txt ;;
  wgslsweep2) dawn_unpack; BENCH_VARIANTS=${SWEEP2_VARIANTS:-base:} BENCH_WEIGHTS=${SWEEP2_WEIGHTS:-f16} step "hand-written kernels: 0.5b ${SWEEP2_WEIGHTS:-f16}, a sweep of the matrix-vector knobs" ${SWEEP2_LIMIT:-200} node $B/wgsl-sweep.js 2>&1 | grep -v '^Warning' | tee -a $OUT/wgsl-sweep.txt ;;
  wgslrows) dawn_unpack; for r in 1 4; do PARSCALE_WGSL_OUT_ROWS=$r BENCH_PARALLEL=1,8 step "hand-written kernels: 0.5b, o_proj/down $r rows a workgroup" 100 node $B/wgsl-decode.js 2>&1 | grep -v '^Warning' | tee -a $OUT/wgsl-rows.txt; done ;;
  wgslcli) dawn_unpack; PARSCALE_WEBGPU_ROUTE=wgsl step "bench 0.5b --device webgpu on the hand-written kernels (PARSCALE_WEBGPU_ROUTE=wgsl)" 200 node $CLI bench --synthetic 0.5b --parallel 1,8 --device webgpu --repeat 2 --json-file $OUT/bench-wgsl.json --profile $OUT/wgslprof 2>&1 | grep -v '^Warning' ;;
  wgslloop) dawn_unpack; for v in streams weights; do PARSCALE_WGSL_LOOP=$v BENCH_PARALLEL=${WGSL_PARALLEL:-1,8} BENCH_ROUNDS=2 step "hand-written kernels: 0.5b, matvec loop $v" 120 node $B/wgsl-decode.js 2>&1 | grep -v '^Warning' | tee -a $OUT/wgsl-loop.txt; done ;;
  wgsl18) dawn_unpack; BENCH_SHAPE=1.8b BENCH_PARALLEL=1,8 BENCH_WEIGHTS=${WGSL18_WEIGHTS:-f32,f16} step "hand-written kernels: 1.8b decode, P=1,8" 200 node $B/wgsl-decode.js 2>&1 | grep -v '^Warning' | tee $OUT/wgsl-1.8b.txt ;;
  *) stamp "unknown step $1" ;;
  esac
}
LIST=${1:-probe,run,golden,gpuform,int4,fp16,cpu16,eval,synth18,profile}
[[ ",$LIST," == *",probe,"* ]] && run_step probe
for s in ${LIST//,/ }; do [ "$s" = probe ] || run_step "$s"; done
stamp done
# the device returns at most 8 files: everything but the log in one tar
(cd $OUT && ls | grep -v -x -e log.txt -e results.tar | tar cf results.tar -T - --remove-files) 2>/dev/null
ls -la $OUT
