#!/bin/sh
# Packs the CLI for the GPU machine (no Node there): esbuild bundles of the CLI and the bench
# worker, with onnxruntime-node left out (carried separately as a tarball with its binary).
# Usage: bench/gpu-machine/pack.sh OUT_DIR   (OUT_DIR inside a checkout's ignored .carry/)
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
version=$(node -p "require('./package.json').version")
cat > "$out/x/y/package.json" <<JSON
{"name": "parscale", "version": "$version", "type": "module",
 "oclif": {"bin": "parscale", "dirname": "parscale", "topicSeparator": " ",
           "commands": {"strategy": "explicit", "target": "./cli.js", "identifier": "COMMANDS"}}}
JSON
echo "{\"version\": \"$version\"}" > "$out/../package.json"
