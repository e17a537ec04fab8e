#!/bin/bash
# Shared Slurm launcher of the megatron_longpo templates (docs/slurm.md). Sourced by the sbatch
# scripts in this directory; all Slurm logic lives here:
#   longpo_torchrun SCRIPT ARGS...  one torchrun agent per task (python -m megatron_longpo.launch),
#                                   static rendezvous on the first node of the allocation
#   longpo_exec CMD ARGS...         one plain process per task (e.g. the generation array job)
# Both run the step in the background and wait for it, with these signal rules:
#   USR1 (preemption / `--signal=B:USR1@LEAD` before the time limit): create the stop file and
#        forward USR1 to every process of the job's steps; the program saves at its next step
#        boundary, records "requeue" in its status file, exits 0, and the job is requeued.
#   TERM (plain `scancel`, `scontrol requeue`, preemption with PreemptMode=REQUEUE): Slurm signals
#        the step itself; the program saves if it can, and this script never requeues.
# A job is requeued only when the program says it stopped early and can resume (status file);
# a finished run or a crash is never requeued.
#
# Knobs (environment variables, exported to the job by sbatch's default --export=ALL):
#   REPO                    repository root (default: the submit directory)
#   VENV / PY               virtual environment / its python (default: $REPO/.venv/bin/python)
#   LONGPO_NPROC_PER_NODE   processes per node (default: GPUs of the node, SLURM_GPUS_ON_NODE)
#   MASTER_PORT             rendezvous port (default: 20000 + job id % 12000: below Linux's
#                           ephemeral range 32768-60999, which other sockets take at random)
#   LONGPO_STOP_SAFETY_S    seconds the trainer keeps free before the job's end after its
#                           estimate of one step + one save (default 60)
#   LONGPO_STATE_DIR        where the stop and status files live (default: $REPO/logs/state;
#                           must be on a filesystem every node sees)

longpo_log() { echo "[slurm $(date -u +%H:%M:%S)] $*"; }

longpo_setup() {
  : "${SLURM_JOB_ID:?run this under sbatch}"
  REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  VENV=${VENV:-$REPO/.venv}
  PY=${PY:-$VENV/bin/python}
  cd "$REPO" || return 1
  export PYTHONUNBUFFERED=1
  local id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  id=${id:-$SLURM_JOB_ID}
  LONGPO_STATE_DIR=${LONGPO_STATE_DIR:-$REPO/logs/state}
  mkdir -p "$LONGPO_STATE_DIR"
  export LONGPO_STOP_FILE="$LONGPO_STATE_DIR/$id.stop" LONGPO_RUN_STATUS="$LONGPO_STATE_DIR/$id.status"
  rm -f "$LONGPO_STOP_FILE" "$LONGPO_RUN_STATUS"   # left by the previous slot of a requeued job
  trap _longpo_on_usr1 USR1   # early: USR1's default action would end the batch shell
  trap _longpo_on_term TERM INT

  # Rendezvous host: the first node of the allocation, as Megatron-LM's / NeMo's launchers do.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
  NTASKS=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
  LONGPO_NPROC_PER_NODE=${LONGPO_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  # srun stopped inheriting --cpus-per-task in Slurm 22.05: pass it on, or the step may be bound to one CPU.
  SRUN_ARGS=(--kill-on-bad-exit=1 --export=ALL)
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  fi

  # Time budget: the trainer stops by itself when one more step + save would not fit.
  local end=${SLURM_JOB_END_TIME:-}
  if [ -z "$end" ]; then
    local e
    e=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null | head -n 1)
    case "$e" in ""|N/A|NONE|Unknown) ;; *) end=$(date -d "$e" +%s 2>/dev/null || true) ;; esac
  fi
  if [ -n "$end" ]; then export LONGPO_JOB_END_TIME=$end; else unset LONGPO_JOB_END_TIME; fi
  longpo_log "job $id on $SLURM_JOB_NODELIST: $NTASKS task(s), master $MASTER_ADDR:$MASTER_PORT," \
    "ends $( [ -n "$end" ] && date -u -d "@$end" +%FT%TZ || echo never), state $LONGPO_STATE_DIR"
}

_longpo_preempted=0
_longpo_cancelled=0
_longpo_on_usr1() {
  [ "$_longpo_preempted" = 1 ] && return 0  # forwarded once (a second USR1 may be our own echo)
  _longpo_preempted=1
  longpo_log "USR1: asking the program to save and stop (stop file + USR1 to the job's steps)"
  touch "$LONGPO_STOP_FILE" || true
  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || longpo_log "warning: scancel --signal=USR1 failed"
}
_longpo_on_term() {
  _longpo_cancelled=1
  longpo_log "TERM: cancelled (no requeue); the program saves if the kill wait allows"
}

# Run "$@" as the job step in the background, wait through signals, then decide about requeue.
_longpo_step() {
  "$@" &
  local pid=$! status
  while :; do  # `wait` returns early when a trapped signal arrives: wait again until the step ends
    wait "$pid"; status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap '' USR1 TERM INT
  local requeue=0
  if [ -f "$LONGPO_RUN_STATUS" ]; then
    longpo_log "program status: $(cat "$LONGPO_RUN_STATUS")"
    grep -q '"requeue": true' "$LONGPO_RUN_STATUS" && requeue=1
  elif [ "$_longpo_preempted" = 1 ] && [ "$status" != 0 ]; then
    requeue=1  # a program without a status file, killed by the preemption: start it again
  fi
  if [ "$_longpo_cancelled" = 1 ]; then
    longpo_log "step ended ($status) after a cancel: not requeued"
  elif [ "$requeue" = 1 ]; then
    longpo_log "step ended ($status), stopped early: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || longpo_log "warning: scontrol requeue $SLURM_JOB_ID failed"
    return 0
  else
    longpo_log "step ended with status $status"
  fi
  return "$status"
}

longpo_torchrun() {
  if [ -z "$LONGPO_NPROC_PER_NODE" ]; then
    longpo_log "error: no GPUs in this allocation; set LONGPO_NPROC_PER_NODE (processes per node)"
    return 2
  fi
  # The task body runs on each node: `bash -c` with positional arguments (no re-quoting of "$@").
  # USR1 is ignored by the agents (and inherited as ignored by the workers until the trainer
  # installs its handler; the stop file covers a USR1 that arrives before that).
  _longpo_step srun "${SRUN_ARGS[@]}" --ntasks="$NTASKS" bash -c '
    trap "" USR1
    exec "$1" -m megatron_longpo.launch --nnodes="$2" --node-rank="$SLURM_PROCID" --nproc-per-node="$3" \
      --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "${@:4}"' \
    longpo-task "$PY" "$NTASKS" "$LONGPO_NPROC_PER_NODE" "$@"
}

longpo_exec() {
  _longpo_step srun "${SRUN_ARGS[@]}" --ntasks=1 "$@"
}
