# Shared by the launchers (sourced, not run): printing or running commands, and the --resume rule.
#
# A launcher builds every command as a bash array and hands it to `step`; with DRY_RUN=1 the command is only
# printed (shell-quoted, so it can be pasted), otherwise it is printed and run. Nothing else in a launcher may
# touch the machine, a cluster or the network, so `--dry-run` touches nothing.

DRY_RUN=${DRY_RUN:-0}

# `quoted WORD...`: the words as one shell-safe line
quoted() {
  local out="" word
  for word in "$@"; do out+="$(printf '%q' "$word") "; done
  printf '%s' "${out% }"
}

# `step WORD...`: print the command (prefixed "+ "), and run it unless this is a dry run
step() {
  printf '+ %s\n' "$(quoted "$@")"
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

# `note TEXT`: a line for the reader (to stderr, so a dry run's stdout is only the commands)
note() { printf '# %s\n' "$*" >&2; }

die() { printf '%s: error: %s (see --help)\n' "$(basename "$0")" "$*" >&2; exit 2; }

# The persguard workflows that continue a run with --resume (persguard_jax/workflows: every one whose
# `resumable` is true; tests/test_launch.py checks this list against the registry).
RESUMABLE_WORKFLOWS=(personalize implant protect diagnose pretrain train-clip)

# `with_resume WORD...` sets the array RESUMED: the command, plus --resume when it is `persguard WORKFLOW ...` of
# a resumable workflow given neither --resume nor --overwrite. Re-running a launch line after a preemption then
# continues the run (a missing or empty --out with --resume simply starts it).
with_resume() {
  RESUMED=("$@")
  local prog=${1##*/} sub=${2:-} word w
  [[ "$prog" == persguard ]] || return 0
  for word in "$@"; do [[ "$word" == --resume || "$word" == --overwrite ]] && return 0; done
  for w in "${RESUMABLE_WORKFLOWS[@]}"; do
    if [[ "$sub" == "$w" ]]; then
      RESUMED=("$@" --resume)
      note "added --resume: re-running this line after a preemption continues the run"
      return 0
    fi
  done
}
