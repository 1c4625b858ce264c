#!/usr/bin/env bash
# A small simulated cluster on one machine: N network namespaces ("nodes") joined by veth pairs to
# one bridge, each node's link to the bridge shaped with tc (tbf), and the ranks of each node
# started inside its namespace (gloo over the namespace addresses). For each inter-node rate and
# placement it runs benchmarks/multinode/worker.py (calibration + usp_npu bench for every valid
# configuration), then compare.py feeds the measured cluster to `usp-npu plan` and prints
# measured vs predicted.
#
# Network rules: only the private subnet below, only inside namespaces this script creates; the
# bridge has no address, so nothing is routed to or from the host. Everything created is removed
# on exit (trap), and leftovers of an earlier crashed run are removed before starting.
#
# Usage (root, `ip` and `tc` needed):
#   benchmarks/multinode/run.sh --nodes 2 --ranks-per-node 2 --rates "200mbit 2gbit" \
#       --placements "megatron round_robin" --seq-length 4096 --out results/
set -euo pipefail

PREFIX=uspmn                 # every namespace / link this script makes starts with this
SUBNET=10.213.7              # /24, used only inside the namespaces
BRIDGE=${PREFIX}br
NODES=2
RANKS=2
RATES="200mbit 2gbit"
PLACEMENTS="megatron round_robin"
SEQ=4096
HEADS=8
KV=""
HEAD_DIM=64
DTYPE=float32
REPEATS=1
PROBE_BYTES=$((4 * 1024 * 1024))
A2A=p2p                      # --ulysses-all-to-all: gloo's collective serialises slow links
OUT=benchmarks/multinode/results
TIMEOUT=600                  # seconds per launch: every rank is killed after it
PORT=29613

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES=$2; shift 2 ;;
        --ranks-per-node) RANKS=$2; shift 2 ;;
        --rates) RATES=$2; shift 2 ;;
        --placements) PLACEMENTS=$2; shift 2 ;;
        --seq-length) SEQ=$2; shift 2 ;;
        --num-attention-heads) HEADS=$2; shift 2 ;;
        --num-query-groups) KV=$2; shift 2 ;;
        --head-dim) HEAD_DIM=$2; shift 2 ;;
        --dtype) DTYPE=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --probe-bytes) PROBE_BYTES=$2; shift 2 ;;
        --ulysses-all-to-all) A2A=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --cleanup-only) CLEANUP_ONLY=1; shift ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python}

cleanup() {
    # namespaces first (their veth ends go with them), then host-side links and the bridge
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}-n" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^${PREFIX}" || true); do
        ip link del "$link" 2>/dev/null || true
    done
}

if [[ $(id -u) -ne 0 ]] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    echo "run.sh: needs root, ip and tc" >&2
    exit 3
fi
# one run at a time on this machine: the clean-up below would tear down another run's nodes
exec 9>"/tmp/${PREFIX}.lock"
flock -w "$TIMEOUT" 9 || { echo "run.sh: another run holds /tmp/${PREFIX}.lock" >&2; exit 4; }
cleanup                      # leftovers of an earlier run that crashed
[[ -n "${CLEANUP_ONLY:-}" ]] && exit 0
trap cleanup EXIT
trap 'exit 130' INT TERM

if (( NODES < 1 || NODES > 16 || RANKS < 1 )); then
    echo "run.sh: --nodes must be 1..16 and --ranks-per-node >= 1" >&2; exit 2
fi

ip link add "$BRIDGE" type bridge
ip link set "$BRIDGE" up
for ((n = 0; n < NODES; n++)); do
    ns=${PREFIX}-n$n
    ip netns add "$ns"
    ip link add "${PREFIX}h$n" type veth peer name "${PREFIX}c$n"
    ip link set "${PREFIX}c$n" netns "$ns"
    ip link set "${PREFIX}h$n" master "$BRIDGE"
    ip link set "${PREFIX}h$n" up
    ip netns exec "$ns" ip link set lo up
    # a ring step sends after computing: without this, TCP restarts slow-start on every step
    # (RDMA links, which the model describes, have no such ramp); per namespace, not the host's
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_slow_start_after_idle=0 || true
    ip netns exec "$ns" ip addr add "$SUBNET.$((n + 1))/24" dev "${PREFIX}c$n"
    ip netns exec "$ns" ip link set "${PREFIX}c$n" up
done

shape() {  # shape every node's egress towards the bridge to $1 (tbf: rate, burst ~10 ms)
    local rate=$1 bits burst
    bits=$("$PYTHON" -c "import re,sys; m=re.fullmatch(r'([0-9.]+)([kmg]?)bit','$rate'); sys.exit('bad rate $rate') if not m else print(int(float(m[1])*{'':1,'k':1e3,'m':1e6,'g':1e9}[m[2]]))")
    burst=$(( bits / 8 / 100 > 65536 ? bits / 8 / 100 : 65536 ))
    for ((n = 0; n < NODES; n++)); do
        ip netns exec "${PREFIX}-n$n" tc qdisc replace dev "${PREFIX}c$n" root tbf \
            rate "$rate" burst "$burst" latency 200ms
    done
}

mkdir -p "$OUT"
WORLD=$((NODES * RANKS))
for rate in $RATES; do
    shape "$rate"
    for placement in $PLACEMENTS; do
        tag="n${NODES}x${RANKS}_${rate}_${placement}"
        mapfile -t node_of < <(PYTHONPATH="$ROOT" "$PYTHON" -c \
            "from usp_npu.plan.placement import node_of_rank as f; print(*f($WORLD, $RANKS, '$placement'), sep='\n')")
        echo "== $tag: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        pids=()
        for ((g = 0; g < WORLD; g++)); do
            n=${node_of[$g]}
            ip netns exec "${PREFIX}-n$n" env RANK=$g USP_NPU_NODE=$n OMP_NUM_THREADS=1 \
                GLOO_SOCKET_IFNAME="${PREFIX}c$n" PYTHONPATH="$ROOT" \
                timeout -k 5 "$TIMEOUT" "$PYTHON" "$HERE/worker.py" \
                --nodes "$NODES" --ranks-per-node "$RANKS" --placement "$placement" \
                --master "$SUBNET.1:$PORT" --seq-length "$SEQ" --num-attention-heads "$HEADS" \
                ${KV:+--num-query-groups "$KV"} --head-dim "$HEAD_DIM" --dtype "$DTYPE" \
                --repeats "$REPEATS" --probe-bytes "$PROBE_BYTES" --timeout "$TIMEOUT" \
                --ulysses-all-to-all "$A2A" \
                --out "$OUT/$tag.json" &
            pids+=($!)
        done
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
        if (( status != 0 )); then echo "run.sh: $tag failed (status $status)" >&2; exit "$status"; fi
        PORT=$((PORT + 1))   # a fresh store port per launch (the old one may linger in TIME_WAIT)
    done
done
PYTHONPATH="$ROOT" "$PYTHON" "$HERE/compare.py" "$OUT"/n${NODES}x${RANKS}_*.json
