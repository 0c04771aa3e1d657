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

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "torchrun_single_node.sh: $*" >&2; exit 2; }

NPROC_PER_NODE=${NPROC_PER_NODE:-}
MASTER_PORT=${MASTER_PORT:-}
PYTHON=${PYTHON:-}
DRY_RUN=0

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
        --nproc-per-node) NPROC_PER_NODE=$value ;;
        --master-port) MASTER_PORT=$value ;;
        --seed) DDPSEED_SEED=$value ;;
        *) die "unknown option $name (see --help)" ;;
    esac
done

# The command every rank runs; an explicit interpreter also runs torchrun.
(($#)) || set -- -m ddpseed verify
case ${1##*/} in
    python | python[0-9]*) PYTHON=${PYTHON:-$1}; shift; (($#)) || die "no script after $PYTHON" ;;
esac
PYTHON=${PYTHON:-python3}
case $1 in
    -m) (($# >= 2)) || die "-m needs a module name"; target=(--module "${@:2}") ;;
    -m?*) target=(--module "${1#-m}" "${@:2}") ;;
    *.py) target=("$@") ;;
    *) target=(--no-python "$@") ;;
esac

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
if [[ -z $NPROC_PER_NODE ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
if ! is_uint "$NPROC_PER_NODE" || ((NPROC_PER_NODE < 1)); then
    die "NPROC_PER_NODE=$NPROC_PER_NODE is not a positive integer"
fi

# Same str/bytes hashes on every rank and every run; the workers inherit the environment.
export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
if [[ -n ${DDPSEED_SEED:-} ]]; then
    is_uint "$DDPSEED_SEED" || die "DDPSEED_SEED=$DDPSEED_SEED is not a non-negative integer"
    export DDPSEED_SEED
fi

args=(--nproc-per-node="$NPROC_PER_NODE")
if [[ -n $MASTER_PORT ]]; then
    if ! is_uint "$MASTER_PORT" || ((MASTER_PORT < 1 || MASTER_PORT > 65535)); then
        die "MASTER_PORT=$MASTER_PORT is not a TCP port"
    fi
    args+=(--nnodes=1 --node-rank=0 --master-addr=127.0.0.1 --master-port="$MASTER_PORT")
else
    args+=(--standalone)
fi
if [[ -n ${TORCHRUN_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<<"$TORCHRUN_EXTRA_ARGS"
    args+=("${extra[@]}")
fi

echo "ddpseed launch: torchrun on this node, $NPROC_PER_NODE processes," \
    "PYTHONHASHSEED=$PYTHONHASHSEED, DDPSEED_SEED=${DDPSEED_SEED:-<unset>}" >&2
cmd=("$PYTHON" -m torch.distributed.run "${args[@]}" "${target[@]}")
if ((DRY_RUN)); then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
