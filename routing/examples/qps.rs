//! Single-thread QPS and recall@10 of an index on a split written by `colony bench route`
//! (`.cache/route-bench/{base,queries}.npy`, `gt.ivecs`): for quick iterations on the search
//! loop. The index is built once and kept in `--index` (default /tmp/route-qps.hnsw).
//!
//! `cargo run --release -p colony-routing --example qps -- [ef ...]`
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use colony_routing::data::{read_ivecs, read_vectors};
use colony_routing::{Hnsw, Metric, Params, Query};

fn main() {
    let dir = Path::new(".cache/route-bench");
    let base = read_vectors(&dir.join("base.npy")).unwrap();
    let queries = read_vectors(&dir.join("queries.npy")).unwrap();
    let gt = read_ivecs(&dir.join("gt.ivecs")).unwrap();
    let path = Path::new("/tmp/route-qps.hnsw");
    let index = match Hnsw::load(path) {
        Ok(i) if i.len() == base.n => i,
        _ => {
            let i = Hnsw::build(&base.data, base.dim, Metric::L2, Params::with_m(16)).unwrap();
            i.save(path).unwrap();
            i
        }
    };
    let efs: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    for ef in if efs.is_empty() {
        vec![64, 96, 128, 192]
    } else {
        efs
    } {
        let q = Query::top(10, ef);
        let t = Instant::now();
        let mut hits = 0;
        for i in 0..queries.n {
            let f = index.search(queries.row(i), &q).unwrap();
            let truth = gt.row(i);
            hits += f
                .hits
                .iter()
                .filter(|h| truth.iter().any(|&t| u64::from(t) == h.key))
                .count();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "ef {ef:>4}: recall@10 {:.4}  {:>7.0} QPS",
            hits as f64 / (10 * queries.n) as f64,
            queries.n as f64 / s
        );
    }
}
