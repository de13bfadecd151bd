#!/usr/bin/env bash
# gpt-oss's expert (tests/test_gpt_oss.py). .ci/run calls this last, with its sanitizer environment still set:
# 1. when LD_PRELOAD is set (the library built with ASan + UBSan first on PYTHONPATH), the library-only tests of
#    the clamped activation, biases and gpt-oss layouts run there; a sanitizer report fails the step;
# 2. then, on the installed package, the comparisons with the real third-party code, which skip without it:
#    transformers' GptOssExperts (forward and grads), its MXFP4 dequantization (the blocks' orientation) and
#    PEFT's ParamWrapper on a tiny GptOssForCausalLM (the adapter round trip). transformers 5.24.0 and peft 0.21.2
#    are installed for them (pinned, on top of the CPU torch .ci/run installed; the package never needs them).
# About 2 minutes here (downloads included).
set -euo pipefail
cd "$(dirname "$0")/../.."
integrations="transformers or peft or mxfp4_orientation"
if [[ -n "${LD_PRELOAD:-}" ]]; then
  log="$(mktemp)"
  set +e
  python -m pytest -q -p no:cacheprovider --capture=sys tests/test_gpt_oss.py -k "not ($integrations)" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: UndefinedBehaviorSanitizer" "$log"; then
    echo "CI: sanitizer report above (gpt-oss)" >&2; exit 1
  fi
  [[ "$status" == 0 ]] || exit "$status"
fi
unset LD_PRELOAD PYTHONPATH
pip install -q "transformers==5.24.0" "peft==0.21.2"
python -m pytest -q -p no:cacheprovider tests/test_gpt_oss.py -k "$integrations" -rs
