#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice, on JAX's own multi-host runtime.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE [options] [--dry-run] -- COMMAND...
#
#   launch/tpu_pod.sh --name pg-v5e --zone us-west4-a --accelerator v5litepod-8 -- \
#       persguard personalize --model gs-fuse/sd15 --instance-dir gs-fuse/photos --out gs-fuse/runs/db \
#       --config dreambooth_sd15_v5e8
#
# 1. Reuse the slice NAME if it is READY; create it if it is absent; delete and re-create it if it was
#    preempted (a spot or preemptible slice) or is otherwise not usable.
# 2. Install the project on every worker from this checkout's commit (`git archive HEAD`, which must be clean):
#    ~/persguard_jax-<commit> with its own venv (`pip install -e .[tpu]`), skipped on workers that have it.
# 3. Run COMMAND on all workers at once (`--worker=all`) with PERSGUARD_DISTRIBUTED=auto: jax finds the
#    coordinator and the other workers from the TPU VM metadata itself. `persguard` resolves to the worker's venv.
#    Each worker logs to ~/persguard_logs/<stamp>-<hostname>.log; this machine keeps the combined stream in
#    --logs/<NAME>/<stamp>.log and copies the workers' logs beside it at the end.
# 4. A `persguard WORKFLOW` that can resume gets --resume (unless it has --resume or --overwrite): after a
#    preemption, re-running the same line re-creates the slice and continues from the last checkpoint. --out must
#    be storage every worker and every future slice sees (a GCS bucket through gcsfuse, Filestore).
#
# --dry-run prints every command it would run (gcloud, git) and runs none of them.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

usage() {
  cat <<USAGE
usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE [--project ID] [--runtime VERSION] [--spot]
                         [--logs DIR] [--allow-dirty] [--dry-run] -- COMMAND...
  --accelerator  the slice type, e.g. v5litepod-8, v5p-16, v4-32
  --runtime      the TPU VM software version (default by generation: v5litepod -> v2-alpha-tpuv5-lite,
                 v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e, others -> tpu-ubuntu2204-base)
  --spot         create the slice as a spot VM (cheaper; preempted slices are re-created on the next run)
  --logs         where this machine keeps the logs (default: logs)
  --allow-dirty  install from HEAD even if the checkout has uncommitted changes (they are not sent)
USAGE
}

NAME="" ZONE="" ACCEL="" PROJECT="" RUNTIME="" SPOT=0 LOGS=logs ALLOW_DIRTY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=${2:?--name needs a value}; shift 2 ;;
    --zone) ZONE=${2:?--zone needs a value}; shift 2 ;;
    --accelerator) ACCEL=${2:?--accelerator needs a value}; shift 2 ;;
    --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
    --runtime) RUNTIME=${2:?--runtime needs a value}; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --logs) LOGS=${2:?--logs needs a value}; shift 2 ;;
    --allow-dirty) ALLOW_DIRTY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --)" ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" && -n "$ACCEL" ]] || { die "--name, --zone and --accelerator are required"; }
[[ $# -gt 0 ]] || { die "give the command to run after --"; }
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name $NAME: lowercase letters, digits and dashes, starting with a letter"

if [[ -z "$RUNTIME" ]]; then
  case "$ACCEL" in
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")

# --- the source: one commit for every worker
REPO=$(cd "$HERE/.." && pwd)
COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null) || die "$REPO: not a git checkout (the workers install a commit)"
if [[ "$ALLOW_DIRTY" != 1 && -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
  die "$REPO has uncommitted changes: commit them (the workers install commit ${COMMIT:0:12}) or pass --allow-dirty"
fi
SHORT=${COMMIT:0:12}
ARCHIVE=/tmp/persguard_jax-$SHORT.tar.gz
REMOTE_DIR="persguard_jax-$SHORT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

# --- 1. the slice
CREATE=("${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCEL" --version "$RUNTIME")
[[ "$SPOT" == 1 ]] && CREATE+=(--spot)
DELETE=("${GC[@]}" delete "$NAME" "${WHERE[@]}" --quiet)
DESCRIBE=("${GC[@]}" describe "$NAME" "${WHERE[@]}" "--format=value(state,acceleratorType)")
if [[ "$DRY_RUN" == 1 ]]; then
  step "${DESCRIBE[@]}"
  note "if the slice is absent:"
  step "${CREATE[@]}"
  note "if it is PREEMPTED, TERMINATED or another type:"
  step "${DELETE[@]}"
  step "${CREATE[@]}"
else
  printf '+ %s\n' "$(quoted "${DESCRIBE[@]}")"
  INFO=$("${DESCRIBE[@]}" 2>/dev/null || true)
  STATE=${INFO%%[[:space:]]*}
  TYPE=$(awk '{print $2}' <<<"$INFO")
  if [[ -z "$INFO" ]]; then
    note "slice $NAME not found: creating it"
    step "${CREATE[@]}"
  elif [[ "$STATE" == READY && "${TYPE##*/}" == "$ACCEL" ]]; then
    note "reusing slice $NAME ($ACCEL, READY)"
  else
    note "slice $NAME is $STATE ($TYPE): re-creating it as $ACCEL"
    step "${DELETE[@]}"
    step "${CREATE[@]}"
  fi
fi

# --- 2. the project on every worker, from one commit
INSTALL="set -e; d=\$HOME/$REMOTE_DIR; if [ ! -f \$d/.installed ]; then rm -rf \$d; mkdir -p \$d; \
tar -xzf /tmp/$(basename "$ARCHIVE") -C \$d; python3 -m venv \$d/.venv; \$d/.venv/bin/pip install -q -e \"\$d[tpu]\"; \
touch \$d/.installed; fi"
step git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" "$COMMIT"
step "${GC[@]}" scp "$ARCHIVE" "$NAME:/tmp/" "${WHERE[@]}" --worker=all
step "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$INSTALL"

# --- 3. the command on all workers
with_resume "$@"
RUN="set -o pipefail; cd \$HOME/$REMOTE_DIR && mkdir -p \$HOME/persguard_logs && \
PERSGUARD_DISTRIBUTED=auto PATH=\$HOME/$REMOTE_DIR/.venv/bin:\$PATH $(quoted "${RESUMED[@]}") 2>&1 \
| tee \$HOME/persguard_logs/$STAMP-\$(hostname).log"
LOCAL_LOGS="$LOGS/$NAME"
step mkdir -p "$LOCAL_LOGS"
if [[ "$DRY_RUN" == 1 ]]; then
  step "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$RUN"
  note "(its output also goes to $LOCAL_LOGS/$STAMP.log)"
  STATUS=0
else
  set +e
  step "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$RUN" 2>&1 | tee "$LOCAL_LOGS/$STAMP.log"
  STATUS=${PIPESTATUS[0]}
  set -e
fi

# --- 4. every worker's own log beside the combined one
step "${GC[@]}" scp "$NAME:persguard_logs/$STAMP-*.log" "$LOCAL_LOGS/" "${WHERE[@]}" --worker=all || \
  note "could not copy the workers' logs; they stay in ~/persguard_logs on each worker"
exit "$STATUS"
