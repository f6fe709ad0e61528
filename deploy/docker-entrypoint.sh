#!/bin/sh
# The container's entry point: makes the node's key on first start (and records its peer id in
# $COLONY_DATA_DIR/peer-id, copied to $COLONY_PUBLISH_PEER_ID when set, for a compose swarm's
# other nodes), then runs `colony ARGS…`. With COLONY_BOOTSTRAP_PEER_ID_FILE and
# COLONY_BOOTSTRAP_HOST set, it waits for that file and bootstraps from
# /dns4/$COLONY_BOOTSTRAP_HOST/tcp/4001/p2p/<its peer id>.
set -eu
data=${COLONY_DATA_DIR:-/data}
if [ ! -s "$data/node.key" ]; then
  colony keygen --out "$data/node.key" > "$data/peer-id"
fi
if [ -n "${COLONY_PUBLISH_PEER_ID:-}" ] && [ -s "$data/peer-id" ]; then
  cp "$data/peer-id" "$COLONY_PUBLISH_PEER_ID.tmp" && mv "$COLONY_PUBLISH_PEER_ID.tmp" "$COLONY_PUBLISH_PEER_ID"
fi
if [ -n "${COLONY_BOOTSTRAP_PEER_ID_FILE:-}" ]; then
  i=0
  until [ -s "$COLONY_BOOTSTRAP_PEER_ID_FILE" ]; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then
      echo "no bootstrap peer id in $COLONY_BOOTSTRAP_PEER_ID_FILE after 120 s" >&2
      exit 1
    fi
    sleep 1
  done
  COLONY_BOOTSTRAP="/dns4/${COLONY_BOOTSTRAP_HOST:?set COLONY_BOOTSTRAP_HOST}/tcp/4001/p2p/$(cat "$COLONY_BOOTSTRAP_PEER_ID_FILE")"
  export COLONY_BOOTSTRAP
fi
exec colony "$@"
