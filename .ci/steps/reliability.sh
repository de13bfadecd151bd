#!/usr/bin/env bash
# CI: the reliability checks of README "Reliability", bounded (about 10 minutes on 2 cores, half of it
# building the two sanitized libraries):
#  1. the library built with clang under ASan + UBSan with libFuzzer coverage and the allocation-failure hook
#     (one build serves the fuzzers, the allocation sweep and the leak-checked soak);
#  2. each libFuzzer harness for FUZZ_SECONDS from its seed corpus, and the Python file readers with atheris
#     (or, if atheris cannot be installed, the mutation loop in fuzz/loaders.py);
#  3. the allocation-failure sweep (LeakSanitizer on);
#  4. the soak, short: leak-checked under ASan, and SOAK_CYCLES create/destroy cycles + SOAK_SECONDS of random
#     calls against the installed package (.ci/run installed it), where the resident set means something;
#  5. the threads stress program built with ThreadSanitizer (gcc).
# Installs clang (+ libclang-rt-dev for libFuzzer) with apt when missing, atheris with pip.
set -euo pipefail
unset LD_PRELOAD PYTHONPATH  # the sanitized-Python step of .ci/run sets them for itself
cd "$(dirname "$0")/../.."
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
SOAK_CYCLES="${SOAK_CYCLES:-10000}"
SOAK_SECONDS="${SOAK_SECONDS:-20}"
STRESS_ITERATIONS="${STRESS_ITERATIONS:-10}"
build="${RELIABILITY_BUILD:-build/reliability}"
jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
    clang++ -x c++ -fsanitize=fuzzer,address,undefined - -o /dev/null 2>/dev/null; then
  apt-get update -qq && apt-get install -y -qq clang libclang-rt-dev || apt-get install -y -qq clang
fi
command -v cmake >/dev/null || pip install -q cmake

# 1. clang + ASan + UBSan + libFuzzer coverage + fault injection
cmake -S . -B "$build/asan" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOE_SFT_SANITIZE=address,undefined,fuzzer-no-link -DMOE_SFT_ASSERTS=ON -DMOE_SFT_FAULT_INJECTION=ON \
  -DMOE_SFT_RELIABILITY=ON >/dev/null
cmake --build "$build/asan" -j "$jobs" >/dev/null
# The library's own operator new (fault injection) allocates with malloc; memory libstdc++ frees with its
# delete (a std::thread's state) is then a "mismatch" that is none.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:alloc_dealloc_mismatch=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

# 2. fuzzing: each harness from a scratch copy of its seed corpus (the repository's stays as it is)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for target in create layer_calls route quantize; do
  mkdir -p "$work/$target"
  "$build/asan/fuzz/fuzz_$target" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="$work/crash-$target-" "$work/$target" "fuzz/corpus/$target" 2>"$work/$target.log" ||
    { tail -n 60 "$work/$target.log" >&2; echo "CI: fuzz_$target found a crash (input in the log above)" >&2; exit 1; }
  echo "fuzz_$target: $(grep -E '^#[0-9]+.*DONE' "$work/$target.log" | tail -n 1)"
done
if pip install -q atheris 2>/dev/null || CC=clang CXX=clang++ pip install -q atheris 2>/dev/null; then
  mkdir -p "$work/loaders"
  python fuzz/loaders.py "$work/loaders" fuzz/corpus/loaders -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 \
    -artifact_prefix="$work/crash-loaders-" 2>"$work/loaders.log" ||
    { tail -n 60 "$work/loaders.log" >&2; echo "CI: the loaders fuzzer found a crash" >&2; exit 1; }
  echo "loaders (atheris): $(grep -E '^#[0-9]+.*DONE' "$work/loaders.log" | tail -n 1)"
else
  python fuzz/loaders.py --no-atheris fuzz/corpus/loaders "$FUZZ_SECONDS"
fi

# 3. every allocation site
"$build/asan/tests/reliability/alloc_sweep"
# 4. soak, short: leak-checked under ASan; the resident-set figure from the installed (unsanitized) package
"$build/asan/tests/reliability/soak" 500 "$SOAK_SECONDS"
c++ -O2 -std=c++17 -pthread tests/reliability/soak.cc $(python -m moe_sft --cflags --libs) -o "$work/soak"
"$work/soak" "$SOAK_CYCLES" "$SOAK_SECONDS"

# 5. ThreadSanitizer
cmake -S . -B "$build/tsan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SFT_SANITIZE=thread -DMOE_SFT_RELIABILITY=ON \
  >/dev/null
cmake --build "$build/tsan" -j "$jobs" --target stress >/dev/null
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 "$build/tsan/tests/reliability/stress" "$STRESS_ITERATIONS"
echo "CI: reliability checks passed"
