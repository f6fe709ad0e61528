#!/usr/bin/env bash
# Link and UDP counters of benchmark namespaces over time, for finding where an all-reduce
# round loses time (how BENCHMARKS.md's link timelines were taken).
#
#   scripts/netns-sample.sh OUT NS...      e.g. scripts/netns-sample.sh /tmp/t.txt ab91-h6 ab91-h7
#
# Run it next to `colony bench allreduce` (namespaces are <prefix>-h<i>, prefix ab<net>);
# stop it with Ctrl-C. Each line: unix time, namespace, eth0 rx bytes, eth0 tx bytes, UDP
# InErrors, UDP RcvbufErrors. Sampling more namespaces makes each sweep slower (~40 ms each).
set -euo pipefail
out=${1:?usage: netns-sample.sh OUT NS...}
shift
[ $# -gt 0 ] || { echo "name at least one namespace" >&2; exit 2; }
: > "$out"
while true; do
  for ns in "$@"; do
    # awk programs: the $ fields are awk's, not the shell's.
    # shellcheck disable=SC2016
    link=$(ip netns exec "$ns" awk '/eth0:/ {print $2, $10}' /proc/net/dev 2>/dev/null || true)
    # shellcheck disable=SC2016
    udp=$(ip netns exec "$ns" awk '/^Udp:/ {n++; if (n == 2) print $4, $6}' /proc/net/snmp 2>/dev/null || true)
    [ -n "$link" ] && echo "$(date +%s.%N) $ns $link $udp" >> "$out"
  done
  sleep 0.05
done
