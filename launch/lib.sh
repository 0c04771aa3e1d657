# shellcheck shell=bash
# lib.sh: what every launch script shares (torchrun_*.sh, mpirun.sh, local_multinode.sh, the
# Slurm, PBS and LSF batch scripts): help text, errors, option parsing, the rank command, the
# port rule, seed checks as the library makes them, reproducible seeding and --dry-run.
# Not a script of its own: `source` it.

# The header comment of the calling script (from line 2 to the line before `set -euo`).
ddpseed_usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
ddpseed_die() { echo "${0##*/}: $*" >&2; exit 2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# ddpseed_options ARGS...: the option loop of every script. Takes `--name value` and
# `--name=value` (underscores work as dashes), -h/--help, --dry-run (sets DRY_RUN=1), --seed N
# (sets DDPSEED_SEED) and `--`; every other option goes to the script's own function
# `ddpseed_option NAME VALUE`, which returns non-zero for a name it does not know. The first
# argument that is not an option starts the command, left in REST.
ddpseed_options() {
    local opt name value
    while (($#)); do
        opt=$1
        case $opt in
            --) shift; break ;;
            -h | --help) ddpseed_usage; exit 0 ;;
            --dry-run | --dry_run) DRY_RUN=1; shift; continue ;;
            --*=*) name=${opt%%=*}; value=${opt#*=}; shift ;;
            --*) name=$opt; (($# >= 2)) || ddpseed_die "$opt needs a value"; value=$2; shift 2 ;;
            *) break ;;
        esac
        name=${name//_/-}
        if [[ $name == --seed ]]; then
            DDPSEED_SEED=$value
        else
            ddpseed_option "$name" "$value" || ddpseed_die "unknown option $name (see --help)"
        fi
    done
    REST=("$@")
}

# ddpseed_command ARGS...: sets RANK_CMD, the command every rank runs. `train.py ARGS` and
# `-m module ARGS` run with $PYTHON (default python3), `python[3] ...` and executables as
# given; no arguments means `python3 -m ddpseed verify` (all ranks check they agree).
# shellcheck disable=SC2034  # RANK_CMD is the caller's
ddpseed_command() {
    (($#)) || set -- -m ddpseed verify
    case $1 in
        -m*) RANK_CMD=("${PYTHON:-python3}" "$@") ;;
        *.py) RANK_CMD=("${PYTHON:-python3}" "$@") ;;
        *) RANK_CMD=("$@") ;;
    esac
}

# ddpseed_torchrun_target ARGS...: the same command in torchrun's terms, in TARGET (a script,
# `--module NAME ...`, or `--no-python EXECUTABLE ...`). An explicit `python[3]` also becomes
# PYTHON, the interpreter that runs torchrun, so the workers use it too.
# shellcheck disable=SC2034  # TARGET is the caller's
ddpseed_torchrun_target() {
    (($#)) || set -- -m ddpseed verify
    case ${1##*/} in
        python | python[0-9]*)
            PYTHON=${PYTHON:-$1}
            shift
            (($#)) || ddpseed_die "no script after the interpreter"
            ;;
    esac
    PYTHON=${PYTHON:-python3}
    case $1 in
        -m) (($# >= 2)) || ddpseed_die "-m needs a module name"; TARGET=(--module "${@:2}") ;;
        -m?*) TARGET=(--module "${1#-m}" "${@:2}") ;;
        *.py) TARGET=("$@") ;;
        *) TARGET=(--no-python "$@") ;;
    esac
}

# ddpseed_gpu_count: the visible GPUs of this node (CUDA_VISIBLE_DEVICES is honoured), else 1.
ddpseed_gpu_count() {
    "${PYTHON:-python3}" -c 'import torch; print(torch.cuda.device_count() or 1)'
}

# ddpseed_positive NAME VALUE: dies unless VALUE is a positive integer.
ddpseed_positive() {
    if ! is_uint "$2" || ((10#$2 < 1)); then
        ddpseed_die "$1=$2 is not a positive integer"
    fi
}

# ddpseed_check_port NAME VALUE: dies unless VALUE is a TCP port (1..65535).
ddpseed_check_port() {
    if ! is_uint "$2" || ((${#2} > 5 || 10#$2 < 1 || 10#$2 > 65535)); then
        ddpseed_die "$1=$2 is not a TCP port"
    fi
}

# ddpseed_job_port ID [STEP]: the rendezvous port of step STEP (default 0) of the launch with
# numeric id ID (a Slurm job id and step id, a process id): 10000 + (ID + 7639 * STEP) % 20000,
# as ddpseed.launchers.job_port derives it in Python, so a script and the library pick the same
# port, and concurrent jobs on one node, or concurrent steps of one job, different ones.
ddpseed_job_port() {
    local step=${2:-0}
    is_uint "$1" || ddpseed_die "job id $1 is not a number"
    is_uint "$step" || ddpseed_die "step id $step is not a number"
    echo $((10000 + (10#$1 + 7639 * 10#$step) % 20000))
}

# ddpseed_valid_seed TEXT: prints TEXT as a seed and succeeds when ddpseed.validate_seed
# would accept it, else fails: surrounding whitespace is ignored, then an optional sign and
# ASCII digits only (not the other Unicode digits), at most 10 significant digits, a value in
# [0, 2**32). tests/test_launch_scripts.py checks it against the Python rule.
ddpseed_valid_seed() {
    local text=$1 sign='' digits
    text=${text#"${text%%[![:space:]]*}"}
    text=${text%"${text##*[![:space:]]}"}
    case $text in
        [+-]*) sign=${text:0:1}; digits=${text:1} ;;
        *) digits=$text ;;
    esac
    # An explicit list, not a range: in some locales [0-9] matches more than ASCII digits.
    [[ -n $digits && $digits != *[!0123456789]* ]] || return 1
    while [[ $digits == 0?* ]]; do digits=${digits#0}; done
    ((${#digits} <= 10)) || return 1
    [[ $sign != - || $digits == 0 ]] || return 1
    ((10#$digits < 4294967296)) || return 1
    echo "$((10#$digits))"
}

# Pins PYTHONHASHSEED (default 0) and, when DDPSEED_SEED is set (even empty), checks it as the
# library will and exports it: every rank gets the same str/bytes hashes and base seed (the
# launcher passes the environment on). A seed the ranks would refuse stops the launch here.
ddpseed_seed_env() {
    export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
    if [[ -n ${DDPSEED_SEED+set} ]]; then
        local seed
        seed=$(ddpseed_valid_seed "$DDPSEED_SEED") ||
            ddpseed_die "DDPSEED_SEED=$DDPSEED_SEED is not an integer in [0, 2**32);" \
                "set e.g. DDPSEED_SEED=1234, or unset it"
        export DDPSEED_SEED=$seed
    fi
}

# ddpseed_extra_args VALUE: VALUE split on spaces, in EXTRA (TORCHRUN_EXTRA_ARGS, ...).
# shellcheck disable=SC2034  # EXTRA is the caller's
ddpseed_extra_args() {
    EXTRA=()
    [[ -z ${1:-} ]] || read -r -a EXTRA <<<"$1"
}

# ddpseed_netns_hosts TAG SUBNET N: N "hosts" on this machine (root, iproute2): network
# namespaces TAGn0 .. TAGn<N-1>, each with one interface, ddp0, at SUBNET.<i+1>/24, joined by
# veth pairs to a bridge living in one more namespace, TAGsw. The addresses exist only inside
# those namespaces. Every namespace made is appended to NAMESPACES (also when a step fails,
# which returns 1), for the caller to delete: deleting a namespace deletes its interfaces.
ddpseed_netns_hosts() {
    local tag=$1 subnet=$2 n=$3 sw=${1}sw i ns
    ip netns add "$sw" || return 1
    NAMESPACES+=("$sw")
    ip -n "$sw" link set lo up || return 1
    ip -n "$sw" link add br0 type bridge || return 1
    ip -n "$sw" link set br0 up || return 1
    for ((i = 0; i < n; i++)); do
        ns=${tag}n$i
        ip netns add "$ns" || return 1
        NAMESPACES+=("$ns")
        ip link add name ddp0 netns "$ns" type veth peer name "p$i" netns "$sw" || return 1
        ip -n "$sw" link set "p$i" master br0 up || return 1
        ip -n "$ns" link set lo up || return 1
        ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev ddp0 || return 1
        ip -n "$ns" link set ddp0 up || return 1
    done
}

# ddpseed_run CMD...: prints the command (shell-quoted) under DRY_RUN=1 / --dry-run, else runs it.
ddpseed_run() {
    if ((${DRY_RUN:-0})); then
        printf 'ddpseed dry run:'
        printf ' %q' "$@"
        echo
        exit 0
    fi
    exec "$@"
}

# ddpseed_slurm_addr: sets NODES to the Slurm job's node names and exports MASTER_ADDR
# (default: the NodeAddr of its first node, the address Slurm itself reaches it at, else its
# name; rank 0 runs there under srun's block distribution and mpirun's default mapping).
ddpseed_slurm_addr() {
    # Read the whole list (no `| head -n1`: with pipefail, head closing early can kill us).
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    if [[ -z ${MASTER_ADDR:-} ]]; then
        ((${#NODES[@]})) || ddpseed_die "scontrol show hostnames $SLURM_JOB_NODELIST named" \
            "no node; export MASTER_ADDR (the address of the job's first node)"
        MASTER_ADDR=$(scontrol show node "${NODES[0]}" -o |
            sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p') || MASTER_ADDR=
        MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
    fi
    export MASTER_ADDR
}

# ddpseed_slurm_master: ddpseed_slurm_addr, and exports MASTER_PORT (default: derived from the
# job id as ddpseed derives it for the job's first step, which the script's srun starts).
ddpseed_slurm_master() {
    ddpseed_slurm_addr
    export MASTER_PORT=${MASTER_PORT:-$(ddpseed_job_port "$SLURM_JOB_ID")}
    ddpseed_check_port MASTER_PORT "$MASTER_PORT"
    # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task; pass it on.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi
}
