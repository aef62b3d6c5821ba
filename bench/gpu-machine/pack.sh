#!/bin/sh
# Packs the CLI for the GPU machine (no Node there): esbuild bundles of the CLI and the bench
# worker, with onnxruntime-node left out (carried separately as a tarball with its binary).
# Usage: bench/gpu-machine/pack.sh OUT_DIR   (OUT_DIR inside a checkout's ignored .carry/)
# Also downloads into .gl/ (ignored; carried) the Debian packages the NVIDIA Vulkan ICD needs on a
# machine that has only the driver: libGLX_nvidia loads libGLdispatch (libglvnd0) and X11/xcb;
# last session carried only libvulkan1 + libglvnd0 and the loader said "Found no drivers".
# Layout: OUT_DIR/x/y/{cli.js,worker.js,package.json}: four levels below the checkout's root,
# where the bundle's relative paths to fixtures/ and (one level up from OUT_DIR) package.json
# resolve as they do from dist/src/core/.
set -e
out=${1:?OUT_DIR}
esbuild=${ESBUILD:-/tmp/esb/node_modules/.bin/esbuild}
mkdir -p "$out/x/y"
common="--bundle --platform=node --format=esm --target=node20 --log-level=warning --external:onnxruntime-node --external:onnxruntime-common --alias:sharp=./bench/gpu-machine/stub.js --alias:onnxruntime-web=./bench/gpu-machine/stub.js"
banner="import {createRequire as __createRequire} from 'node:module'; const require = __createRequire(import.meta.url);"
$esbuild bench/gpu-machine/cli.ts $common --banner:js="$banner" --outfile="$out/x/y/cli.js"
$esbuild src/core/bench/worker.ts $common --banner:js="$banner" --outfile="$out/x/y/worker.js"
$esbuild bench/gpu-machine/experiments.ts $common --banner:js="$banner" --outfile="$out/x/y/experiments.js"
$esbuild bench/gpu-form-decode.ts $common --banner:js="$banner" --outfile="$out/x/y/gpu-form.js"
$esbuild bench/gpu-form-memory.ts $common --banner:js="$banner" --outfile="$out/x/y/gpu-memory.js"
$esbuild test/helpers/gpu-long-call.ts $common --banner:js="$banner" --outfile="$out/x/y/long-call.js"
$esbuild bench/wgsl-decode.ts $common --banner:js="$banner" --outfile="$out/x/y/wgsl-decode.js"
$esbuild bench/wgsl-sweep.ts $common --banner:js="$banner" --outfile="$out/x/y/wgsl-sweep.js"
$esbuild bench/wgsl-golden.ts $common --banner:js="$banner" --outfile="$out/x/y/wgsl-golden.js"
version=$(node -p "require('./package.json').version")
cat > "$out/x/y/package.json" <<JSON
{"name": "parscale", "version": "$version", "type": "module",
 "oclif": {"bin": "parscale", "dirname": "parscale", "topicSeparator": " ",
           "commands": {"strategy": "explicit", "target": "./cli.js", "identifier": "COMMANDS"}}}
JSON
echo "{\"version\": \"$version\"}" > "$out/../package.json"

# The GL/Vulkan user space for the NVIDIA ICD, with every dependency of the set inside it (but
# libc6 and Mesa's own drivers, which the NVIDIA ICD does not load); checked with apt-cache.
GL_PACKAGES="libvulkan1 libglvnd0 libgl1 libglx0 libegl1 libx11-6 libx11-data libx11-xcb1 libxext6 libxcb1 libxau6 libxdmcp6 libbsd0 libmd0 libwayland-client0 libffi8"
rm -rf .gl && mkdir -p .gl && (cd .gl && apt-get download $GL_PACKAGES >/dev/null)
missing=$(for p in $GL_PACKAGES; do apt-cache depends "$p" | awk '/ Depends:/{print $2}'; done | sort -u |
  grep -v -x -e libc6 -e libglx-mesa0 -e libegl-mesa0 -e '<.*>' | while read -r d; do case " $GL_PACKAGES " in *" $d "*) ;; *) echo "$d";; esac; done)
[ -z "$missing" ] || { echo "pack.sh: the NVIDIA ICD's libraries need more packages: $missing" >&2; exit 1; }
(cd "$out" && tar cJf bundle.tar.xz x && rm -rf x)
# Node and onnxruntime-node's binary (the GPU machine has neither), xz-compressed: the carry limit counts the repo too
carry=$(dirname "$out")
[ -f "$carry/node.xz" ] || xz -T0 -6 -c "$(command -v node)" > "$carry/node.xz"
[ -f "$carry/ort-node.txz" ] || tar cJf "$carry/ort-node.txz" -C node_modules/onnxruntime-node dist lib package.json bin/napi-v6/linux/x64
tar czf "$out/ort-common.tgz" -C node_modules onnxruntime-common
# Dawn's webgpu package for the hand-written kernels (bench/wgsl-decode.ts), when installed beside: DAWN=<node_modules>
if [ -n "${DAWN:-}" ]; then
  rm -rf /tmp/dawn-pack && mkdir -p /tmp/dawn-pack/webgpu/dist/linux-x64
  cp "$DAWN/webgpu/index.js" "$DAWN/webgpu/package.json" /tmp/dawn-pack/webgpu/
  strip -o /tmp/dawn-pack/webgpu/dist/linux-x64/dawn.node "$DAWN/webgpu/dist/linux-x64/dawn.node"
  tar cf - -C /tmp/dawn-pack webgpu | xz -9e -T0 > "$carry/dawn.txz"
fi
# what a GPU call carries (not the training corpus, which its own calls carry): the bundle, node, the two runtimes, .gl, the repo
carried="$out $carry/node.xz $carry/ort-node.txz $carry/package.json .gl"
[ -f "$carry/dawn.txz" ] && carried="$carried $carry/dawn.txz"
total=$(( $(du -scb $carried | tail -1 | cut -f1) + $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) ))
echo "carry: $carried + the repo = $((total / 1048576)) MiB (limit 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "pack.sh: the carry is over 64 MiB" >&2; exit 1; }
