#!/usr/bin/env python3
"""The peers of `colony bench route`: hnswlib and faiss (IndexHNSWFlat) on the same split,
parameters and threads. Prints one JSON object per (library, threads) on stdout:
{"lib", "threads", "build_s", "curve": [{"ef", "recall_at_1", "recall_at_10", "qps"}]}.

Run from scripts/ann-venv.sh's virtualenv; the bench passes the files it wrote.
"""
import argparse
import json
import sys
import time

import numpy as np


def read_ivecs(path):
    a = np.fromfile(path, dtype=np.int32)
    if a.size == 0:
        return a.reshape(0, 0)
    d = a[0]
    return a.reshape(-1, d + 1)[:, 1:]


def recalls(found, gt, k):
    r1 = float(np.mean(found[:, 0] == gt[:, 0]))
    hits = sum(len(set(f[:k]) & set(g[:k])) for f, g in zip(found.tolist(), gt.tolist()))
    return r1, hits / (len(gt) * k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--gt", required=True)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--efs", default="10,20,40,80,160")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--libs", default="hnswlib,faiss")
    ap.add_argument("--metric", default="l2")
    a = ap.parse_args()
    base = np.load(a.base).astype(np.float32)
    queries = np.load(a.queries).astype(np.float32)
    gt = read_ivecs(a.gt)
    k = 10
    efs = [int(x) for x in a.efs.split(",")]
    threads = [int(x) for x in a.threads.split(",")]
    n, dim = base.shape
    if a.metric != "l2":
        sys.exit("the peers are measured with l2 only")
    for lib in a.libs.split(","):
        if lib == "hnswlib":
            import hnswlib

            t0 = time.perf_counter()
            index = hnswlib.Index(space="l2", dim=dim)
            index.init_index(max_elements=n, M=a.m, ef_construction=a.ef_construction, random_seed=42)
            index.set_num_threads(a.build_threads)
            index.add_items(base, np.arange(n))
            build_s = time.perf_counter() - t0

            def search(ef, t):
                index.set_ef(max(ef, k))
                index.set_num_threads(t)
                labels, _ = index.knn_query(queries, k=k)
                return labels
        elif lib == "faiss":
            import faiss

            faiss.omp_set_num_threads(a.build_threads)
            t0 = time.perf_counter()
            index = faiss.IndexHNSWFlat(dim, a.m)
            index.hnsw.efConstruction = a.ef_construction
            index.add(base)
            build_s = time.perf_counter() - t0

            def search(ef, t):
                faiss.omp_set_num_threads(t)
                index.hnsw.efSearch = max(ef, k)
                _, labels = index.search(queries, k)
                return labels
        else:
            sys.exit(f"unknown library {lib}")
        for t in threads:
            curve = []
            search(efs[0], t)  # warm
            for ef in efs:
                t0 = time.perf_counter()
                found = search(ef, t)
                dt = time.perf_counter() - t0
                r1, r10 = recalls(np.asarray(found), gt, k)
                curve.append({"ef": ef, "recall_at_1": r1, "recall_at_10": r10, "qps": len(queries) / dt})
            print(json.dumps({"lib": lib, "threads": t, "build_s": build_s, "curve": curve}), flush=True)


if __name__ == "__main__":
    main()
