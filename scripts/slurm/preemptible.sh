# Sourced by the sbatch scripts: `preemptible srun ...` runs the job step so that SLURM's warning before the time
# limit (`#SBATCH --signal=B:USR1@120`, sent to this batch shell) stops it cleanly, and the job requeues itself.
#
# The warning is passed on as SIGTERM: srun forwards it to its tasks, and `accelerate launch` / torchrun forward
# SIGTERM (not USR1, which would kill the launcher) to the diffit processes, which finish the unit of work in hand
# (an optimizer step and a checkpoint, a sample batch, a latent shard) and exit 3. The launcher itself then exits
# non-zero and waits 30 s at most for them, so the job is requeued whenever the warning came and the step did not
# end cleanly; the rerun resumes from what was written (at worst the previous checkpoint).
preemptible() {
    local warned=0 status
    "$@" &
    local step=$!
    trap 'warned=1; kill -TERM "$step" 2>/dev/null' USR1
    set +e
    wait "$step"; status=$?
    while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done   # `wait` returned for the trapped signal
    set -e
    if [ "$status" -eq 3 ] || { [ "$warned" -eq 1 ] && [ "$status" -ne 0 ]; }; then
        echo "diffit: stopped after saving its work (status $status); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
