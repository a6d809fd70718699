#!/usr/bin/env bash
# Regenerates pgo/kvmpy.profdata, the profile the release build of the native core is
# optimised with (pgo/build.sh): an instrumented build runs the benchmarks' workloads
# (every figure of `python -m benchmarks`, and the in-process fuzzer), then the counts are
# merged. Needs /dev/kvm and the llvm-profdata of rustc's own LLVM
# (`rustup component add llvm-tools`). Run it after changing the run loop or the
# handler path: functions changed since the profile lose its guidance (they are built
# as without it), nothing else.
#
#   bash pgo/profile.sh            # with .venv (make dev first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MATURIN=${MATURIN:-.venv/bin/maturin}

profdata=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)
if [ -z "$profdata" ]; then
    echo "pgo: llvm-profdata of rustc's LLVM not found: rustup component add llvm-tools" >&2
    exit 1
fi

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
echo "pgo: instrumented build"
RUSTFLAGS="-Cprofile-generate=$raw" "$MATURIN" develop -q --release
rm -f "$raw"/*.profraw # the build's own (build scripts, proc macros)

echo "pgo: workload"
make -s -C guests
"$PY" -m benchmarks --reps 5 --json "$raw/bench.json" >/dev/null
"$PY" -m benchmarks.fuzz_engine --reps 3 >/dev/null

# --sparse leaves out what the workload never ran: those functions are built as without
# a profile, not as code never run (which LLVM would optimise for size).
"$profdata" merge --sparse -o pgo/kvmpy.profdata "$raw"/*.profraw
rustc -vV | sed -n 's/^LLVM version: //p' >pgo/llvm-version
echo "pgo: wrote pgo/kvmpy.profdata ($(wc -c <pgo/kvmpy.profdata) bytes, LLVM $(cat pgo/llvm-version))"

echo "pgo: optimised build"
MATURIN="$MATURIN" bash pgo/build.sh develop -q --release
