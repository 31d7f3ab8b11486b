#!/usr/bin/env bash
# Run one command on several machines over ssh, on JAX's own multi-host runtime (no scheduler needed).
#
#   launch/multinode.sh --hosts HOST[,HOST...] [--gpus-per-host G] [--port P] [--dir DIR] [--logs DIR]
#                       [--dry-run] -- COMMAND...
#
#   launch/multinode.sh --hosts gpu1,gpu2 --gpus-per-host 8 --dir /fs/persguard_jax -- \
#       persguard protect --model /fs/sd15 --images /fs/photos --method aspl --out /fs/runs/aspl
#
# Process i gets JAX_COORDINATOR_ADDRESS (the first host, --port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
# persguard_jax/train/distributed.py reads. Without --gpus-per-host: one process per host owning all its devices;
# with it: G processes per host, process g seeing only GPU g (CUDA_VISIBLE_DEVICES). Every host runs in --dir
# (default: this checkout's path; the same project and venv must be there, e.g. on a shared filesystem), with
# --dir/.venv/bin first on PATH. Process i logs to --logs/<stamp>/process-<i>.log on this machine; if one
# process fails the others are stopped, and the exit status is the first failure's. A `persguard WORKFLOW` that
# can resume gets --resume (unless it has --resume or --overwrite), so re-running the line continues the run.
#
# --dry-run prints every ssh command it would run and runs none.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

usage() {
  cat <<USAGE
usage: launch/multinode.sh --hosts HOST[,HOST...] [--gpus-per-host G] [--port P] [--dir DIR] [--logs DIR]
                           [--dry-run] -- COMMAND...
USAGE
}

HOSTS="" GPUS=0 PORT=12355 DIR=$(cd "$HERE/.." && pwd) LOGS=logs
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS=${2:?--hosts needs a value}; shift 2 ;;
    --gpus-per-host) GPUS=${2:?--gpus-per-host needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
    --logs) LOGS=${2:?--logs needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --)" ;;
  esac
done
[[ -n "$HOSTS" ]] || { die "--hosts is required"; }
[[ $# -gt 0 ]] || { die "give the command to run after --"; }
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus-per-host $GPUS: not a number"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port $PORT: not a number"
IFS=, read -r -a HOST_LIST <<<"$HOSTS"
PER_HOST=$(( GPUS > 0 ? GPUS : 1 ))
TOTAL=$(( ${#HOST_LIST[@]} * PER_HOST ))
COORD="${HOST_LIST[0]}:$PORT"
with_resume "$@"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG_DIR="$LOGS/$STAMP"
note "$TOTAL processes on ${#HOST_LIST[@]} host(s), coordinator $COORD; logs in $LOG_DIR"
step mkdir -p "$LOG_DIR"

PIDS=()
stop_all() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
i=0
for host in "${HOST_LIST[@]}"; do
  for (( g = 0; g < PER_HOST; g++ )); do
    VARS="JAX_COORDINATOR_ADDRESS=$COORD JAX_NUM_PROCESSES=$TOTAL JAX_PROCESS_ID=$i"
    (( GPUS > 0 )) && VARS+=" CUDA_VISIBLE_DEVICES=$g"
    REMOTE="cd $(printf '%q' "$DIR") && PATH=$(printf '%q' "$DIR")/.venv/bin:\$PATH $VARS $(quoted "${RESUMED[@]}")"
    CMD=(ssh -o BatchMode=yes "$host" "$REMOTE")
    if [[ "$DRY_RUN" == 1 ]]; then
      step "${CMD[@]}"
      note "(output to $LOG_DIR/process-$i.log)"
    else
      printf '+ %s > %s\n' "$(quoted "${CMD[@]}")" "$LOG_DIR/process-$i.log"
      "${CMD[@]}" >"$LOG_DIR/process-$i.log" 2>&1 &
      PIDS+=($!)
    fi
    i=$(( i + 1 ))
  done
done
[[ "$DRY_RUN" == 1 ]] && exit 0

STATUS=0
for (( n = 0; n < ${#PIDS[@]}; n++ )); do
  if ! wait -n; then
    rc=$?
    if [[ "$STATUS" == 0 ]]; then STATUS=$rc; note "a process failed (status $rc): stopping the others"; stop_all; fi
  fi
done
exit "$STATUS"
