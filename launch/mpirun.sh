#!/usr/bin/env bash
# mpirun.sh: one rank per MPI process (Open MPI's or MPICH's mpirun), reproducibly seeded.
#
#   launch/mpirun.sh --np 4 train.py --lr 0.1          # one node: nothing else to set
#   launch/mpirun.sh --hosts node0:4,node1:4 train.py  # two nodes, four ranks each
#   launch/mpirun.sh --hostfile hosts.txt --np 16 -m mypkg.train
#   launch/mpirun.sh --np 16 -m mypkg.train            # inside sbatch/salloc: the job's nodes
#   DDPSEED_SEED=1234 launch/mpirun.sh --np 2          # python3 -m ddpseed verify
#
# Usage: mpirun.sh [OPTIONS] [--] [COMMAND...]
#
# COMMAND is what every rank runs (default: `-m ddpseed verify`, which checks that all ranks
# agree on the seed): `train.py ARGS`, `-m module ARGS` (both run by $PYTHON), `python ...`
# or any executable. ddpseed reads the rank, local rank and sizes from mpirun's own variables
# (OMPI_COMM_WORLD_* or PMI_*), so no torchrun is needed.
#
# Settings (environment variable, or the flag that overrides it):
#   NP           --np N             processes (default: the slots of --hosts, else visible
#                                   GPUs, else 1)
#   HOSTS        --hosts H:N,...    hosts and ranks per host; rank 0 runs on the first
#   HOSTFILE     --hostfile FILE    an mpirun host file instead (rank 0 on its first host)
#   MASTER_ADDR  --master-addr A    rank 0's address. On one node ddpseed uses loopback by
#                                   itself; across nodes the default is the first host, in
#                                   a Slurm job the NodeAddr of its first node
#   MASTER_PORT  --master-port P    across nodes or in a Slurm job, default 10000 + this
#                                   script's pid % 20000; on one node outside Slurm ddpseed
#                                   derives one from mpirun's job id
#   DDPSEED_SEED --seed N           base seed handed to ddpseed on every rank (optional)
#   PYTHONHASHSEED                  str/bytes hash seed of every rank (default 0)
#   PYTHON                          interpreter for train.py / -m (default python3)
#   MPIRUN                          the launcher (default mpirun); Open MPI or MPICH/Intel MPI
#                                   (Hydra), told apart by `$MPIRUN --version`
#   MPIRUN_EXTRA_ARGS               more mpirun options, split on spaces
# --dry-run prints the mpirun command instead of running it; -h/--help prints this text.
# As root, Open MPI gets --allow-run-as-root (containers).
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NP=${NP:-}
HOSTS=${HOSTS:-}
HOSTFILE=${HOSTFILE:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-}
MPIRUN=${MPIRUN:-mpirun}
DRY_RUN=0

ddpseed_option() {
    case $1 in
        --np | --nproc) NP=$2 ;;
        --hosts | --host) HOSTS=$2 ;;
        --hostfile) HOSTFILE=$2 ;;
        --master-addr) MASTER_ADDR=$2 ;;
        --master-port) MASTER_PORT=$2 ;;
        *) return 1 ;;
    esac
}
ddpseed_options "$@"
ddpseed_command "${REST[@]}"
ddpseed_seed_env

# --- where the ranks run ----------------------------------------------------------------------
[[ -z $HOSTS || -z $HOSTFILE ]] || ddpseed_die "give --hosts or --hostfile, not both"
first_host=
if [[ -n $HOSTS ]]; then
    first_host=${HOSTS%%,*}
    first_host=${first_host%%:*}
    if [[ -z $NP ]]; then  # the sum of the slots, 1 for a host without a count
        NP=0
        IFS=, read -r -a entries <<<"$HOSTS"
        for entry in "${entries[@]}"; do
            slots=1
            [[ $entry != *:* ]] || slots=${entry##*:}
            is_uint "$slots" || ddpseed_die "HOSTS entry $entry: slots must be an integer"
            NP=$((NP + slots))
        done
    fi
elif [[ -n $HOSTFILE ]]; then
    [[ -r $HOSTFILE ]] || ddpseed_die "HOSTFILE=$HOSTFILE cannot be read"
    first_host=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { print $1; exit }')
    [[ -n $first_host ]] || ddpseed_die "HOSTFILE=$HOSTFILE names no host"
fi
# Inside a Slurm job without --hosts/--hostfile: mpirun puts rank 0 on the job's first node.
# Every rank is told so here: Open MPI starts its remote daemons in an srun step of the other
# nodes, so its ranks there see another Slurm nodelist than rank 0 does.
if [[ -z $first_host$MASTER_ADDR && -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]]; then
    ddpseed_slurm_addr
    first_host=${NODES[0]}
fi
NP=${NP:-$(ddpseed_gpu_count)}
ddpseed_positive NP "$NP"

# --- rendezvous: across nodes or in a Slurm job (else ddpseed uses loopback and mpirun's job id)
if [[ -n $first_host ]]; then
    MASTER_ADDR=${MASTER_ADDR:-$first_host}
    # This script's pid names the launch: concurrent launches from one host differ.
    MASTER_PORT=${MASTER_PORT:-$(ddpseed_job_port $$)}
fi
[[ -z $MASTER_PORT ]] || ddpseed_check_port MASTER_PORT "$MASTER_PORT"

# --- the mpirun command, in the flavour's own option names ------------------------------------
exported=(PYTHONHASHSEED)
[[ -z ${DDPSEED_SEED:-} ]] || exported+=(DDPSEED_SEED)
[[ -z $MASTER_ADDR ]] || { export MASTER_ADDR; exported+=(MASTER_ADDR); }
[[ -z $MASTER_PORT ]] || { export MASTER_PORT; exported+=(MASTER_PORT); }
if "$MPIRUN" --version 2>&1 | grep -qi 'open mpi\|open-mpi\|openrte'; then
    flavour=openmpi
    args=(-np "$NP")
    ((EUID != 0)) || args+=(--allow-run-as-root)
    [[ -z $HOSTS ]] || args+=(--host "$HOSTS")
    [[ -z $HOSTFILE ]] || args+=(--hostfile "$HOSTFILE")
    for var in "${exported[@]}"; do args+=(-x "$var"); done
else
    flavour=hydra
    args=(-n "$NP")
    [[ -z $HOSTS ]] || args+=(-hosts "$HOSTS")
    [[ -z $HOSTFILE ]] || args+=(-f "$HOSTFILE")
    for var in "${exported[@]}"; do args+=(-genv "$var" "${!var}"); done
fi
ddpseed_extra_args "${MPIRUN_EXTRA_ARGS:-}"
args+=("${EXTRA[@]}")

echo "ddpseed launch: $MPIRUN ($flavour), $NP processes${first_host:+ from $first_host}," \
    "MASTER_ADDR=${MASTER_ADDR:-<loopback>} MASTER_PORT=${MASTER_PORT:-<from the job id>}" \
    "PYTHONHASHSEED=$PYTHONHASHSEED DDPSEED_SEED=${DDPSEED_SEED:-<unset>}" >&2
ddpseed_run "$MPIRUN" "${args[@]}" "${RANK_CMD[@]}"
