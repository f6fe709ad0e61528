#!/usr/bin/env python3
"""One peer of hivemind 1.1.12's DecentralizedAverager, for `colony bench allreduce --hivemind`.

Run by the benchmark inside a peer's network namespace (same shaping as Colony's run). Peer 0
prints its multiaddr on stdout first; the others bootstrap from it. Every peer runs `rounds`
averaging steps of a `floats`-element float32 vector (round 0 is the warm-up) and writes, per
round, when its all-reduce started (group formed and triggered) and ended, on the host clock,
and its error against the exact weighted mean.

The virtualenv comes from scripts/hivemind-venv.sh.
"""
import argparse
import json
import sys
import time

import torch
import hivemind
from hivemind.averaging.control import AveragingStage


def vector(index: int, rnd: int, floats: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * index + rnd)
    return torch.rand(floats, generator=g) * 2 - 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--peers", type=int, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--floats", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--bandwidth", type=float, required=True, help="declared, Mbit/s")
    ap.add_argument("--start-at-ms", type=int, default=0)
    ap.add_argument("--bootstrap")
    ap.add_argument("--client", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    dht = hivemind.DHT(
        start=True,
        host_maddrs=[f"/ip4/{a.host}/tcp/0"],
        initial_peers=[a.bootstrap] if a.bootstrap else None,
        client_mode=a.client,
    )
    if a.index == 0:
        print(str(dht.get_visible_maddrs()[0]), flush=True)
    tensor = vector(a.index, 0, a.floats)
    averager = hivemind.averaging.DecentralizedAverager(
        averaged_tensors=[tensor],
        dht=dht,
        prefix="colony_bench",
        target_group_size=a.peers,
        min_group_size=a.peers,
        min_matchmaking_time=5.0,
        request_timeout=3.0,
        bandwidth=a.bandwidth,
        client_mode=a.client,
        start=True,
    )
    weights = [1.0 + i for i in range(a.peers)]
    # Let every peer come up before the first round.
    while time.time() * 1000 < a.start_at_ms:
        time.sleep(0.05)
    rounds = []
    for r in range(a.rounds):
        with averager.get_tensors() as ts:
            ts[0].copy_(vector(a.index, r, a.floats))
        control = averager.step(weight=weights[a.index], require_trigger=True, wait=False,
                                timeout=300)
        while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
            time.sleep(0.001)
        start = time.time()
        control.allow_allreduce()
        try:
            gathered = control.result()
            ok = gathered is not None
        except Exception as e:  # a failed round is a result too
            print(f"round {r} failed: {e!r}", file=sys.stderr, flush=True)
            gathered, ok = None, False
        end = time.time()
        err = None
        if ok and len(gathered) == a.peers:
            exact = sum(weights[i] * vector(i, r, a.floats).double() for i in range(a.peers))
            exact /= sum(weights)
            with averager.get_tensors() as ts:
                err = float((ts[0].double() - exact).abs().max())
        rounds.append({"ok": ok, "start": start, "end": end,
                       "group": len(gathered) if gathered else 0, "max_abs_err": err})
        print(json.dumps({"round": r, **rounds[-1]}), file=sys.stderr, flush=True)
    with open(a.out, "w") as f:
        json.dump({"rounds": rounds}, f)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
