#!/usr/bin/env bash
# `maturin ARGS...` with the native core optimised by the committed profile
# (pgo/kvmpy.profdata, made by pgo/profile.sh), where this rustc's LLVM can read it: the
# same major version that made it. Elsewhere it builds without the profile, and says so.
#
#   bash pgo/build.sh develop --release          # into the active virtualenv
#   bash pgo/build.sh build --release --out dist # the wheel
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MATURIN=${MATURIN:-maturin}
want=$(cat "$here/llvm-version" 2>/dev/null || true)
have=$(rustc -vV | sed -n 's/^LLVM version: //p')
if [ -f "$here/kvmpy.profdata" ] && [ -n "$want" ] && [ "${want%%.*}" = "${have%%.*}" ]; then
    export RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$here/kvmpy.profdata"
    echo "pgo: building with $here/kvmpy.profdata" >&2
else
    echo "pgo: the profile is for LLVM ${want:-?}, rustc has LLVM $have: building without it" >&2
fi
exec "$MATURIN" "$@"
