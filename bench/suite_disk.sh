#!/usr/bin/env bash
# The test suite's peak disk use in pytest's temporary directory (README, tests/conftest.py's
# SUITE_PEAK_GB): runs ./scripts/test.sh (extra arguments go to pytest) and samples the size of
# the session's directory every 5 s; prints the peak and the largest entries at that moment.
#     bash bench/suite_disk.sh            # alone on the machine: the suite is also timed
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
root="${TMPDIR:-/tmp}/pytest-of-$(id -un)"
(
  peak=0
  while [ ! -e "$out/stop" ]; do
    d=$(readlink -f "$root/pytest-current" 2>/dev/null)
    if [ -n "$d" ] && [ -d "$d" ]; then
      mb=$(du -sm "$d" 2>/dev/null | cut -f1)
      if [ "${mb:-0}" -gt "$peak" ]; then
        peak=$mb
        { echo "peak ${peak} MB in $d"; du -sm "$d"/* 2>/dev/null | sort -rn | head -5; } > "$out/peak"
      fi
    fi
    sleep 5
  done
) &
bash scripts/test.sh "$@"
status=$?
touch "$out/stop"
wait
cat "$out/peak" 2>/dev/null || echo "no pytest directory seen under $root"
rm -rf "$out"
exit $status
