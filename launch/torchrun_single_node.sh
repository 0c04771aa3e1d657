#!/usr/bin/env bash
# torchrun_single_node.sh: run a script on one machine, one process per GPU, reproducibly seeded.
#
#   ./torchrun_single_node.sh train.py --lr 0.1             # one rank per visible GPU
#   NPROC_PER_NODE=4 DDPSEED_SEED=1234 ./torchrun_single_node.sh -m mypkg.train
#   ./torchrun_single_node.sh                               # python -m ddpseed verify
#
# Usage: torchrun_single_node.sh [OPTIONS] [--] [COMMAND...]
#
# COMMAND is what every rank runs (default: `-m ddpseed verify`): `train.py ARGS`,
# `-m module ARGS`, `python[3] train.py ARGS` (that interpreter then runs torchrun too), or any
# other executable (run through torchrun --no-python).
#
# Settings (environment variable, or the flag that overrides it):
#   NPROC_PER_NODE  --nproc-per-node N   processes (default: visible GPUs, else 1)
#   MASTER_PORT     --master-port PORT   rendezvous port on 127.0.0.1; when unset, torchrun
#                                        --standalone picks a free one (safe for parallel jobs)
#   DDPSEED_SEED    --seed N             base seed handed to ddpseed on every rank (optional)
#   PYTHONHASHSEED                       str/bytes hash seed of every rank (default 0)
#   PYTHON                               interpreter that runs torchrun (default python3)
#   TORCHRUN_EXTRA_ARGS                  more torchrun options, split on spaces
# --dry-run prints the torchrun command instead of running it; -h/--help prints this text.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NPROC_PER_NODE=${NPROC_PER_NODE:-}
MASTER_PORT=${MASTER_PORT:-}
PYTHON=${PYTHON:-}
DRY_RUN=0

ddpseed_option() {
    case $1 in
        --nproc-per-node) NPROC_PER_NODE=$2 ;;
        --master-port) MASTER_PORT=$2 ;;
        *) return 1 ;;
    esac
}
ddpseed_options "$@"
ddpseed_torchrun_target "${REST[@]}"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(ddpseed_gpu_count)}
ddpseed_positive NPROC_PER_NODE "$NPROC_PER_NODE"
ddpseed_seed_env

args=(--nproc-per-node="$NPROC_PER_NODE")
if [[ -n $MASTER_PORT ]]; then
    ddpseed_check_port MASTER_PORT "$MASTER_PORT"
    args+=(--nnodes=1 --node-rank=0 --master-addr=127.0.0.1 --master-port="$MASTER_PORT")
else
    args+=(--standalone)
fi
ddpseed_extra_args "${TORCHRUN_EXTRA_ARGS:-}"

echo "ddpseed launch: torchrun on this node, $NPROC_PER_NODE processes," \
    "PYTHONHASHSEED=$PYTHONHASHSEED, DDPSEED_SEED=${DDPSEED_SEED:-<unset>}" >&2
ddpseed_run "$PYTHON" -m torch.distributed.run "${args[@]}" "${EXTRA[@]}" "${TARGET[@]}"
