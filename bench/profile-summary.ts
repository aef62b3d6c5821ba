// `node dist/bench/profile-summary.js PROFILE.json [...]`: where a step's time goes, from an
// ONNX Runtime profile written by `parscale bench --profile PREFIX` (bench prints the same
// summary itself): kernel time per operator for the median run of each number of tokens fed
// (GPU time on WebGPU; core/bench/profile-summary.ts).
import {describeProfile, summarizeProfile} from '../src/core/bench/profile-summary.js'

for (const file of process.argv.slice(2)) console.log(['', ...describeProfile(summarizeProfile(file))].join('\n'))
