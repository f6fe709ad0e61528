#!/usr/bin/env python3
"""The PyTorch eager peer of `colony bench infer --backend cuda`.

The same shapes as our GPU bench: a Llama-family decoder (config from --config, as our
`Config` serialises it) with random weights (normal, sigma 0.02) in bf16 or f32, a common history
of C tokens prefilled, then P timed passes of N rows (one per worker) after 3 untimed ones.
Each pass: embeddings, every layer (RMSNorm, fused q/k/v product, RoPE on interleaved pairs,
the new keys/values written into a preallocated cache, grouped-query attention with
scaled_dot_product_attention over the common history and every worker's block, the output
product, RMSNorm, SwiGLU), the final norm, the logits of every row copied to the host (as our
decoder does each pass).

The cache is one preallocated buffer per layer: [common | worker 0 | worker 1 | ...]; every
worker's row attends to the common history and all workers' written tokens (a mask hides the
unwritten slots), so the cache is read once per pass for all workers. Positions are those of
the buffer (the real Hogwild! layout orders blocks per worker; the bytes and FLOPs are the same).

Prints one JSON object per (context, workers) on stdout.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--contexts", default="1024,8192")
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--passes", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    c = json.loads(a.config)
    dt = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    dev = a.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    D, L, H, KV, HD, FF, V = (
        c["dim"], c["layers"], c["heads"], c["kv_heads"], c["head_dim"], c["ffn"], c["vocab"],
    )
    eps = c["rms_eps"]
    gen = torch.Generator(device=dev).manual_seed(1)

    def w(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen) * 0.02

    layers = [
        dict(
            n1=torch.ones(D, device=dev, dtype=dt),
            wqkv=w(D, (H + 2 * KV) * HD),
            wo=w(H * HD, D),
            n2=torch.ones(D, device=dev, dtype=dt),
            wgu=w(D, 2 * FF),
            wd=w(FF, D),
        )
        for _ in range(L)
    ]
    embed = w(V, D)
    lm = w(D, V)
    norm = torch.ones(D, device=dev, dtype=dt)
    inv_freq = c["rope_base"] ** (
        -torch.arange(0, HD, 2, device=dev, dtype=torch.float64) / HD
    )

    def rope(x, pos):
        # x: [n, heads, HD], interleaved pairs; pos: [n]
        ang = pos[:, None].to(torch.float64) * inv_freq[None]
        cos = ang.cos().to(dt)[:, None, :]
        sin = ang.sin().to(dt)[:, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)

    def rms(x, g):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt) * g

    def forward(tokens, pos, slots, mask, K, Vc, want_logits):
        # tokens, pos, slots: [n]; mask: [n, cap] bool (True = attend)
        n = tokens.shape[0]
        x = embed[tokens]
        for i, l in enumerate(layers):
            h = rms(x, l["n1"])
            qkv = h @ l["wqkv"]
            q = qkv[:, : H * HD].view(n, H, HD)
            k = qkv[:, H * HD : (H + KV) * HD].view(n, KV, HD)
            v = qkv[:, (H + KV) * HD :].view(n, KV, HD)
            q = rope(q, pos)
            k = rope(k, pos)
            K[i][:, slots] = k.transpose(0, 1)
            Vc[i][:, slots] = v.transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                K[i][None],
                Vc[i][None],
                attn_mask=mask[None, None],
                enable_gqa=True,
            )  # [1, H, n, HD]
            x = x + o[0].transpose(0, 1).reshape(n, H * HD) @ l["wo"]
            h = rms(x, l["n2"])
            gu = h @ l["wgu"]
            x = x + (F.silu(gu[:, :FF]) * gu[:, FF:]) @ l["wd"]
        if want_logits:
            return (rms(x, norm) @ lm).float().cpu()
        return None

    warm = 3
    P = a.passes
    for ctx in [int(x) for x in a.contexts.split(",")]:
        one = None
        for N in [int(x) for x in a.workers.split(",")]:
            region = warm + P
            cap = ctx + N * region
            K = [torch.zeros(KV, cap, HD, device=dev, dtype=dt) for _ in range(L)]
            Vc = [torch.zeros(KV, cap, HD, device=dev, dtype=dt) for _ in range(L)]
            cols = torch.arange(cap, device=dev)
            with torch.inference_mode():
                done = 0
                while done < ctx:
                    n = min(512, ctx - done)
                    toks = torch.randint(0, V, (n,), device=dev, generator=gen)
                    pos = torch.arange(done, done + n, device=dev)
                    mask = cols[None, :] <= pos[:, None]
                    forward(toks, pos, pos, mask, K, Vc, False)
                    done += n
                sync()
                base = torch.tensor([ctx + j * region for j in range(N)], device=dev)
                for p in range(warm + P):
                    if p == warm:
                        sync()
                        t0 = time.perf_counter()
                    toks = torch.randint(0, V, (N,), device=dev, generator=gen)
                    slots = base + p
                    pos = ctx + N * p + torch.arange(N, device=dev)
                    # Common history and every worker's tokens up to this pass.
                    seen = cols < ctx
                    for j in range(N):
                        seen = seen | ((cols >= ctx + j * region) & (cols <= ctx + j * region + p))
                    mask = seen[None, :].expand(N, cap)
                    forward(toks, pos, slots, mask, K, Vc, True)
                sync()
                s = (time.perf_counter() - t0) / P
            tps = N / s
            if N == 1:
                one = tps
            print(
                json.dumps(
                    dict(
                        decoder="pytorch eager",
                        torch=torch.__version__,
                        dtype=a.dtype,
                        context=ctx,
                        workers=N,
                        passes=P,
                        ms_per_pass=1e3 * s,
                        tokens_per_s=tps,
                        speedup_vs_one_worker=(tps / one) if one else None,
                    )
                ),
                flush=True,
            )
            del K, Vc
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
