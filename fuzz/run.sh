#!/usr/bin/env bash
# Run every atheris harness in fuzz/ for a bounded time: bash fuzz/run.sh [SECONDS] [HARNESS...]
#
#   SECONDS   per harness (default 60)
#   HARNESS   names such as fuzz_codec (default: every fuzz/fuzz_*.py)
#
# Each harness starts from fuzz/corpus/<name>/ (seeded by fuzz/seeds.py, grown by the runs;
# keep it between runs, do not commit it) and stops at the first failure: an exception
# other than the parser's own error, a broken invariant, more than RSS_MB of memory, or one
# input taking more than 10 s. The failing input is written to fuzz/artifacts/ and its
# path printed; replay it with: python fuzz/<harness>.py fuzz/artifacts/crash-...
# Exit status: 0 when every harness ran its time clean, 1 otherwise.
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-60}"
shift || true
PYTHON="${PYTHON:-.venv/bin/python}"
RSS_MB="${RSS_MB:-1024}"

if ! "$PYTHON" -c "import atheris" 2>/dev/null; then
    echo "atheris is not installed: $PYTHON -m pip install atheris" >&2
    exit 2
fi

if [ "$#" -gt 0 ]; then
    harnesses=("$@")
else
    harnesses=()
    for file in fuzz/fuzz_*.py; do
        harnesses+=("$(basename "$file" .py)")
    done
fi

mkdir -p fuzz/artifacts
"$PYTHON" fuzz/seeds.py fuzz/corpus

status=0
for harness in "${harnesses[@]}"; do
    corpus="fuzz/corpus/${harness#fuzz_}"
    mkdir -p "$corpus"
    echo "== $harness: ${SECONDS_EACH}s, corpus $corpus"
    log="fuzz/artifacts/$harness.log"
    set +e
    "$PYTHON" "fuzz/$harness.py" "$corpus" \
        -max_total_time="$SECONDS_EACH" \
        -rss_limit_mb="$RSS_MB" \
        -malloc_limit_mb="$RSS_MB" \
        -timeout=10 \
        -max_len=8192 \
        -print_final_stats=1 \
        -artifact_prefix=fuzz/artifacts/"$harness"- >"$log" 2>&1
    rc=$?
    set -e
    grep -v '^#\|^"\|^INFO:\|^###\|^WARNING: Failed to find function' "$log" | tail -n 40 || true
    if [ "$rc" -ne 0 ]; then
        echo "== $harness FAILED (exit $rc; log $log, input in fuzz/artifacts/)" >&2
        status=1
    else
        echo "== $harness clean"
    fi
done
exit "$status"
