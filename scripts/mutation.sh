#!/usr/bin/env bash
# Mutation testing of the code that carries qinst's security and data-safety claims (issue 16), with mutmut 3.
# Not part of every CI run: it takes ~21 minutes on a quiet 2-core machine (3 workers; see README). Usage: bash scripts/mutation.sh [--keep|--report|--recheck|--behaviour [PATCH...]]
#
# Each target is MODULE:FUNCTIONS (FUNCTIONS: comma-separated globs of function names; Class.method for methods;
# * for the whole module). Host-key checking, known_hosts and the ssh options live in ssh.py; host.py is the only
# libvirt importer (base-volume upload, verification and its .verified marker); metadata read back from libvirt is
# validated by domain.py (parsing) and instances.py (validate_metadata; prune's in-use set). Catalog validation: catalog.py.
TARGETS=${QINST_MUTATION_TARGETS:-"digests.py:* download.py:*
 ssh.py:escape_percent,SshHop.from_uri,SshHop.proxy_command,SshHop.ssh_options,known_hosts_line,write_known_hosts,ssh_options,destination,ssh_argv,scan_host_keys,check_host_keys,check_host_keys_via,key_checker
 wait.py:host_keys,wait_for_ssh access.py:known_hosts_file,ssh_target
 sshkeys.py:parse_public_key,_check_key_body,_blob_fields,load_key_file,_read_public,generate_keypair,_make_private_dir,resolve_keys,_key_identity
 host.py:_hard_link,_send,Host.base_volume,Host._physical,Host._mark,Host._upload_claimed,Host._claim_token,Host._await_upload,Host._modified,Host.upload_volume,Host.volume_digest,Host.upload_alive
 images.py:ImageStore.prune,Cache.stale_temporaries,_locked instances.py:validate_metadata,prune
 domain.py:validate_name,Metadata.from_xml,metadata_from_domain_xml seed.py:validate_*,SeedSpec.__post_init__
 catalog.py:printable,http_url,_text,_display,_url,_format,_aliases,_digest,_aleph_hash,_user,_size,_keys,_entry,parse_catalog"}
# The fast tests that exercise those modules (no VM boot; libvirtd and an sshd on 127.0.0.1 for the base-volume,
# host-key and prune tests). mutmut runs, for each mutant, only the tests that cover its function (fastest first,
# stopping at the first failure), so each mutant is judged in seconds; tests that cover none of TARGETS are left
# out of the selection (its clean run and coverage run come first and cost minutes on a loaded machine).
TESTS=${QINST_MUTATION_TESTS:-"tests/test_digests.py tests/test_download.py tests/test_images.py tests/test_cli_pull.py
       tests/test_cli_prune.py tests/test_cli_images.py tests/test_catalog.py tests/test_sshkeys.py tests/test_seed.py
       tests/test_cli_seed.py tests/test_wait.py tests/test_ssh.py tests/test_access.py tests/test_domain.py
       tests/test_host.py tests/test_seals.py tests/test_launch.py tests/test_instances.py tests/test_proc.py
       tests/test_console.py"}
# (QINST_MUTATION_TARGETS / QINST_MUTATION_TESTS / QINST_MUTATION_DIR: a part of the run, e.g. host.py's targets with
# tests/test_host.py tests/test_instances.py, in a scratch directory of its own.)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

# --behaviour [PATCH...]: the hand-written behaviour mutants of tests/mutants/ (issue 24), each a 1-5 line change that
# breaks a documented promise; each must make the fast suite fail. See docs/testing.md ("Behaviour mutants").
if [ "${1:-}" = "--behaviour" ]; then
  shift
  exec bash "$repo/scripts/behaviour-mutants.sh" "$@"
fi
keep=0 report_only=0 recheck=0
[ "${1:-}" = "--keep" ] && keep=1
# --report: only compare the last run's results (kept with --keep) with tests/mutation-equivalent.txt again.
[ "${1:-}" = "--report" ] && keep=1 report_only=1
# --recheck: after adding tests (the code unchanged), run the last run's survivors again against the new tests.
[ "${1:-}" = "--recheck" ] && keep=1 recheck=1
mutmut=$repo/.venv/bin/mutmut
if [ ! -x "$mutmut" ]; then
  # mutmut 3.8 needs Python >= 3.10 and fork(); pinned so that the mutants (and their numbering) stay stable.
  "$repo/.venv/bin/pip" install -q "mutmut==3.8.1"  # also the [mutation] extra of pyproject.toml
fi

# mutmut writes mutants/ next to pyproject.toml: work on a scratch copy so the worktree stays untouched.
work=${QINST_MUTATION_DIR:-$repo/.mutation}
if [ "$recheck" = 1 ]; then
  for d in "$work" "$work/mutants"; do rm -rf "$d/tests" "$d/testsupport" && cp -r tests testsupport "$d"/; done
  find "$work" -name __pycache__ -prune -exec rm -rf {} +
elif [ "$report_only" = 0 ]; then
  rm -rf "$work"
  mkdir -p "$work"
  cp -r qemu_instances cloudinit_templates testsupport tests pyproject.toml "$work"/
  find "$work" -name __pycache__ -prune -exec rm -rf {} +
fi

patterns=()
only=()
for target in $TARGETS; do
  module=${target%%:*}
  only+=("\"qemu_instances/$module\"")
  IFS=, read -r -a functions <<<"${target#*:}"
  for fn in "${functions[@]}"; do
    if [ "$fn" = "*" ]; then
      patterns+=("qemu_instances.${module%.py}.*")
    elif [[ $fn == *.* ]]; then
      patterns+=("qemu_instances.${module%.py}.xǁ${fn%%.*}ǁ${fn#*.}__mutmut_*")
    else
      patterns+=("qemu_instances.${module%.py}.x_${fn}__mutmut_*")
    fi
  done
done
test_args=()
for t in $TESTS; do [ -f "$t" ] && test_args+=("\"$t\""); done
[ "$report_only" = 1 ] || [ "$recheck" = 1 ] || {
  echo
  echo "[tool.mutmut]"
  echo "source_paths = [\"qemu_instances\"]"
  echo "only_mutate = [$(IFS=,; echo "${only[*]}")]"
  echo "also_copy = [\"cloudinit_templates\", \"testsupport\"]"
  echo "pytest_add_cli_args_test_selection = [$(IFS=,; echo "${test_args[*]}")]"
  echo 'pytest_add_cli_args = ["-m", "not vm", "-x", "-p", "no:cacheprovider", "-q"]'
  echo 'timeout_multiplier = 5.0'  # a mutant that loops is judged in seconds, not minutes
  echo "use_git_change_detection = false"
  # Lines that only log (diagnostics on stderr) or only give an error's hint (advice after the message, not part of
  # the contract: the message, its key phrase and the exit code are) are not mutated.
  echo 'do_not_mutate_patterns = ["log\\.(debug|info|warning)\\(", "^\\s*hint=f?\""]'
} >>"$work/pyproject.toml"

cd "$work"
started=$(date +%s)
if [ "$recheck" = 1 ]; then
  mapfile -t patterns_run < <(grep -E ": (survived|no tests)$" "$work/results.txt" | sed 's/^ *//; s/: [a-z ]*$//')
  cp "$work/results.txt" "$work/results-before-recheck.txt"
else
  patterns_run=("${patterns[@]}")
fi
if [ "$report_only" = 0 ] && [ "${#patterns_run[@]}" -gt 0 ]; then
  "$mutmut" run --max-children "${QINST_MUTATION_JOBS:-3}" "${patterns_run[@]}" >"$work/run.log" 2>&1 || {
    tail -c 3000 "$work/run.log" >&2
    echo "mutation: mutmut run failed (log: $work/run.log)" >&2
    exit 1
  }
  "$mutmut" results --all true >"$work/results.txt"
fi

# Keep the selected mutants only (mutmut lists every function of the mutated files), then compare the survivors
# with the explained ones in tests/mutation-equivalent.txt ("<mutant name>  <why it cannot change behaviour>").
rc=0
python3 - "$work/results.txt" "$repo/tests/mutation-equivalent.txt" "${patterns[@]}" <<'EOF' || rc=$?
import fnmatch, sys
results, explained_file, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
status = {}
for line in open(results, encoding="utf-8"):
    name, _, verdict = line.strip().rpartition(": ")
    if name and any(fnmatch.fnmatch(name, p) for p in patterns):
        status[name] = verdict
explained = {}
try:
    for line in open(explained_file, encoding="utf-8"):
        if line.strip() and not line.startswith("#"):
            name, _, why = line.strip().partition(" ")
            explained[name] = why.strip()
except FileNotFoundError:
    pass
killed = sum(v in ("killed", "timeout", "caught by type check") for v in status.values())
survived = sorted(n for n, v in status.items() if v in ("survived", "no tests"))
other = sorted(f"{n} ({v})" for n, v in status.items() if v not in ("killed", "timeout", "caught by type check", "survived", "no tests"))
unexplained = [n for n in survived if n not in explained]
for n in unexplained:
    print(f"survived, unexplained: {n} ({status[n]})  -> mutmut show {n}")
for n in other:
    print(f"not judged: {n}")
stale = sorted(set(explained) - set(survived))
for n in stale:
    print(f"explained but not a survivor (now killed, or renamed): {n}")
print(f"{len(survived) - len(unexplained)} of {len(survived)} survivors explained in tests/mutation-equivalent.txt")
print(f"{killed} killed, {len(survived)} survived")
sys.exit(1 if unexplained or other else 0)
EOF
echo "mutation: $(( $(date +%s) - started )) s; mutants and logs in $work" >&2
[ "$keep" = 1 ] || [ "$rc" != 0 ] || rm -rf "$work/mutants"
exit $rc
