# shellcheck shell=bash
# albor_should_requeue CODE: true when a job whose ranks exited with CODE should go back into the queue
# and continue with --resume auto. Sourced by launcher/slurm.sbatch, which decides in its batch shell
# after srun returns (no Python needed there); tests/test_launchers.py runs it on every albor exit code.
#
# Only 15 (preempted) requeues: every rank saved a checkpoint after the same step, so the next allocation
# continues from there and loses nothing. The others do not:
#   0, 4     the run finished (4: cleanly, above its target): running it again repeats it.
#   1-3, 5-14  a bug, a usage or data error, a failed epoch checkpoint, a contract abort, a lost rank:
#            the same job would fail the same way, one allocation after another.
#   16       stopped by a signal, but the preemption checkpoint failed or outlasted --preempt-grace-s.
#            A resume would restart from the previous complete checkpoint and, on the same full or slow
#            disk, most likely fail the same way at the end of every allocation, losing its work each
#            time: a person should look (free space, a longer --preempt-grace-s, an earlier --signal).
#   128+N    a second signal ended a rank at once, without a checkpoint: someone insisted on the stop.
#   other    anything else (17, which albor status records for ranks killed outright; a rank killed by a
#            signal; srun's own errors) is not albor's clean stop.
albor_should_requeue() {
  [ "$1" = 15 ]
}
