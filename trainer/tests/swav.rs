//! SwAV on the real digits set (scripts/fetch-data.sh puts it in .cache/data): the loss falls,
//! frozen prototypes stay put, and peers averaging their micro-batch gradients equal one
//! process accumulating the same micro-batches.
#![allow(clippy::unwrap_used)]

use colony_trainer::collab::{SwavTrainer, swav_cpu};
use colony_trainer::data::images::{Augment, ImageSet, SwavBatch};
use colony_trainer::data::mlm::Sampler;
use colony_trainer::models::swav::SwavConfig;
use colony_trainer::optim::OptimizerConfig;
use colony_trainer::optim::lars::LarsConfig;
use colony_trainer::optim::schedule::Schedule;

fn digits() -> ImageSet {
    let p = colony_trainer::data::images::default_digits_path();
    ImageSet::digits(&p).unwrap_or_else(|e| {
        panic!("{e}: the digits set is fetched by scripts/fetch-data.sh (or set COLONY_DIGITS)")
    })
}

fn trainer(cfg: &SwavConfig, lr: f32) -> SwavTrainer {
    swav_cpu(
        cfg,
        OptimizerConfig::Lars(LarsConfig::default()),
        Schedule::Constant(lr),
        b"digits",
        7,
    )
    .unwrap()
}

fn batch(set: &ImageSet, peer: u8, step: u64, index: u64, size: usize) -> SwavBatch {
    Sampler {
        run_seed: 3,
        peer: vec![peer],
    }
    .views(set, &Augment::digits(), step, index, size)
}

#[test]
fn swav_loss_goes_down_on_digits() {
    let set = digits();
    assert_eq!(set.len(), 1797);
    let mut cfg = SwavConfig::named("small", 1).unwrap();
    // SwAV keeps the prototypes fixed through the first epoch: without that, this small model
    // at a high rate drifts the prototypes together and the loss sinks to ln K (uniform
    // predictions), which is a collapse, not learning.
    cfg.freeze_prototypes_steps = 1000;
    let mut t = trainer(&cfg, 0.6);
    let probe: Vec<SwavBatch> = (0..2).map(|i| batch(&set, 9, 0, i, 64)).collect();
    let probe_loss = |t: &mut SwavTrainer| {
        let l: f32 = probe.iter().map(|b| t.accumulate(b).unwrap()).sum::<f32>() / 2.0;
        t.reset_accumulator();
        l
    };
    let first = probe_loss(&mut t);
    let prototypes = |t: &SwavTrainer| {
        let p = t.params();
        p[p.len() - 32 * 100..].to_vec()
    };
    let p0 = prototypes(&t);
    for step in 0..25u64 {
        t.accumulate(&batch(&set, 0, step, 0, 32)).unwrap();
        let g = t.mean_gradient();
        t.apply(&g).unwrap();
    }
    let last = probe_loss(&mut t);
    assert!(last < first - 0.5, "loss {first} -> {last}");
    assert_eq!(prototypes(&t), p0, "frozen prototypes moved");
}

/// Peers each accumulating their micro-batches, then averaging the mean gradients weighted by
/// samples, take the same step as one process accumulating all of them; after the freeze the
/// prototypes move and stay unit-norm.
#[test]
fn swav_peers_equal_one_process_and_keep_prototypes_unit() {
    let set = digits();
    let mut cfg = SwavConfig::named("small", 1).unwrap();
    cfg.freeze_prototypes_steps = 1;
    let (mut a, mut b, mut one) = (trainer(&cfg, 0.6), trainer(&cfg, 0.6), trainer(&cfg, 0.6));
    for step in 0..2u64 {
        let (ba, bb) = (batch(&set, 1, step, 0, 8), batch(&set, 2, step, 0, 24));
        a.accumulate(&ba).unwrap();
        b.accumulate(&bb).unwrap();
        one.accumulate(&ba).unwrap();
        one.accumulate(&bb).unwrap();
        let (ga, gb) = (a.mean_gradient(), b.mean_gradient());
        let avg: Vec<f32> = ga
            .iter()
            .zip(&gb)
            .map(|(x, y)| (x * 8.0 + y * 24.0) / 32.0)
            .collect();
        a.apply(&avg).unwrap();
        b.apply(&avg).unwrap();
        let g = one.mean_gradient();
        one.apply(&g).unwrap();
        assert_eq!(a.params(), b.params());
        let diff = a
            .params()
            .iter()
            .zip(one.params())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "step {step}: {diff}");
    }
    let p = a.params();
    let w = &p[p.len() - 32 * 100..];
    let fresh = trainer(&cfg, 0.6);
    assert_ne!(
        w,
        &fresh.params()[p.len() - 32 * 100..],
        "prototypes did not move"
    );
    for col in 0..100 {
        let n: f32 = (0..32).map(|r| w[r * 100 + col].powi(2)).sum();
        assert!((n - 1.0).abs() < 1e-5, "prototype {col} has norm² {n}");
    }
}
