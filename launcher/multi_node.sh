#!/usr/bin/env bash
# Trains albor on several nodes under DeepSpeed's launcher, one rank per GPU slot of a hostfile
# (launcher/hostfile.example shows the format). Two ways, the same albor.pretrain ARGS (README):
#
#   ssh (default), from the first node only:
#     ALBOR_HOSTFILE=hosts bash launcher/multi_node.sh --dataset data/my_corpus --output-dir runs/a ...
#   `deepspeed --hostfile hosts --module albor.pretrain ARGS` starts every node's ranks over ssh with pdsh:
#   it needs passwordless ssh between the nodes, pdsh, and this repository, its virtualenv and the
#   dataset at the same paths on every node (a shared file system); it runs in this directory there.
#
#   no ssh (containers, or a scheduler that starts one task per node), on every node:
#     ALBOR_HOSTFILE=hosts ALBOR_NODE_RANK=<0..nodes-1> bash launcher/multi_node.sh ARGS
#   adds --no_ssh --node_rank R --master_addr <first host>: each node starts its own ranks.
#
# Exits with the run's code (README "Exit codes"). Run launcher/setup.sh once first, on every node.
#
# Environment:
#   ALBOR_HOSTFILE     the hostfile (default: launcher/hostfile in the repository)
#   ALBOR_NODE_RANK    this node's index in the hostfile: set it for the no-ssh way, leave it unset for ssh
#   ALBOR_MASTER_ADDR  address of node 0's rank 0 (no ssh: default the hostfile's first host; ssh:
#                      default what that host's `hostname -I` says first)
#   ALBOR_MASTER_PORT  rendezvous port (default: DeepSpeed's, 29500)
#   ALBOR_VENV         virtualenv to activate, relative to the repository (default: its .venv, when it
#                      exists; one named here must exist)
#   ALBOR_* (others)   the ssh way starts remote ranks with only DeepSpeed's own pass-through variables
#                      (NCCL_*, PYTHON*, UCX_*, ...): any ALBOR_* variable (ALBOR_STEP_TIMEOUT_S, ...)
#                      belongs in DeepSpeed's env file, $HOME/.deepspeed_env or ./.deepspeed_env, as
#                      NAME=value lines; this script warns about one that is set here and missing there.
set -euo pipefail
# shellcheck source=launcher/lib.sh
. "$(dirname "$0")/lib.sh"
albor_activate_venv

hostfile="${ALBOR_HOSTFILE:-$albor_root/launcher/hostfile}"
if [ ! -f "$hostfile" ]; then
  echo "multi_node.sh: no hostfile at $hostfile: copy launcher/hostfile.example there, or set ALBOR_HOSTFILE" >&2
  exit 2
fi

args=(--hostfile "$hostfile")
[ -z "${ALBOR_MASTER_PORT:-}" ] || args+=(--master_port "$ALBOR_MASTER_PORT")
master="${ALBOR_MASTER_ADDR:-}"
if [ -n "${ALBOR_NODE_RANK:-}" ]; then
  # The hostfile's first host, as DeepSpeed itself picks node 0 (comments and blank lines skipped).
  [ -n "$master" ] || master=$(awk '{sub(/#.*/, "")} NF {print $1; exit}' "$hostfile")
  args+=(--no_ssh --node_rank "$ALBOR_NODE_RANK")
else
  for name in $(compgen -e ALBOR_); do
    case "$name" in ALBOR_HOSTFILE | ALBOR_NODE_RANK | ALBOR_MASTER_ADDR | ALBOR_MASTER_PORT | ALBOR_VENV) continue ;; esac
    if ! grep -qs "^$name=" "$HOME/.deepspeed_env" ./.deepspeed_env; then
      echo "multi_node.sh: warning: $name is set here but not in ~/.deepspeed_env or ./.deepspeed_env:" \
        "the ranks started over ssh will not see it" >&2
    fi
  done
fi
[ -z "$master" ] || args+=(--master_addr "$master")
exec deepspeed "${args[@]}" --module albor.pretrain "$@"
