//! `colony bench route`: the HNSW index on GloVe 6B 50-d (a seeded split: 10,000 held-out
//! queries, the rest the base), recall@1/recall@10 against cached brute-force truth and
//! queries per second along an `ef` sweep with 1 thread and all threads, recall@1 under
//! distance-computation budgets (the learned-routing paper's measure, bottom layer from the
//! fixed entry), build time and index bytes; hnswlib and faiss (HNSW) on the same split,
//! parameters and threads in the same run (`scripts/ann_peer_bench.py`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use colony_routing::data::{Matrix, ground_truth, read_vectors, write_npy};
use colony_routing::{Found, Hnsw, Metric, Params, Query};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct RouteBenchArgs {
    /// Vectors (.npy, .fvecs, .bvecs); default: GloVe from scripts/fetch-data.sh.
    #[arg(long, default_value = ".cache/data/glove-6b-50d.npy")]
    pub data: PathBuf,
    /// Held-out queries.
    #[arg(long, default_value_t = 10_000)]
    pub queries: usize,
    /// Use only the first N vectors of the file (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[arg(long, default_value_t = 16)]
    pub m: usize,
    #[arg(long, default_value_t = 200)]
    pub ef_construction: usize,
    /// The ef sweep of the recall/QPS curves.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,16,24,32,48,64,96,128,192,256"
    )]
    pub efs: Vec<usize>,
    /// Distance-computation budgets for recall@1 (bottom layer, fixed entry).
    #[arg(long, value_delimiter = ',', default_value = "128,256,512")]
    pub dcs: Vec<usize>,
    /// Budgets to train learned routing for (one model each, as the paper trains one per
    /// budget); empty: no learned routing.
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    pub learn_dcs: Vec<usize>,
    /// The routing subspace's dimension for each of --learn-dcs.
    #[arg(long, value_delimiter = ',', default_value = "16,24")]
    pub learn_dims: Vec<usize>,
    /// DAgger rounds per model.
    #[arg(long, default_value_t = 3)]
    pub learn_rounds: usize,
    /// Training queries per round.
    #[arg(long, default_value_t = 4000)]
    pub learn_queries: usize,
    /// Query thread counts (0: all cores).
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    pub threads: Vec<usize>,
    /// The Python with hnswlib and faiss ("auto": scripts/ann-venv.sh's, if it is there; "off").
    #[arg(long, default_value = "auto")]
    pub peers: String,
    /// Where the split, the ground truth and the peers' inputs are kept.
    #[arg(long, default_value = ".cache/route-bench")]
    pub work: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Point {
    pub ef: usize,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
    pub qps: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Curve {
    pub lib: String,
    pub threads: usize,
    pub build_s: f64,
    pub curve: Vec<Point>,
}

/// Learned routing trained for one budget: recall@1 at that budget against plain routing on
/// the same graph, and a budget sweep of both (recall@1, recall@10, QPS).
#[derive(Debug, Clone, Serialize)]
pub struct Learned {
    pub dcs_budget: usize,
    pub dim: usize,
    pub train_s: f64,
    pub kept_round: usize,
    pub plain_recall_at_1: f64,
    /// The untrained start: routing in the principal subspace.
    pub start_recall_at_1: f64,
    pub learned_recall_at_1: f64,
    pub sweep: Vec<RoutedPoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutedPoint {
    pub routing: String,
    pub threads: usize,
    pub dcs_budget: usize,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
    pub qps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DcsPoint {
    pub dcs_budget: usize,
    pub recall_at_1: f64,
    pub mean_dcs: f64,
    pub mean_hops: f64,
}

const K: usize = 10;

/// QPS at `target` recall@10 by linear interpolation between the two sweep points around it
/// (the curve sorted by recall); None if the curve never reaches it.
pub fn qps_at(curve: &[Point], target: f64) -> Option<f64> {
    let mut c = curve.to_vec();
    c.sort_by(|a, b| a.recall_at_10.total_cmp(&b.recall_at_10));
    let i = c.iter().position(|p| p.recall_at_10 >= target)?;
    if i == 0 {
        return Some(c[0].qps);
    }
    let (lo, hi) = (&c[i - 1], &c[i]);
    let t = (target - lo.recall_at_10) / (hi.recall_at_10 - lo.recall_at_10).max(1e-12);
    Some(lo.qps + t * (hi.qps - lo.qps))
}

/// Recall@1 and recall@10 of answers against the truth (rows of `gt`, nearest first).
pub fn recalls(found: &[Found], gt: &Matrix<u32>) -> (f64, f64) {
    let (mut r1, mut r10) = (0usize, 0usize);
    for (i, f) in found.iter().enumerate() {
        let truth = gt.row(i);
        if f.hits.first().is_some_and(|h| h.key == u64::from(truth[0])) {
            r1 += 1;
        }
        let k = truth.len().min(K);
        r10 += f
            .hits
            .iter()
            .take(K)
            .filter(|h| truth[..k].iter().any(|&t| u64::from(t) == h.key))
            .count();
    }
    let n = found.len().max(1) as f64;
    (r1 as f64 / n, r10 as f64 / (n * K as f64))
}

/// Runs every query with `threads` threads (1: this thread, one after another).
fn run_queries(h: &Hnsw, q: &Matrix<f32>, query: &Query, threads: usize) -> (Vec<Found>, f64) {
    let t = Instant::now();
    let found: Vec<Found> = if threads == 1 {
        (0..q.n)
            .map(|i| h.search(q.row(i), query).unwrap_or_default())
            .collect()
    } else {
        (0..q.n)
            .into_par_iter()
            .map(|i| h.search(q.row(i), query).unwrap_or_default())
            .collect()
    };
    (found, t.elapsed().as_secs_f64())
}

pub fn run(a: RouteBenchArgs) -> anyhow::Result<()> {
    let all = read_vectors(&a.data)?;
    let n = if a.limit > 0 {
        a.limit.min(all.n)
    } else {
        all.n
    };
    anyhow::ensure!(
        n > a.queries,
        "{} vectors cannot give {} held-out queries",
        n,
        a.queries
    );
    // The split: a seeded shuffle, the first `queries` rows held out.
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let pick = |rows: &[usize]| Matrix {
        n: rows.len(),
        dim: all.dim,
        data: rows.iter().flat_map(|&r| all.row(r).to_vec()).collect(),
    };
    let queries = pick(&order[..a.queries]);
    let base = pick(&order[a.queries..]);
    drop(all);
    std::fs::create_dir_all(&a.work)?;
    let t = Instant::now();
    let gt = ground_truth(&base, &queries, Metric::L2, K, Some(&a.work))?;
    println!(
        "{} base × {} queries of dimension {}; ground truth in {:.1} s (cached in {})",
        base.n,
        queries.n,
        base.dim,
        t.elapsed().as_secs_f64(),
        a.work.display()
    );
    let cores = rayon::current_num_threads();
    let params = Params {
        ef_construction: a.ef_construction,
        ..Params::with_m(a.m)
    };
    let t = Instant::now();
    let index = Hnsw::build(&base.data, base.dim, Metric::L2, params)?;
    let build_s = t.elapsed().as_secs_f64();
    let index_bytes = index.memory_bytes();
    println!(
        "colony: built in {build_s:.1} s on {cores} threads (m {}, ef_construction {}), {:.1} MB \
         ({:.0} bytes per vector)",
        a.m,
        a.ef_construction,
        index_bytes as f64 / 1e6,
        index_bytes as f64 / base.n as f64
    );
    let threads: Vec<usize> = a
        .threads
        .iter()
        .map(|&t| if t == 0 { cores } else { t })
        .collect();
    let mut curves = Vec::new();
    for &th in &threads {
        let mut curve = Vec::new();
        let _ = run_queries(&index, &queries, &Query::top(K, a.efs[0]), th);
        for &ef in &a.efs {
            let (found, s) = run_queries(&index, &queries, &Query::top(K, ef), th);
            let (r1, r10) = recalls(&found, &gt);
            let p = Point {
                ef,
                recall_at_1: r1,
                recall_at_10: r10,
                qps: queries.n as f64 / s,
            };
            println!(
                "colony   {th} thr  ef {ef:>4}: recall@1 {r1:.4}  recall@10 {r10:.4}  {:>8.0} QPS",
                p.qps
            );
            curve.push(p);
        }
        curves.push(Curve {
            lib: "colony".into(),
            threads: th,
            build_s,
            curve,
        });
    }
    let mut dcs_points = Vec::new();
    for &b in &a.dcs {
        let q = Query {
            max_dcs: Some(b),
            bottom_only: true,
            ..Query::top(K, usize::MAX / 4)
        };
        let (found, _) = run_queries(&index, &queries, &q, cores);
        let (r1, _) = recalls(&found, &gt);
        let nf = found.len().max(1) as f64;
        let p = DcsPoint {
            dcs_budget: b,
            recall_at_1: r1,
            mean_dcs: found.iter().map(|f| f.dcs as f64).sum::<f64>() / nf,
            mean_hops: found.iter().map(|f| f.hops as f64).sum::<f64>() / nf,
        };
        println!(
            "plain routing, bottom layer, DCS {b:>4}: recall@1 {r1:.4} ({:.1} hops)",
            p.mean_hops
        );
        dcs_points.push(p);
    }
    let learned = learned_routing(&a, &index, &queries, &gt, &threads)?;
    let peers = match a.peers.as_str() {
        "off" => Vec::new(),
        py => {
            let py = if py == "auto" {
                ".cache/ann-venv/bin/python".to_string()
            } else {
                py.to_string()
            };
            if Path::new(&py).exists() || a.peers != "auto" {
                match peer_curves(&py, &a, &base, &queries, &gt, &threads) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("warning: the peers were not measured: {e:#}");
                        Vec::new()
                    }
                }
            } else {
                eprintln!("the peers are skipped: run scripts/ann-venv.sh first");
                Vec::new()
            }
        }
    };
    let mut summary = serde_json::Map::new();
    for c in curves.iter().chain(&peers) {
        for target in [0.90, 0.95] {
            let q = qps_at(&c.curve, target);
            let key = if c.lib == "colony" {
                format!("qps_at_recall10_{target:.2}_{}thr", c.threads)
            } else {
                format!("{}_qps_at_recall10_{target:.2}_{}thr", c.lib, c.threads)
            };
            summary.insert(key, q.into());
        }
    }
    for &th in &threads {
        for target in [0.90, 0.95] {
            let ours = curves
                .iter()
                .find(|c| c.threads == th)
                .and_then(|c| qps_at(&c.curve, target));
            for lib in ["hnswlib", "faiss"] {
                let theirs = peers
                    .iter()
                    .find(|c| c.lib == lib && c.threads == th)
                    .and_then(|c| qps_at(&c.curve, target));
                if let (Some(o), Some(t)) = (ours, theirs) {
                    println!(
                        "recall@10 {target:.2}, {th} thread(s): colony {o:.0} QPS, {lib} {t:.0} \
                         QPS: {:.2}×",
                        o / t
                    );
                }
            }
        }
    }
    if let Some(p) = &a.json {
        let doc = serde_json::json!({
            "dataset": a.data.display().to_string(),
            "n": base.n,
            "queries": queries.n,
            "dim": base.dim,
            "m": a.m,
            "ef_construction": a.ef_construction,
            "build_s": build_s,
            "build_threads": cores,
            "index_bytes": index_bytes,
            "plain": curves,
            "plain_dcs": dcs_points,
            "learned": learned,
            "peers": peers,
            "summary": summary,
        });
        super::write_json(p, "route", &[doc])?;
    }
    Ok(())
}

/// Trains one routing model per budget of `--learn-dcs` and measures it against plain
/// routing (bottom layer, fixed entry) on the held-out queries.
fn learned_routing(
    a: &RouteBenchArgs,
    index: &Hnsw,
    queries: &Matrix<f32>,
    gt: &Matrix<u32>,
    threads: &[usize],
) -> anyhow::Result<Vec<Learned>> {
    use colony_routing::learned::{Routed, Routing};
    use colony_routing::train::{TrainConfig, train, verify_for};
    anyhow::ensure!(
        a.learn_dcs.len() == a.learn_dims.len(),
        "--learn-dcs and --learn-dims pair up: give as many of each"
    );
    let routed = |r: &Routing, b: usize, k: usize, th: usize| -> (Vec<Found>, f64) {
        let rq = Routed {
            k,
            max_dcs: b,
            verify: verify_for(b, 0.125).max(k),
        };
        let one = |i: usize| {
            index
                .search_routed(r, queries.row(i), &rq)
                .unwrap_or_default()
        };
        let t = Instant::now();
        let found: Vec<Found> = if th == 1 {
            (0..queries.n).map(one).collect()
        } else {
            (0..queries.n).into_par_iter().map(one).collect()
        };
        (found, t.elapsed().as_secs_f64())
    };
    let plain = |b: usize, th: usize| {
        let q = Query {
            max_dcs: Some(b),
            bottom_only: true,
            ..Query::top(K, usize::MAX / 4)
        };
        run_queries(index, queries, &q, th)
    };
    let mut out = Vec::new();
    for (&b, &dim) in a.learn_dcs.iter().zip(&a.learn_dims) {
        let cfg = TrainConfig {
            dim,
            budgets: vec![b],
            rounds: a.learn_rounds,
            queries_per_round: a.learn_queries,
            dev: 1000.min(index.len() / 10),
            ..TrainConfig::default()
        };
        let t = Instant::now();
        let trained = train(index, &cfg, |r| {
            println!(
                "learned routing for DCS {b} ({dim}-d): round {} dev recall@1 plain {:.3} \
                 learned {:.3} (loss {:.3}) [{:.0} s]",
                r.round, r.dev[0].plain, r.dev[0].learned, r.loss, r.secs
            );
        })?;
        let train_s = t.elapsed().as_secs_f64();
        let all = *threads.last().unwrap_or(&1);
        let (p, _) = plain(b, all);
        let (st, _) = routed(&trained.start, b, K, all);
        let (l, _) = routed(&trained.routing, b, K, all);
        let entry = Learned {
            dcs_budget: b,
            dim,
            train_s,
            kept_round: trained.round,
            plain_recall_at_1: recalls(&p, gt).0,
            start_recall_at_1: recalls(&st, gt).0,
            learned_recall_at_1: recalls(&l, gt).0,
            sweep: {
                let mut sweep = Vec::new();
                for &th in threads {
                    for s in [b / 2, b, 2 * b, 4 * b] {
                        let (f, secs) = plain(s, th);
                        let (r1, r10) = recalls(&f, gt);
                        sweep.push(RoutedPoint {
                            routing: "plain".into(),
                            threads: th,
                            dcs_budget: s,
                            recall_at_1: r1,
                            recall_at_10: r10,
                            qps: queries.n as f64 / secs,
                        });
                        if s > verify_for(s, 0.125).max(K) + dim {
                            let (f, secs) = routed(&trained.routing, s, K, th);
                            let (r1, r10) = recalls(&f, gt);
                            sweep.push(RoutedPoint {
                                routing: "learned".into(),
                                threads: th,
                                dcs_budget: s,
                                recall_at_1: r1,
                                recall_at_10: r10,
                                qps: queries.n as f64 / secs,
                            });
                        }
                    }
                }
                sweep
            },
        };
        println!(
            "DCS {b}: recall@1 plain {:.4}, principal subspace ({dim}-d, untrained) {:.4}, \
             learned (round {}) {:.4}: {:+.1} points over plain; trained in {train_s:.0} s",
            entry.plain_recall_at_1,
            entry.start_recall_at_1,
            entry.kept_round,
            entry.learned_recall_at_1,
            100.0 * (entry.learned_recall_at_1 - entry.plain_recall_at_1)
        );
        for p in &entry.sweep {
            println!(
                "  {:<7} {} thr DCS {:>4}: recall@1 {:.4} recall@10 {:.4} {:>8.0} QPS",
                p.routing, p.threads, p.dcs_budget, p.recall_at_1, p.recall_at_10, p.qps
            );
        }
        out.push(entry);
    }
    Ok(out)
}

/// hnswlib's and faiss's curves (`scripts/ann_peer_bench.py`) on the split written to
/// `a.work`.
fn peer_curves(
    python: &str,
    a: &RouteBenchArgs,
    base: &Matrix<f32>,
    queries: &Matrix<f32>,
    gt: &Matrix<u32>,
    threads: &[usize],
) -> anyhow::Result<Vec<Curve>> {
    use anyhow::Context;
    let (bp, qp, gp) = (
        a.work.join("base.npy"),
        a.work.join("queries.npy"),
        a.work.join("gt.ivecs"),
    );
    write_npy(&bp, base)?;
    write_npy(&qp, queries)?;
    colony_routing::data::write_ivecs(&gp, gt)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ann_peer_bench.py");
    let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--base", &bp.to_string_lossy()])
        .args(["--queries", &qp.to_string_lossy()])
        .args(["--gt", &gp.to_string_lossy()])
        .args(["--m", &a.m.to_string()])
        .args(["--ef-construction", &a.ef_construction.to_string()])
        .args(["--efs", &join(&a.efs)])
        .args(["--threads", &join(threads)])
        .args(["--build-threads", &rayon::current_num_threads().to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed ({})",
        script.display(),
        out.status
    );
    let mut curves = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let c: Curve = serde_json::from_str(line)
            .with_context(|| format!("a line of {}: {line}", script.display()))?;
        for p in &c.curve {
            println!(
                "{:<8} {} thr  ef {:>4}: recall@1 {:.4}  recall@10 {:.4}  {:>8.0} QPS",
                c.lib, c.threads, p.ef, p.recall_at_1, p.recall_at_10, p.qps
            );
        }
        println!("{}: built in {:.1} s", c.lib, c.build_s);
        curves.push(c);
    }
    Ok(curves)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn qps_is_interpolated_between_the_points_around_the_target() {
        let p = |r: f64, q: f64| Point {
            ef: 0,
            recall_at_1: 0.0,
            recall_at_10: r,
            qps: q,
        };
        let c = vec![p(0.95, 1000.0), p(0.85, 3000.0), p(0.99, 500.0)];
        assert!((qps_at(&c, 0.90).unwrap() - 2000.0).abs() < 1e-6);
        assert_eq!(qps_at(&c, 0.95).unwrap(), 1000.0);
        assert!(qps_at(&c, 0.999).is_none());
        assert_eq!(qps_at(&c, 0.5).unwrap(), 3000.0);
    }

    #[test]
    fn the_bench_runs_on_a_small_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("v.npy");
        let m = Matrix {
            n: 600,
            dim: 8,
            data: (0..4800)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
                .collect(),
        };
        write_npy(&data, &m).unwrap();
        let json = dir.path().join("r.json");
        run(RouteBenchArgs {
            data,
            queries: 50,
            limit: 0,
            m: 8,
            ef_construction: 40,
            efs: vec![10, 40],
            dcs: vec![64],
            learn_dcs: vec![64],
            learn_dims: vec![4],
            learn_rounds: 1,
            learn_queries: 100,
            threads: vec![1, 0],
            peers: "off".into(),
            work: dir.path().join("work"),
            json: Some(json.clone()),
        })
        .unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let case = &doc["cases"][0];
        assert_eq!(case["n"], 550);
        assert_eq!(case["plain"].as_array().unwrap().len(), 2);
        assert!(
            case["plain"][0]["curve"][1]["recall_at_10"]
                .as_f64()
                .unwrap()
                > 0.9
        );
        let learned = &case["learned"][0];
        assert_eq!(learned["dcs_budget"], 64);
        assert!(learned["learned_recall_at_1"].as_f64().unwrap() > 0.0);
        assert!(!learned["sweep"].as_array().unwrap().is_empty());
    }
}
