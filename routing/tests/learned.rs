//! Learned routing on real vectors: trained on 20K GloVe vectors, it beats plain routing on the
//! same graph at the same budget of distance computations, on held-out queries; the routing
//! file round-trips and belongs to its index only.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use colony_routing::data::{Matrix, read_vectors};
use colony_routing::hnsw::brute_force;
use colony_routing::learned::{Routed, Routing};
use colony_routing::train::{TrainConfig, train, verify_for};
use colony_routing::{Hnsw, Metric, Params, Query};
use rand::SeedableRng;
use rand::seq::SliceRandom;

const BASE: usize = 20_000;
const QUERIES: usize = 1_000;
const BUDGET: usize = 128;

fn split() -> (Matrix<f32>, Matrix<f32>) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/glove-6b-50d.npy");
    let g = read_vectors(&p).unwrap_or_else(|e| panic!("{e} (run scripts/fetch-data.sh)"));
    let mut order: Vec<usize> = (0..BASE + QUERIES).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    let pick = |rows: &[usize]| Matrix {
        n: rows.len(),
        dim: g.dim,
        data: rows.iter().flat_map(|&r| g.row(r).to_vec()).collect(),
    };
    (pick(&order[..BASE]), pick(&order[BASE..]))
}

#[test]
fn learned_routing_beats_plain_routing_at_the_same_budget() {
    let (base, queries) = split();
    let dim = base.dim;
    let h = Hnsw::build(&base.data, dim, Metric::L2, Params::with_m(8)).unwrap();
    let cfg = TrainConfig {
        dim: 16,
        budgets: vec![BUDGET],
        rounds: 1,
        queries_per_round: 1000,
        steps_per_round: 150,
        dev: 300,
        ..TrainConfig::default()
    };
    let trained = train(&h, &cfg, |r| eprintln!("{r:?}")).unwrap();
    let truth: Vec<u64> = (0..queries.n)
        .map(|i| u64::from(brute_force(&base.data, dim, Metric::L2, queries.row(i), 1)[0]))
        .collect();
    let rq = Routed {
        k: 1,
        max_dcs: BUDGET,
        verify: verify_for(BUDGET, cfg.verify),
    };
    let (mut plain, mut learned, mut start) = (0, 0, 0);
    for (i, &t) in truth.iter().enumerate() {
        let q = queries.row(i);
        let p = h
            .search(
                q,
                &Query {
                    max_dcs: Some(BUDGET),
                    bottom_only: true,
                    ..Query::top(1, usize::MAX / 4)
                },
            )
            .unwrap();
        assert!(p.dcs <= BUDGET);
        plain += usize::from(p.hits[0].key == t);
        let l = h.search_routed(&trained.routing, q, &rq).unwrap();
        assert!(
            l.dcs <= BUDGET,
            "{} distance computations over {BUDGET}",
            l.dcs
        );
        learned += usize::from(l.hits[0].key == t);
        let s = h.search_routed(&trained.start, q, &rq).unwrap();
        start += usize::from(s.hits[0].key == t);
    }
    let n = queries.n as f64;
    let (plain, learned, start) = (plain as f64 / n, learned as f64 / n, start as f64 / n);
    eprintln!(
        "DCS {BUDGET}: recall@1 plain {plain:.3}, untrained subspace {start:.3}, learned {learned:.3} (round {})",
        trained.round
    );
    assert!(
        learned >= plain + 0.05,
        "learned {learned:.3} is not 5 points over plain {plain:.3}"
    );
    // The kept round is the best on the dev queries, so never below the start there.
    let dev0 = trained.dev[0].learned;
    assert!(dev0 >= 0.0 && trained.dev[0].budget == BUDGET);

    // The routing file: round trip, and refused for another index or when damaged.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.route");
    trained.routing.save(&h, &path).unwrap();
    assert_eq!(Routing::load(&h, &path).unwrap(), trained.routing);
    let other = Hnsw::build(&base.data[..dim * 500], dim, Metric::L2, Params::with_m(8)).unwrap();
    let e = Routing::load(&other, &path).unwrap_err().to_string();
    assert!(e.contains("another index"), "{e}");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let e = Routing::load(&h, &path).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
}
