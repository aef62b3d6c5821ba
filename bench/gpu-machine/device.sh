#!/bin/bash
# GPU machine, from the checkout's root: unpacks node, onnxruntime-node and the parscale bundle,
# then measures. Usage: bash .carry/pscale/device.sh STEPS (comma list) ; results under $OUT.
set -u
STEPS=",${1:-all},"
has() { [[ "$STEPS" == *",all,"* || "$STEPS" == *",$1,"* ]]; }
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
stamp setup
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
mkdir -p /tmp/node /tmp/nm/node_modules/onnxruntime-node
python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.carry/node.xz'),open('/tmp/node/node','wb'))" && chmod +x /tmp/node/node
tar xzf .carry/ort-node.tgz -C /tmp/nm/node_modules/onnxruntime-node
tar xzf .carry/pscale/ort-common.tgz -C /tmp/nm/node_modules
python3 -c "import tarfile;tarfile.open('.carry/pscale/bundle.tar.xz').extractall('.carry/pscale')"
ln -sfn /tmp/nm/node_modules node_modules
export PATH=/tmp/node:$PATH NODE_NO_WARNINGS=1 PARSCALE_CACHE=/tmp/pscache
CLI=.carry/pscale/x/y/cli.js; EXP=.carry/pscale/x/y/experiments.js
node --version; nvidia-smi -L; nproc; free -g | head -2
cat /proc/driver/nvidia/gpus/*/information 2>&1 | head -3; ls /sys/class/drm 2>&1 | head -3
if has run; then
  stamp "run --device webgpu (default model, P=8)"
  timeout 120 node $CLI run --device webgpu --prompt "def fibonacci(n):" --max-new-tokens 32 --parallel 8 --temperature 0 || {
    stamp "webgpu failed: stop"; ldconfig -p | grep -i -E "gldispatch|libGLX" | head -4
    python3 -c "
from onnx import helper,TensorProto
x=helper.make_tensor_value_info('x',TensorProto.FLOAT,[4]);y=helper.make_tensor_value_info('y',TensorProto.FLOAT,[4])
m=helper.make_model(helper.make_graph([helper.make_node('Add',['x','x'],['y'])],'g',[x],[y]),opset_imports=[helper.make_opsetid('',17)]);m.ir_version=8
open('/tmp/probe.onnx','wb').write(m.SerializeToString())"
    VK_LOADER_DEBUG=error,warn node -e "require('onnxruntime-node').InferenceSession.create('/tmp/probe.onnx',{executionProviders:['webgpu']}).then(()=>console.log('ok'),(e)=>console.log(e.message.slice(-80)))" 2>&1 | head -8; exit 1; }
  timeout 60 node $CLI run --prompt "def fibonacci(n):" --max-new-tokens 32 --parallel 8 --temperature 0 -q
fi
if has golden; then
  stamp golden; timeout 150 node $EXP golden . $OUT/golden.json
  stamp "eval heldout.py P=8, webgpu then cpu"
  timeout 90 node $CLI eval --text-file fixtures/default-model/heldout.py --parallel 8 --json --device webgpu
  timeout 90 node $CLI eval --text-file fixtures/default-model/heldout.py --parallel 8 --json
fi
if has gpubench; then
  stamp "bench 0.5b webgpu (builds the synthetic package)"
  timeout 420 node $CLI bench --synthetic 0.5b --parallel 1,2,4,8 --device webgpu --repeat 3 --json $OUT/bench-webgpu.json
fi
PKG=$(ls -d /tmp/pscache/synthetic/h896-l24-* 2>/dev/null | head -1)
if has forms && [ -n "$PKG" ]; then
  for f in ${FORMS:-nosplit t768 mlp down}; do stamp "decode form $f"; timeout 100 node $EXP decode $PKG $f 1 8; done
  stamp "decode default form, 16 spinning threads"; PARSCALE_WEBGPU_OPTIONS='{"threads":16}' timeout 100 node $EXP decode $PKG t1536 1 8
  stamp "decode default form, 256 pending dispatches"; PARSCALE_WEBGPU_OPTIONS='{"config":{"maxNumPendingDispatches":"256"}}' timeout 100 node $EXP decode $PKG t1536 1 8
  if has ortdefaults; then stamp "decode gemm, ORT's default provider settings"; PARSCALE_WEBGPU_OPTIONS='{"provider":{"validationMode":"basic"},"config":{"maxNumPendingDispatches":"16"}}' timeout 100 node $EXP decode $PKG default 1 8; fi
fi
if has profile && [ -n "$PKG" ]; then stamp profile; timeout 100 node $EXP profile $PKG $OUT/profile-p8.json 8 ${PROFILE_FORM:-}; fi
if has cpu16; then stamp "bench 0.5b cpu 16 threads"; timeout 240 node $CLI bench --synthetic 0.5b --parallel 1,2,4,8 --threads 16 --repeat 3 --json $OUT/bench-cpu16.json; fi
if has cpu2; then stamp "bench 0.5b cpu 2 threads"; timeout 300 node $CLI bench --synthetic 0.5b --parallel 1,2,4,8 --threads 2 --repeat 1 --no-roofline --json $OUT/bench-cpu2.json; fi
stamp done
