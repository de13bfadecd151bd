#!/usr/bin/env bash
# gpt-oss against the real third-party code: transformers' GptOssExperts (forward and grads), its MXFP4
# dequantization (the blocks' orientation) and PEFT's ParamWrapper on a tiny GptOssForCausalLM (the adapter round
# trip). tests/test_gpt_oss.py skips these without transformers and peft, which the package never needs; here
# they are installed (pinned, on top of the CPU torch .ci/run installed) and those tests run on the installed
# package, outside the sanitizer environment .ci/run may have set. About 2 minutes (downloads included).
set -euo pipefail
cd "$(dirname "$0")/../.."
unset LD_PRELOAD PYTHONPATH
pip install -q "transformers==5.24.0" "peft==0.21.2"
python -m pytest -q -p no:cacheprovider tests/test_gpt_oss.py -k "transformers or peft or mxfp4_orientation" -rs
