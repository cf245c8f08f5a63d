#!/usr/bin/env bash
# `make ci-fresh`: what CI does, on a fresh clone of HEAD in a temporary folder (with
# ../shared beside it, as CI has it), then the clone is removed. Each clone holds a 6.5 GB
# venv; CI runs on the same disk, so a clone left behind can starve CI's own `make setup`.
# The log stays in reports/ci-fresh.log; KEEP=1 keeps the clone.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mkdir -p reports
log="$root/reports/ci-fresh.log"
dir=$(mktemp -d /tmp/captioner-ci.XXXXXX)
cleanup() { [ "${KEEP:-0}" = 1 ] && echo "ci-fresh: clone kept in $dir" || rm -rf "$dir"; }
trap cleanup EXIT
git clone -q "$root" "$dir/main"
[ -d "$root/../shared" ] && cp -r "$root/../shared" "$dir/shared"
echo "ci-fresh: $(git rev-parse --short HEAD) in $dir, log $log" | tee "$log"
start=$(date +%s)
(cd "$dir/main" && CI=true bash .ci/run) 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
echo "ci-fresh: rc $rc after $(( $(date +%s) - start )) s" | tee -a "$log"
exit "$rc"
