#!/usr/bin/env bash
# Several experiments side by side on one GPU machine, each with its own output folder, log and exit status, and
# each folder packed into one file (a run brings back only a few files).
#
#   . bench/gpu-prelude.sh          # first, in the calling shell: every job inherits its PYTHONPATH
#   bench/parallel.sh OUT SECONDS NAME 'COMMAND' [NAME 'COMMAND' ...]
#
# Each COMMAND runs under `timeout SECONDS` in bash with $JOB_OUT set to a fresh folder of its own (write results
# there); its output goes to $JOB_OUT/log.txt, and $JOB_OUT/status.txt gets its exit status and wall seconds. When
# all have ended, each folder becomes OUT/NAME.tgz. This script's own exit status is the number of failed jobs.
# Why a script: written inline, `setup && (job1) & (job2) &` backgrounds the whole `&&` list with job1, so job2
# starts before the setup has run (one GPU call of 2026-12-02 lost four of its five jobs that way).
set -u
if [ $# -lt 4 ] || [ $(( ($# - 2) % 2 )) -ne 0 ]; then
  echo "usage: bench/parallel.sh OUT SECONDS NAME 'COMMAND' [NAME 'COMMAND' ...]" >&2
  exit 2
fi
out=$1 seconds=$2
shift 2
case $seconds in ''|*[!0-9]*) echo "bench/parallel.sh: SECONDS must be a whole number, not '$seconds'" >&2; exit 2;; esac
mkdir -p "$out"
work=$(mktemp -d)
names=()
while [ $# -gt 0 ]; do
  name=$1 command=$2
  shift 2
  case $name in ''|*[!A-Za-z0-9_-]*) echo "bench/parallel.sh: a job name is letters, digits, _ and -: '$name'" >&2; exit 2;; esac
  mkdir -p "$work/$name"
  names+=("$name")
  (
    start=$(date +%s)
    JOB_OUT="$work/$name" timeout "$seconds" bash -c "$command" > "$work/$name/log.txt" 2>&1
    rc=$?
    echo "rc=$rc wall_s=$(( $(date +%s) - start ))" > "$work/$name/status.txt"
  ) &
done
wait
failed=0
for name in "${names[@]}"; do
  tar czf "$out/$name.tgz" -C "$work" "$name"
  echo "$name: $(cat "$work/$name/status.txt")"
  grep -q '^rc=0 ' "$work/$name/status.txt" || failed=$((failed + 1))
done
rm -rf "$work"
exit "$failed"
