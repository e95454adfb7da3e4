#!/usr/bin/env bash
# The lead's GPU verification in one call of the lent machine: the whole suite with GPU
# tests active (make test-all), compute-sanitizer on a Numba lesson, one Nsight Compute
# profile. Logs go to $OUT (default ./gpu_check_out).
set -uo pipefail
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
smi() { nvidia-smi --query-gpu=name,temperature.gpu,power.draw,clocks.sm --format=csv,noheader | tee -a "$OUT/smi.txt"; }
smi
if command -v make >/dev/null; then MK="make"; else echo "no make on this machine"; MK=""; fi
if [ -n "$MK" ]; then
  timeout ${TEST_LIMIT:-380} make test-all PYTHON=python3 JOBS=${JOBS:-6} PYTEST_ARGS="-q -p no:cacheprovider" > "$OUT/test_all.log" 2>&1
else
  timeout ${TEST_LIMIT:-380} python3 -m pytest -n ${JOBS:-6} -q -p no:cacheprovider > "$OUT/test_all.log" 2>&1
fi
echo "test-all exit: $?" | tee -a "$OUT/test_all.log"
grep -E "passed|failed|error" "$OUT/test_all.log" | tail -15
smi
timeout ${SAN_LIMIT:-100} python3 scripts/sanitize.py --lesson ${SANITIZE:-04} > "$OUT/sanitize.log" 2>&1; echo "sanitize exit: $?" | tee -a "$OUT/sanitize.log"
grep -E "clean|error|SUMMARY" "$OUT/sanitize.log" | tail -8
timeout ${PROF_LIMIT:-70} python3 scripts/profile.py --lesson ${PROFILE:-04} > "$OUT/profile.log" 2>&1; echo "profile exit: $?" | tee -a "$OUT/profile.log"
grep -E "Throughput|Bank|Occupancy|Registers|Duration" "$OUT/profile.log" | head -20
smi
