# lib.sh: pieces shared by the launch scripts that source it (mpirun.sh, the PBS and LSF
# examples): the help text, errors, the command every rank runs, reproducible seeding and
# --dry-run. Not a script of its own.

# The header comment of the calling script (from line 2 to the line before `set -euo`).
ddpseed_usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
ddpseed_die() { echo "${0##*/}: $*" >&2; exit 2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# ddpseed_command ARGS...: sets RANK_CMD, the command every rank runs. `train.py ARGS` and
# `-m module ARGS` run with $PYTHON (default python3), `python[3] ...` and executables as
# given; no arguments means `python3 -m ddpseed verify` (all ranks check they agree).
ddpseed_command() {
    (($#)) || set -- -m ddpseed verify
    case $1 in
        -m*) RANK_CMD=("${PYTHON:-python3}" "$@") ;;
        *.py) RANK_CMD=("${PYTHON:-python3}" "$@") ;;
        *) RANK_CMD=("$@") ;;
    esac
}

# Pins PYTHONHASHSEED (default 0) and checks/exports DDPSEED_SEED when set: every rank gets
# the same str/bytes hashes and base seed (the launcher passes the environment on).
ddpseed_seed_env() {
    export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
    if [[ -n ${DDPSEED_SEED:-} ]]; then
        is_uint "$DDPSEED_SEED" || ddpseed_die "DDPSEED_SEED=$DDPSEED_SEED is not a non-negative integer"
        export DDPSEED_SEED
    fi
}

# ddpseed_run CMD...: prints the command (shell-quoted) under --dry-run, else runs it.
ddpseed_run() {
    if ((${DRY_RUN:-0})); then
        printf 'ddpseed dry run:'
        printf ' %q' "$@"
        echo
        exit 0
    fi
    exec "$@"
}
