# shellcheck shell=bash
# What the scripts in launcher/ and benchmarks/run_all.sh share, sourced by each (not run):
#   . "$(dirname "$0")/lib.sh"    (slurm.sbatch, which Slurm runs as a copy: . "$repo/launcher/lib.sh")
# It defines functions only, and albor_root: the repository this file is in.
albor_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# albor_venv_path: the virtualenv's directory. ALBOR_VENV names one, relative to the repository root
# whatever the directory a script runs in (an absolute path as it is); unset or empty: .venv there.
albor_venv_path() {
  local venv="${ALBOR_VENV:-.venv}"
  case "$venv" in
    /*) echo "$venv" ;;
    *) echo "$albor_root/$venv" ;;
  esac
}

# albor_activate_venv: activates the virtualenv. One that ALBOR_VENV names must exist: without it the
# script ends with 2 and one line saying how to make it. The default .venv may be absent (albor
# installed in the environment already): then nothing is activated.
albor_activate_venv() {
  local venv
  venv=$(albor_venv_path)
  if [ ! -f "$venv/bin/activate" ]; then
    [ -n "${ALBOR_VENV:-}" ] || return 0
    echo "${0##*/}: ALBOR_VENV=$ALBOR_VENV: no virtualenv at $venv: create it with" \
      "ALBOR_VENV=$ALBOR_VENV bash launcher/setup.sh" >&2
    exit 2
  fi
  # shellcheck disable=SC1091  # the virtualenv's own script
  . "$venv/bin/activate"
}

# albor_has_gpu: true when nvidia-smi is there and lists a GPU (whatever CUDA_VISIBLE_DEVICES says:
# it asks the driver, not CUDA).
albor_has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# albor_should_requeue CODE: true when a job whose ranks exited with CODE should go back into the queue
# and continue with --resume auto. launcher/slurm.sbatch decides with it in its batch shell after srun
# returns (no Python needed there); tests/test_launchers.py runs it on every albor exit code.
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
