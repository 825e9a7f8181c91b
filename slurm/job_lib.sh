# shellcheck shell=bash
# Shared by the sbatch templates (sourced, not run): signal forwarding, waiting and self-requeue.
#
#   run_training_step CMD...   runs CMD (an srun command) in the background, forwards the time-limit warning to
#                              it, waits for it, and requeues the job when the ranks stopped on a signal.
# Exit codes of the training: 0 finished; 75 stopped on a signal after a checkpoint ("requeue me"). torchrun
# turns 75 into 1, so a non-zero exit after a stop signal is treated as a stop too.

say() { echo "[$(date '+%F %T')] sbatch: $*"; }

_child=""
_stop_signal=""

_on_signal() {
    if [[ -n "$_stop_signal" ]]; then
        # Never signal the ranks twice and never SIGKILL: they may be writing the checkpoint right now.
        say "$1 again: already stopping; waiting for the checkpoint"
        return
    fi
    _stop_signal="$1"
    if [[ "$1" == USR1 && -n "$_child" ]]; then
        # srun forwards USR1 to every process of the step; torchrun (--signals_to_handle ...,SIGUSR1) passes it on
        # to its workers, which stop at the next step boundary and checkpoint.
        say "USR1 (time limit near): asking the ranks to checkpoint and stop"
        kill -USR1 "$_child"
    else
        # SIGTERM comes from SLURM itself (preemption, scancel, scontrol requeue), which signals every process of
        # the job: the ranks have it already. Forwarding it would make torchrun cut its wait for them short.
        say "$1: SLURM is stopping the job; the ranks checkpoint and exit"
    fi
}

run_training_step() {
    trap '_on_signal USR1' USR1
    trap '_on_signal TERM' TERM
    say "exec: $*"
    "$@" &
    _child=$!
    while kill -0 "$_child" 2>/dev/null; do
        wait "$_child"  # returns early when a trapped signal arrives: keep waiting while the step runs
    done
    wait "$_child"
    local rc=$?
    if (( rc == 0 )); then
        say "training finished"
        return 0
    fi
    if (( rc != 75 )) && [[ -z "$_stop_signal" ]]; then
        say "training failed with exit code $rc"
        return "$rc"
    fi
    if (( ${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-50} )); then
        say "stopped (exit $rc) after ${SLURM_RESTART_COUNT} restarts (MAX_REQUEUES): not requeueing"
        return "$rc"
    fi
    say "ranks stopped on ${_stop_signal:-a signal} (exit $rc): requeueing job $SLURM_JOB_ID to resume from latest"
    # After a preemption or an external `scontrol requeue`, SLURM has requeued the job already: this then fails.
    scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue refused: the job is already being requeued"
    return 0
}
