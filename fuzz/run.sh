#!/usr/bin/env bash
# Run fuzz targets one after another, each for SECONDS (default 300), in one process each.
#   fuzz/run.sh [SECONDS] [TARGET...]      (all targets when none is named)
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); on a stable toolchain the
# nightly-only flags cargo-fuzz passes are allowed with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    [ -d "seeds/$t" ] && cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
    echo "== $t: ${secs}s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
        >"logs/$t.log" 2>&1 && status=ok || status="FAILED (see logs/$t.log, artifacts/$t/)"
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo '?')
    echo "   $status, $execs executions"
done
