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

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "torchrun_multi_node.sh: $*" >&2; exit 2; }

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

# --- options --------------------------------------------------------------------------------
while (($#)); do
    opt=$1
    case $opt in
        --) shift; break ;;
        -h | --help) usage; exit 0 ;;
        --dry-run | --dry_run) DRY_RUN=1; shift; continue ;;
        --*=*) name=${opt%%=*}; value=${opt#*=}; shift ;;
        --*) name=$opt; (($# >= 2)) || die "$opt needs a value"; value=$2; shift 2 ;;
        *) break ;;
    esac
    case ${name//_/-} in
        --nnodes) NNODES=$value ;;
        --nproc-per-node) NPROC_PER_NODE=$value ;;
        --node-rank) NODE_RANK=$value ;;
        --master-addr) MASTER_ADDR=$value ;;
        --master-port) MASTER_PORT=$value ;;
        --rdzv) RDZV=$value ;;
        --run-id | --rdzv-id) RUN_ID=$value ;;
        --local-addr) LOCAL_ADDR=$value ;;
        --rdzv-is-host) RDZV_IS_HOST=$value ;;
        --seed) DDPSEED_SEED=$value ;;
        *) die "unknown option $name (see --help)" ;;
    esac
done

# --- the command every rank runs ------------------------------------------------------------
(($#)) || set -- -m ddpseed verify
case ${1##*/} in
    python | python[0-9]*)
        # An explicit interpreter also runs torchrun, so the workers use it too.
        PYTHON=${PYTHON:-$1}
        shift
        (($#)) || die "no script after the interpreter"
        ;;
esac
PYTHON=${PYTHON:-python3}
case $1 in
    -m) (($# >= 2)) || die "-m needs a module name"; target=(--module "${@:2}") ;;
    -m?*) target=(--module "${1#-m}" "${@:2}") ;;
    *.py) target=("$@") ;;
    *) target=(--no-python "$@") ;;
esac

# --- checks -----------------------------------------------------------------------------------
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
# NNODES may be a range MIN:MAX with c10d (elastic: starts once MIN nodes have joined).
[[ $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES=$NNODES is not a count N or MIN:MAX"
is_uint "$NODE_RANK" || die "NODE_RANK=$NODE_RANK is not an integer"
if ! is_uint "$MASTER_PORT" || ((MASTER_PORT < 1 || MASTER_PORT > 65535)); then
    die "MASTER_PORT=$MASTER_PORT is not a TCP port"
fi
if [[ -z $NPROC_PER_NODE ]]; then
    # One process per visible GPU (CUDA_VISIBLE_DEVICES is honoured), one on a CPU-only node.
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
if ! is_uint "$NPROC_PER_NODE" || ((NPROC_PER_NODE < 1)); then
    die "NPROC_PER_NODE=$NPROC_PER_NODE is not a positive integer"
fi

# --- reproducibility --------------------------------------------------------------------------
# Python randomises str/bytes hashes per process; pin them so set iteration order and anything
# hashed is the same on every rank and every run. Workers inherit the environment.
export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
if [[ -n ${DDPSEED_SEED:-} ]]; then
    is_uint "$DDPSEED_SEED" || die "DDPSEED_SEED=$DDPSEED_SEED is not a non-negative integer"
    export DDPSEED_SEED
fi

# --- rendezvous -------------------------------------------------------------------------------
args=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE")
case $RDZV in
    static)
        # Node ranks are fixed by hand; node 0 opens the store on MASTER_ADDR:MASTER_PORT.
        is_uint "$NNODES" || die "NNODES=$NNODES: a MIN:MAX range needs RDZV=c10d"
        ((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK is not in [0, NNODES=$NNODES)"
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
                die "RDZV=c10d on $NNODES nodes needs RUN_ID: the same id on every node, new for" \
                    "every job (e.g. RUN_ID=exp42-\$(date +%Y%m%d%H%M)); inside Slurm it" \
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
            *) die "RDZV_IS_HOST=$RDZV_IS_HOST: use 1 or 0" ;;
        esac
        ;;
    *) die "RDZV=$RDZV: choose static or c10d" ;;
esac
[[ -z $LOCAL_ADDR ]] || args+=(--local-addr="$LOCAL_ADDR")
if [[ -n ${TORCHRUN_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<<"$TORCHRUN_EXTRA_ARGS"
    args+=("${extra[@]}")
fi

echo "ddpseed launch: torchrun $RDZV rendezvous at $MASTER_ADDR:$MASTER_PORT," \
    "node $( [[ $RDZV == static ]] && echo "$NODE_RANK" || echo '?')/$NNODES," \
    "$NPROC_PER_NODE processes, PYTHONHASHSEED=$PYTHONHASHSEED," \
    "DDPSEED_SEED=${DDPSEED_SEED:-<unset>}" >&2

cmd=("$PYTHON" -m torch.distributed.run "${args[@]}" "${target[@]}")
if ((DRY_RUN)); then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
