#!/usr/bin/env bash
# local_multinode.sh: simulate an N-node torchrun job on one machine (laptop, CI runner).
#
#   sudo ./local_multinode.sh                       # 2 "hosts" x 2 ranks, python3 -m ddpseed verify
#   ./local_multinode.sh --nnodes 3 --rdzv c10d -- train.py --epochs 1
#
# Each simulated node runs torchrun_multi_node.sh (next to this file) with its own NODE_RANK.
#   netns mode (root with `ip netns`): every node gets its own Linux network namespace with one
#     interface, ddp0, on a private /24 that exists only inside those namespaces; the nodes are
#     joined by veth pairs to a bridge living in one more namespace. Traffic between ranks really
#     crosses interfaces, and MASTER_ADDR is node 0's address, as on a cluster.
#   loopback mode (anyone): the nodes are plain process groups sharing 127.0.0.1.
# Everything the script creates (namespaces, processes) is removed when it exits, also on ^C.
#
# Usage: local_multinode.sh [OPTIONS] [--] [COMMAND...]   (COMMAND as for torchrun_multi_node.sh)
#   NNODES          --nnodes N            simulated nodes (default 2)
#   NPROC_PER_NODE  --nproc-per-node N    ranks per node (default 2)
#   MODE            --mode M              auto (default: netns when possible), netns, loopback
#   RDZV            --rdzv static|c10d    rendezvous kind (default static)
#   MASTER_PORT     --master-port PORT    rendezvous port on node 0 (default 29500)
#   SUBNET          --subnet A.B.C        first three octets of the namespaces' /24
#                                         (default 10.<200-249>.<0-255>, picked at random)
#   DDPSEED_SEED    --seed N              base seed for every rank (optional)
# --dry-run prints every node's torchrun command (the namespaces are not created) and starts
# nothing; -h/--help prints this text.
# Other settings of torchrun_multi_node.sh (PYTHON, PYTHONHASHSEED, ...) are passed through.
# Output lines are prefixed with "[nodeI] ". The exit status is the first failing node's.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
node_sh=$here/torchrun_multi_node.sh
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MODE=${MODE:-auto}
RDZV=${RDZV:-static}
MASTER_PORT=${MASTER_PORT:-29500}
SUBNET=${SUBNET:-10.$((200 + RANDOM % 50)).$((RANDOM % 256))}
DRY_RUN=0

ddpseed_option() {
    case $1 in
        --nnodes) NNODES=$2 ;;
        --nproc-per-node) NPROC_PER_NODE=$2 ;;
        --mode) MODE=$2 ;;
        --rdzv) RDZV=$2 ;;
        --master-port) MASTER_PORT=$2 ;;
        --subnet) SUBNET=$2 ;;
        *) return 1 ;;
    esac
}
ddpseed_options "$@"
set -- "${REST[@]}"
if ! [[ $NNODES =~ ^[1-9][0-9]*$ ]] || ((NNODES > 200)); then
    ddpseed_die "NNODES=$NNODES: use 1..200"
fi
[[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || ddpseed_die "SUBNET=$SUBNET: give A.B.C"
[[ -x $node_sh ]] || ddpseed_die "$node_sh is missing or not executable"
# Checked here once rather than by every node after the namespaces exist.
ddpseed_seed_env

tag=ddps$$
NAMESPACES=()
pids=()

# shellcheck disable=SC2317,SC2329  # reached through the trap
cleanup() {
    local pid ns
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # Deleting a namespace deletes its interfaces (and their veth peers) with it.
    for ns in "${NAMESPACES[@]}"; do
        ip netns delete "$ns" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

netns_possible() {
    (($(id -u) == 0)) && command -v ip >/dev/null && ip netns list >/dev/null 2>&1
}

case $MODE in
    auto) if netns_possible; then MODE=netns; else MODE=loopback; fi ;;
    netns) netns_possible || ddpseed_die "netns mode needs root and iproute2's ip netns" ;;
    loopback) ;;
    *) ddpseed_die "MODE=$MODE: choose auto, netns or loopback" ;;
esac
if [[ $MODE == netns ]] && ((!DRY_RUN)) && ! ddpseed_netns_hosts "$tag" "$SUBNET" "$NNODES"; then
    ddpseed_die "could not create network namespaces; run with --mode loopback"
fi
master=127.0.0.1
[[ $MODE == loopback ]] || master=$SUBNET.1
echo "local_multinode.sh: $NNODES nodes x $NPROC_PER_NODE ranks, $MODE mode, $RDZV rendezvous" \
    "at $master:$MASTER_PORT" >&2

# One rendezvous id per run of this script, the same for all of its nodes.
run_id=$tag-$(date -u +%Y%m%dT%H%M%SZ)
for ((i = 0; i < NNODES; i++)); do
    node_env=(NNODES="$NNODES" NPROC_PER_NODE="$NPROC_PER_NODE" NODE_RANK="$i" RDZV="$RDZV"
        MASTER_ADDR="$master" MASTER_PORT="$MASTER_PORT" RUN_ID="$run_id")
    if [[ $MODE == netns ]]; then
        # gloo (and NCCL's bootstrap) must use the namespace's interface, and the c10d store
        # must advertise this node's address rather than the shared hostname.
        prefix=(ip netns exec "${tag}n$i")
        node_env+=(LOCAL_ADDR="$SUBNET.$((i + 1))" GLOO_SOCKET_IFNAME=ddp0 NCCL_SOCKET_IFNAME=ddp0)
    else
        prefix=()
        node_env+=(GLOO_SOCKET_IFNAME=lo)
    fi
    if ((DRY_RUN)); then
        # Each node's torchrun command, as its node script would run it; nothing is started.
        env "${node_env[@]}" "$node_sh" --dry-run "$@" 2>&1 | sed "s/^/[node$i] /"
        continue
    fi
    # setsid: each node is its own process group, so one kill stops torchrun and its ranks.
    # shellcheck disable=SC2016  # "$@" and PIPESTATUS belong to the inner shell
    setsid bash -c '"$@" 2>&1 | sed -u "s/^/[node'"$i"'] /"; exit "${PIPESTATUS[0]}"' _ \
        "${prefix[@]}" env "${node_env[@]}" "$node_sh" "$@" &
    pids+=("$!")
done

((!DRY_RUN)) || exit 0
status=0
for ((i = 0; i < NNODES; i++)); do
    rc=0
    wait -n || rc=$?
    if ((rc != 0 && status == 0)); then
        # A failed node leaves the others waiting in rendezvous or a collective: stop them.
        status=$rc
        echo "local_multinode.sh: a node exited with status $rc; stopping the others" >&2
        for pid in "${pids[@]}"; do
            kill -TERM -- "-$pid" 2>/dev/null || true
        done
    fi
done
exit "$status"
