#!/usr/bin/env bash
# The albor image's entrypoint (docker/Dockerfile runs it under tini). What `docker run IMAGE ARGS` does:
#
#   --dataset ... (any first argument starting with "-")
#                  trains: deepspeed [ALBOR_DEEPSPEED_ARGS] --module albor.pretrain ARGS, on every GPU
#                  the container sees; exits with the job's code (0 done, 15 preempted and resumable, ...)
#   -h | --help    albor.pretrain's flags
#   prepare-data ... (or any word that is not a program on PATH)
#                  that albor command: albor ARGS (prepare-data, pretrain as one process, and the rest)
#   bash | python | deepspeed | nvidia-smi ... (a program on PATH)
#                  runs as given
#   (nothing)      this text
#
# Stopping a training run (docker stop, Kubernetes): SIGTERM, SIGINT or SIGUSR1 that reaches this script
# is sent on to the ranks themselves (SIGINT as SIGTERM: albor stops on SIGTERM or SIGUSR1), which save a
# checkpoint after the same step and exit 15. Not to the deepspeed runner: it passes no signal on, and
# its launch.py, once signalled, SIGKILLs the ranks 30 s later whatever --preempt-grace-s says. Give the
# container longer than that grace to stop (docker stop -t 180). A second signal ends the ranks at once.
# Ctrl-C under `docker run -it` reaches every process of the job at once, not only this one: stop an
# interactive run with docker stop.
#
# Environment:
#   ALBOR_DEEPSPEED_ARGS  deepspeed launcher flags for training, split on spaces: "--num_gpus 4", or for one
#                         container per node "--hostfile /data/hostfile --no_ssh --node_rank 1 --master_addr node-1"
#   HOME                  torch and Triton write caches under it; /tmp is used when it is not writable
#                         (docker run --user with a uid the image does not know)
#   PATH                  where the programs above are looked up
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# Signal the ranks of the training started by train(): the deepspeed runner's children are launch.py
# (one per node in this container), whose children are the ranks.
signal_ranks() {
  local sig=$1 launchers
  if launchers=$(pgrep -d, -P "$runner") && pkill "-$sig" -P "$launchers"; then
    return 0
  fi
  # No rank yet (still starting): nothing to save, so stop the launch itself.
  kill "-$sig" "$runner" 2>/dev/null || true
}

# A stop that arrives before the runner exists is held until it does (then it stops the launch).
on_stop() {
  if [ -n "$runner" ]; then signal_ranks "$1"; else stop_before_start=$1; fi
}

# Start the deepspeed runner, and pass on a stop that on_stop held while there was none.
start_runner() {
  local -a launcher_args=()
  read -r -a launcher_args <<<"${ALBOR_DEEPSPEED_ARGS:-}"
  # In the background: a trap runs only while bash waits in `wait`, not during a foreground command.
  deepspeed "${launcher_args[@]}" --module albor.pretrain "$@" &
  runner=$!
  if [ -n "$stop_before_start" ]; then signal_ranks "$stop_before_start"; fi
}

train() {
  runner="" stop_before_start=""
  # The traps first: a signal between starting the runner and setting them would end this script
  # and leave the job running.
  trap 'on_stop TERM' TERM INT
  trap 'on_stop USR1' USR1
  start_runner "$@"
  local code
  while :; do
    # A trapped signal returns from `wait` early (status > 128) while the runner goes on: wait again.
    wait "$runner" && code=0 || code=$?
    kill -0 "$runner" 2>/dev/null || exit "$code"
  done
}

# Sourced, it only defines the functions above (tests/test_docker.py drives train() step by step).
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

[ -w "${HOME:-/}" ] || export HOME=/tmp

case "${1:-}" in
  "") usage ;;
  -h | --help) exec python -m albor.pretrain --help ;;
  -*) train "$@" ;;
  *)
    # type -P looks on PATH only: `export` and `report` are albor commands, not shell builtins to run.
    if type -P "$1" >/dev/null; then
      exec "$@"
    fi
    exec albor "$@"
    ;;
esac
