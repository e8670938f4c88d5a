#!/usr/bin/env bash
# The C tracer's unit suite (tests/tracer_harness.py) under AddressSanitizer.
#
#   scripts/asan.sh [VERSION ...]        default: 3.11 3.12 (one settrace, one sys.monitoring build)
#
# For each CPython VERSION (found as $PYENV_ROOT/versions/VERSION.*/bin/python, or pythonVERSION
# on PATH) it compiles hunter_attach/_tracer.c with -fsanitize=address against that
# interpreter's headers and runs the harness with libasan preloaded (the interpreter itself is not
# instrumented) and PYTHONMALLOC=malloc, so that Python objects live in ASan-checked memory too.
# Leak checking is off: CPython does not free everything at exit.
#
# Exit status: 0 when every harness test passed and ASan reported nothing; 1 otherwise. Logs,
# the instrumented builds and the harness output stay in $ASAN_OUT (default: a new /tmp dir).
# See docs/asan.md.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CC=${CC:-gcc}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
OUT=${ASAN_OUT:-$(mktemp -d /tmp/ha-asan.XXXXXX)}
SOURCE=${ASAN_SOURCE:-$ROOT/hunter_attach/_tracer.c}  # another file: to check the setup itself
mkdir -p "$OUT"
SKIP=${ASAN_SKIP:-}

LIBASAN=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "asan: $CC has no libasan.so (install libasan, or set CC=clang)" >&2
    exit 1
fi

find_python() {
    local v=$1 p
    for p in "$PYENV_ROOT"/versions/"$v".*/bin/python; do
        if [ -x "$p" ]; then echo "$p"; return 0; fi
    done
    command -v "python$v" 2>/dev/null
}

versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(3.11 3.12)
status=0
for v in "${versions[@]}"; do
    py=$(find_python "$v") || true
    if [ -z "$py" ]; then
        echo "asan: no CPython $v found" >&2
        status=1
        continue
    fi
    include=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    suffix=$("$py" -c 'import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])')
    so="$OUT/_tracer$suffix"
    echo "== CPython $v ($py)"
    if ! "$CC" -shared -fPIC -O1 -g -fsanitize=address -fno-omit-frame-pointer \
            -I "$include" "$SOURCE" -o "$so" -lpthread; then
        echo "asan: build failed for $v" >&2
        status=1
        continue
    fi
    log="$OUT/asan-$v"
    rm -f "$log".*
    started=$(date +%s)
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$log" \
        LD_PRELOAD="$LIBASAN" PYTHONMALLOC=malloc HA_HARNESS_TEST_TIMEOUT=60 \
        timeout 600 "$py" "$ROOT/tests/tracer_harness.py" "$so" "$ROOT/hunter_attach" \
        --skip "$SKIP" >"$OUT/results-$v.jsonl" 2>"$OUT/stderr-$v.txt"
    rc=$?
    elapsed=$(( $(date +%s) - started ))
    summary=$("$py" - "$OUT/results-$v.jsonl" <<'EOF'
import json, sys
ok = failed = 0
done = False
names = []
for line in open(sys.argv[1]):
    try:
        record = json.loads(line)
    except ValueError:
        continue
    if record.get("done"):
        done = True
    elif "test" in record:
        if record["ok"]:
            ok += 1
        else:
            failed += 1
            names.append(record["test"])
print("%d passed, %d failed%s%s" % (ok, failed, "" if done else ", INCOMPLETE",
                                    (" (" + ", ".join(names) + ")") if names else ""))
sys.exit(0 if done and not failed else 1)
EOF
)
    tests_rc=$?
    reports=$(ls "$log".* 2>/dev/null | wc -l)
    echo "   harness exit $rc, ${elapsed}s: $summary; ASan reports: $reports"
    if [ "$reports" -ne 0 ]; then
        for f in "$log".*; do
            grep -m1 -E "ERROR: AddressSanitizer" "$f" | sed 's/^/   /'
            grep -m8 -E "^    #[0-9]+ " "$f" | sed 's/^/   /'
        done
        status=1
    fi
    if [ "$rc" -ne 0 ] || [ "$tests_rc" -ne 0 ]; then
        tail -n 30 "$OUT/stderr-$v.txt" | sed 's/^/   stderr: /'
        status=1
    fi
done
echo "asan: logs in $OUT"
exit $status
