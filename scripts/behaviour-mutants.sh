#!/usr/bin/env bash
# Behaviour mutants (issue 24): `bash scripts/mutation.sh --behaviour [PATCH...]` runs this.
#
# Each tests/mutants/<module>-<slug>.patch is a small hand-written bug (1-5 lines) that breaks a promise of the README,
# docs/*.md or --help; its header names the promise and the test files expected to kill it:
#   # promise: <the promise it breaks>
#   # tests: tests/test_x.py tests/test_cli_y.py
# For each patch: reset a scratch copy of the package, apply the patch (patch -p1), run the fast suite's listed files
# first and, if they pass, the rest of it (-m "not vm" -x: the first failure is enough). A mutant is killed when a
# test fails, survived when the whole fast suite passes. Ends with "N killed, M survived"; exits non-zero when any
# survived or a patch does not apply.
#
# QINST_BEHAVIOUR_JOBS (default 2): mutants judged at once, each in its own copy. QINST_BEHAVIOUR_DIR: the scratch
# folder (default .mutation-behaviour). QINST_BEHAVIOUR_TIMEOUT: seconds per pytest run (default 900; a mutant that
# hangs past it counts as killed, and is named so). QINST_BEHAVIOUR_LISTED_ONLY=1: only the listed files (a quick look
# while writing tests: a survivor there may still be killed by the rest of the suite).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=$repo/.venv/bin/python
jobs=${QINST_BEHAVIOUR_JOBS:-2}
work=${QINST_BEHAVIOUR_DIR:-$repo/.mutation-behaviour}
limit=${QINST_BEHAVIOUR_TIMEOUT:-900}

if [ "$#" -gt 0 ]; then
  patches=("$@")
else
  patches=("$repo"/tests/mutants/*.patch)
fi
[ -e "${patches[0]}" ] || { echo "behaviour: no patches in tests/mutants/" >&2; exit 2; }
for i in "${!patches[@]}"; do patches[i]=$(realpath "${patches[i]}"); done

rm -rf "$work"
mkdir -p "$work/base" "$work/results" "$work/logs"
# The whole tree the tests read (docs, README, scripts, bench), the virtualenv linked (the JUnit schema and the npm
# tools live under .venv); not .git, caches or earlier mutation runs.
for entry in * .[!.]*; do
  case $entry in .git | .venv | .mutation* | .*cache | .hypothesis | *.egg-info) ;; *) cp -r "$entry" "$work/base/" ;; esac
done
ln -s "$repo/.venv" "$work/base/.venv"
find "$work/base" -name __pycache__ -prune -exec rm -rf {} +
printf '%s\n' "${patches[@]}" >"$work/queue"
echo 0 >"$work/next"

# The pytest run of one stage in a slot: the slot's own package first on sys.path, in its subprocesses too (the real
# `qinst` the CLI tests start imports qemu_instances from PYTHONPATH before the installed one).
run_tests() {  # SLOT LOG ARGS...
  local slot=$1 log=$2
  shift 2
  (cd "$slot" && PYTHONPATH=$slot timeout -k 10 "$limit" "$python" -m pytest -m "not vm" -x -q -p no:cacheprovider \
    "$@" >>"$log" 2>&1)
}

judge() {  # SLOT PATCH -> one line in results/
  local slot=$1 patch=$2 name log listed=() rest=() rc verdict started
  name=$(basename "$patch" .patch)
  log=$work/logs/$name.log
  started=$(date +%s)
  rm -rf "$slot/qemu_instances" && cp -r "$work/base/qemu_instances" "$slot/"
  if ! patch -p1 --batch --forward --silent -d "$slot" <"$patch" >"$log" 2>&1; then
    echo "does-not-apply $name 0 -" >"$work/results/$name"
    return
  fi
  read -r -a listed <<<"$(sed -n 's/^# tests: *//p' "$patch" | head -n 1)"
  local existing=()
  for t in "${listed[@]}"; do [ -f "$slot/$t" ] && existing+=("$t") && rest+=("--ignore=$t"); done
  rc=5
  if [ "${#existing[@]}" -gt 0 ]; then
    run_tests "$slot" "$log" "${existing[@]}" && rc=0 || rc=$?
  fi
  local by="${existing[*]:-}"
  if { [ "$rc" = 0 ] || [ "$rc" = 5 ]; } && [ -z "${QINST_BEHAVIOUR_LISTED_ONLY:-}" ]; then  # the listed files passed (or there were none): the rest of the suite
    run_tests "$slot" "$log" tests "${rest[@]}" && rc=0 || rc=$?
    by="the rest of the fast suite"
  fi
  case $rc in
    0) verdict=survived ;;
    5) verdict=survived by="no test ran: the listed files hold only vm tests (or none exist)" ;;  # LISTED_ONLY
    124 | 137) verdict=killed by="timeout after ${limit} s" ;;
    *) verdict=killed ;;
  esac
  local failed
  failed=$(grep -m1 -E '^(FAILED|ERROR) ' "$log" | cut -d' ' -f2 || true)
  echo "$verdict $name $(($(date +%s) - started)) ${failed:-$by}" >"$work/results/$name"
}

worker() {  # SLOT: takes the next patch from the queue until it is empty
  local slot=$work/slot$1 index patch
  cp -r "$work/base" "$slot"
  while true; do
    index=$(flock "$work/next" bash -c 'n=$(cat "$1"); echo $((n + 1)) >"$1"; echo "$n"' _ "$work/next")
    patch=$(sed -n "$((index + 1))p" "$work/queue")
    [ -n "$patch" ] || break
    judge "$slot" "$patch"
    sed 's/^\([^ ]*\) \([^ ]*\) \([^ ]*\) \(.*\)$/\1  \2  (\3 s; \4)/' "$work/results/$(basename "$patch" .patch)"
  done
}

started=$(date +%s)
pids=()
for j in $(seq 1 "$jobs"); do
  worker "$j" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

count() { awk -v v="$1" '$1 == v' "$work"/results/* | wc -l; }  # (grep would fail the script on no match)
killed=$(count killed)
survived=$(count survived)
broken=$(count does-not-apply)
echo
for f in "$work"/results/*; do
  read -r verdict name _ <"$f"
  [ "$verdict" = killed ] || echo "$verdict: $name  (log: $work/logs/$name.log)"
done
echo "$killed killed, $survived survived$([ "$broken" = 0 ] || echo ", $broken not applied")"
echo "behaviour: $(($(date +%s) - started)) s for ${#patches[@]} mutants ($jobs at once); logs in $work/logs" >&2
[ "$survived" = 0 ] && [ "$broken" = 0 ]
