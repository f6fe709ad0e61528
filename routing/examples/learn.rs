//! Learned vs plain routing on N GloVe vectors (a random split of the first N + 2,000 rows,
//! 2,000 held-out queries): for quick iterations on the training of routing vectors.
//!
//! `cargo run --release -p colony-routing --example learn -- N M BUDGETS ROUNDS QUERIES HIDDEN
//! LR VERIFY TEMPERATURE DIM FFN`, e.g. `-- 20000 8 128 3 2000 256 0.0003 0.125 1 16 0`
#![allow(clippy::unwrap_used)]

use std::path::Path;

use colony_routing::data::read_vectors;
use colony_routing::hnsw::brute_force;
use colony_routing::learned::Routed;
use colony_routing::train::{TrainConfig, train};
use colony_routing::{Hnsw, Metric, Params, Query};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| a.get(i).cloned().unwrap_or_else(|| d.to_string());
    let n: usize = arg(0, "20000").parse().unwrap();
    let m: usize = arg(1, "8").parse().unwrap();
    let budgets: Vec<usize> = arg(2, "32,64")
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let rounds: usize = arg(3, "4").parse().unwrap();
    let per: usize = arg(4, "2000").parse().unwrap();
    let hidden: usize = arg(5, "256").parse().unwrap();
    let lr: f64 = arg(6, "0.001").parse().unwrap();
    let verify: f64 = arg(7, "0.125").parse().unwrap();
    let temperature: f32 = arg(8, "1").parse().unwrap();
    let rdim: usize = arg(9, "16").parse().unwrap();
    let ffn = arg(10, "0") == "1";
    let g = read_vectors(Path::new(".cache/data/glove-6b-50d.npy")).unwrap();
    // A random split of the first n + 2000 rows (as the bench splits).
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..n + 2000).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    let pick = |rows: &[usize]| colony_routing::data::Matrix {
        n: rows.len(),
        dim: g.dim,
        data: rows.iter().flat_map(|&r| g.row(r).to_vec()).collect(),
    };
    let base = pick(&order[..n]);
    let queries = pick(&order[n..]);
    let h = Hnsw::build(&base.data, base.dim, Metric::L2, Params::with_m(m)).unwrap();
    let truth: Vec<u32> = queries
        .data
        .chunks_exact(base.dim)
        .map(|q| brute_force(&base.data, base.dim, Metric::L2, q, 1)[0])
        .collect();
    let cfg = TrainConfig {
        budgets: budgets.clone(),
        rounds,
        queries_per_round: per,
        hidden,
        lr,
        verify,
        temperature,
        dim: rdim,
        ffn,
        dev: 500,
        ..TrainConfig::default()
    };
    let t = std::time::Instant::now();
    let r = train(&h, &cfg, |rep| {
        eprintln!("{}", serde_json::to_string(rep).unwrap())
    })
    .unwrap()
    .routing;
    eprintln!("trained in {:.1} s", t.elapsed().as_secs_f64());
    for &b in &budgets {
        let (mut p, mut l) = (0, 0);
        for (q, &t) in queries.data.chunks_exact(base.dim).zip(&truth) {
            let plain = h
                .search(
                    q,
                    &Query {
                        max_dcs: Some(b),
                        bottom_only: true,
                        ..Query::top(1, usize::MAX / 4)
                    },
                )
                .unwrap();
            let routed = h
                .search_routed(
                    &r,
                    q,
                    &Routed {
                        k: 1,
                        max_dcs: b,
                        verify: colony_routing::train::verify_for(b, cfg.verify),
                    },
                )
                .unwrap();
            p += usize::from(plain.hits[0].key == u64::from(t));
            l += usize::from(routed.hits[0].key == u64::from(t));
        }
        println!(
            "budget {b}: recall@1 plain {:.3} learned {:.3}",
            p as f64 / 2000.0,
            l as f64 / 2000.0
        );
    }
}
