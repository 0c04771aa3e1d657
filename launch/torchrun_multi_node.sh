#!/usr/bin/env bash
# torchrun_multi_node.sh: start ONE node of a (multi-node) torchrun job with reproducible seeding.
#
# Run it once on every node, with the same settings except NODE_RANK (static rendezvous) or
# with identical settings (c10d rendezvous, which hands out node ranks itself):
#
#   # node 0 (also the master)                       # node 1
#   NNODES=2 NPROC_PER_NODE=4 NODE_RANK=0 \          NNODES=2 NPROC_PER_NODE=4 NODE_RANK=1 \
#   MASTER_ADDR=node0 MASTER_PORT=29500 \            MASTER_ADDR=node0 MASTER_PORT=29500 \
#     ./torchrun_multi_node.sh train.py --lr 0.1       ./torchrun_multi_node.sh train.py --lr 0.1
#
#   # elastic-style c10d rendezvous: same line on every node, RUN_ID shared by the whole job
#   RDZV=c10d RUN_ID=exp42 NNODES=2 MASTER_ADDR=node0 ./torchrun_multi_node.sh train.py
#
# Usage: torchrun_multi_node.sh [OPTIONS] [--] [COMMAND...]
#
# COMMAND is what every rank runs (default: `-m ddpseed verify`, which checks that all ranks
# agree on the seed and prints a table). It may be given as
#   train.py ARGS...                  a script, run by torchrun's Python
#   -m package.module ARGS...         a module
#   python[3] train.py | -m mod ...   as above; that interpreter also runs torchrun
#   ./binary ARGS...                  anything else runs without Python (torchrun --no-python)
#
# Every setting is an environment variable, and most have a flag that overrides it:
#   NNODES          --nnodes N             number of nodes (default 1; MIN:MAX with c10d)
#   NPROC_PER_NODE  --nproc-per-node N     processes on this node (default: GPUs, else 1)
#   NODE_RANK       --node-rank R          this node's rank, static rendezvous only (default 0)
#   MASTER_ADDR     --master-addr HOST     address of node 0 / the c10d store (default 127.0.0.1)
#   MASTER_PORT     --master-port PORT     its TCP port (default 29500)
#   RDZV            --rdzv static|c10d     rendezvous kind (default static)
#   RUN_ID          --run-id ID            c10d rendezvous id, same on every node and new for
#                                          every job (default: slurm-<job id> inside Slurm; a
#                                          fresh one when NNODES=1; required otherwise)
#   LOCAL_ADDR      --local-addr ADDR      address other nodes reach this one at (c10d; set it
#                                          when the hostname does not resolve to that address)
#   RDZV_IS_HOST    --rdzv-is-host 0|1     c10d: whether this node runs the rendezvous store.
#                                          Default: 1 when LOCAL_ADDR equals MASTER_ADDR, else
#                                          torchrun guesses from the hostname's addresses.
#   DDPSEED_SEED    --seed N               base seed handed to ddpseed on every rank (optional)
#   PYTHONHASHSEED                         str/bytes hash seed of every rank (default 0)
#   PYTHON                                 interpreter that runs torchrun (default python3)
#   TORCHRUN_EXTRA_ARGS                    more torchrun options, split on spaces
# --dry-run prints the torchrun command instead of running it; -h/--help prints this text.
#
# Options use `--name value` or `--name=value`; underscores work too (--nproc_per_node=2).
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV=${RDZV:-static}
RUN_ID=${RUN_ID:-}
LOCAL_ADDR=${LOCAL_ADDR:-}
RDZV_IS_HOST=${RDZV_IS_HOST:-}
PYTHON=${PYTHON:-}
DRY_RUN=0

ddpseed_option() {
    case $1 in
        --nnodes) NNODES=$2 ;;
        --nproc-per-node) NPROC_PER_NODE=$2 ;;
        --node-rank) NODE_RANK=$2 ;;
        --master-addr) MASTER_ADDR=$2 ;;
        --master-port) MASTER_PORT=$2 ;;
        --rdzv) RDZV=$2 ;;
        --run-id | --rdzv-id) RUN_ID=$2 ;;
        --local-addr) LOCAL_ADDR=$2 ;;
        --rdzv-is-host) RDZV_IS_HOST=$2 ;;
        *) return 1 ;;
    esac
}
ddpseed_options "$@"
ddpseed_torchrun_target "${REST[@]}"

# --- checks -----------------------------------------------------------------------------------
# NNODES may be a range MIN:MAX with c10d (elastic: starts once MIN nodes have joined).
[[ $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || ddpseed_die "NNODES=$NNODES is not a count N or MIN:MAX"
is_uint "$NODE_RANK" || ddpseed_die "NODE_RANK=$NODE_RANK is not an integer"
ddpseed_check_port MASTER_PORT "$MASTER_PORT"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(ddpseed_gpu_count)}
ddpseed_positive NPROC_PER_NODE "$NPROC_PER_NODE"
# Python randomises str/bytes hashes per process; pin them so set iteration order and anything
# hashed is the same on every rank and every run. Workers inherit the environment.
ddpseed_seed_env

# --- rendezvous -------------------------------------------------------------------------------
args=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE")
case $RDZV in
    static)
        # Node ranks are fixed by hand; node 0 opens the store on MASTER_ADDR:MASTER_PORT.
        is_uint "$NNODES" || ddpseed_die "NNODES=$NNODES: a MIN:MAX range needs RDZV=c10d"
        ((NODE_RANK < NNODES)) || ddpseed_die "NODE_RANK=$NODE_RANK is not in [0, NNODES=$NNODES)"
        args+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
        ;;
    c10d)
        # The node whose address is MASTER_ADDR hosts the store; node ranks come from arrival
        # order, so NODE_RANK is ignored. RUN_ID keeps concurrent jobs on one store apart, so
        # it must be new for every job: no constant default.
        if [[ -z $RUN_ID ]]; then
            if [[ -n ${SLURM_JOB_ID:-} ]]; then
                RUN_ID=slurm-$SLURM_JOB_ID
            elif [[ $NNODES == 1 ]]; then
                RUN_ID=ddpseed-$(date -u +%Y%m%dT%H%M%SZ)-$$-$RANDOM
            else
                ddpseed_die "RDZV=c10d on $NNODES nodes needs RUN_ID: the same id on every node," \
                    "new for every job (e.g. RUN_ID=exp42-\$(date +%Y%m%d%H%M)); inside Slurm it" \
                    "defaults to the job id"
            fi
        fi
        args+=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RUN_ID")
        # torchrun recognises the store's host by its hostname's addresses only; a node whose
        # hostname resolves elsewhere (loopback, another interface) must be told.
        if [[ -z $RDZV_IS_HOST && -n $LOCAL_ADDR && $LOCAL_ADDR == "$MASTER_ADDR" ]]; then
            RDZV_IS_HOST=1
        fi
        case $RDZV_IS_HOST in
            '') ;;
            1 | true | yes) args+=(--rdzv-conf=is_host=true) ;;
            0 | false | no) args+=(--rdzv-conf=is_host=false) ;;
            *) ddpseed_die "RDZV_IS_HOST=$RDZV_IS_HOST: use 1 or 0" ;;
        esac
        ;;
    *) ddpseed_die "RDZV=$RDZV: choose static or c10d" ;;
esac
[[ -z $LOCAL_ADDR ]] || args+=(--local-addr="$LOCAL_ADDR")
ddpseed_extra_args "${TORCHRUN_EXTRA_ARGS:-}"

echo "ddpseed launch: torchrun $RDZV rendezvous at $MASTER_ADDR:$MASTER_PORT," \
    "node $( [[ $RDZV == static ]] && echo "$NODE_RANK" || echo '?')/$NNODES," \
    "$NPROC_PER_NODE processes, PYTHONHASHSEED=$PYTHONHASHSEED," \
    "DDPSEED_SEED=${DDPSEED_SEED:-<unset>}" >&2
ddpseed_run "$PYTHON" -m torch.distributed.run "${args[@]}" "${EXTRA[@]}" "${TARGET[@]}"
