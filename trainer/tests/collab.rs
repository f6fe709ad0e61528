//! The collaborative step against its oracle: N peers that accumulate their own micro-batches
//! and apply the sample-weighted mean of their gradients take exactly the step one process
//! takes on the union of the batches (within float summation error).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use colony_trainer::backend::CpuTrain;
use colony_trainer::collab::{LocalTrainer, TrainState};
use colony_trainer::data::mlm::{MlmBatch, Sampler, TokenizedCorpus};
use colony_trainer::data::text::Corpus;
use colony_trainer::data::tokenizer::TextTokenizer;
use colony_trainer::models::albert::{Albert, AlbertConfig};
use colony_trainer::optim::OptimizerConfig;
use colony_trainer::optim::lamb::LambConfig;
use colony_trainer::optim::schedule::Schedule;

type T = LocalTrainer<CpuTrain, Albert<CpuTrain>>;

const DOCS: [&str; 6] = [
    "The quick brown fox jumps over the lazy dog. The dog did not care at all.",
    "A stitch in time saves nine. Measure twice and cut once, said the tailor.",
    "To be or not to be, that is the question. Whether it is nobler to suffer.",
    "All that glitters is not gold. Often have you heard that told.",
    "The early bird catches the worm. But the second mouse gets the cheese.",
    "Rome was not built in a day. Yet it burned in one night.",
];

fn setup() -> (TokenizedCorpus, AlbertConfig) {
    let c = Corpus::from_documents(&DOCS);
    let t = TextTokenizer::train(c.texts(), 400).unwrap();
    let tc = TokenizedCorpus::new(&c, &t).unwrap();
    let mut cfg = AlbertConfig::tiny(tc.vocab);
    cfg.hidden = 32;
    cfg.embed = 16;
    cfg.intermediate = 64;
    cfg.layers = 2;
    (tc, cfg)
}

fn trainer(cfg: &AlbertConfig) -> T {
    trainer_at(cfg, 0.01)
}

fn trainer_at(cfg: &AlbertConfig, lr: f32) -> T {
    let dev = Default::default();
    LocalTrainer::new(
        cfg.init::<CpuTrain>(&dev),
        OptimizerConfig::Lamb(LambConfig::default()),
        Schedule::Constant(lr),
        b"test",
        dev,
    )
    .unwrap()
}

fn batches(tc: &TokenizedCorpus, peer: u8, step: u64, sizes: &[usize]) -> Vec<MlmBatch> {
    let s = Sampler {
        run_seed: 1,
        peer: vec![peer],
    };
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| s.batch(tc, step, i as u64, n, 32))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn n_peers_equal_one_process_with_the_global_batch() {
    let (tc, cfg) = setup();
    let mut single = trainer(&cfg);
    let init: TrainState = single.state();
    // Unequal peers: different numbers and sizes of micro-batches.
    let plan: [&[usize]; 3] = [&[4, 4], &[3], &[2, 2, 1]];
    let mut peers: Vec<T> = (0..3)
        .map(|_| {
            let mut t = trainer(&cfg);
            t.restore(init.clone()).unwrap();
            t
        })
        .collect();
    for step in 0..3u64 {
        let mut grads = Vec::new();
        for (p, sizes) in plan.iter().enumerate() {
            for b in batches(&tc, p as u8, step, sizes) {
                peers[p].accumulate(&b).unwrap();
                single.accumulate(&b).unwrap();
            }
            grads.push((peers[p].mean_gradient(), peers[p].samples()));
        }
        // The all-reduce's exact answer: the sample-weighted mean.
        let total: u64 = grads.iter().map(|g| g.1).sum();
        let avg: Vec<f32> = (0..grads[0].0.len())
            .map(|i| {
                (grads
                    .iter()
                    .map(|(g, n)| f64::from(g[i]) * *n as f64)
                    .sum::<f64>()
                    / total as f64) as f32
            })
            .collect();
        assert_eq!(single.samples(), total);
        let g1 = single.mean_gradient();
        assert!(
            max_diff(&avg, &g1) < 1e-5,
            "step {step}: gradients differ by {}",
            max_diff(&avg, &g1)
        );
        for p in &mut peers {
            p.apply(&avg).unwrap();
        }
        single.apply(&g1).unwrap();
        for p in &peers {
            assert_eq!(
                p.params(),
                peers[0].params(),
                "peers diverged at step {step}"
            );
            assert_eq!(p.epoch(), step + 1);
        }
        let d = max_diff(peers[0].params(), single.params());
        assert!(
            d < 1e-4,
            "step {step}: parameters differ from one process by {d}"
        );
    }
    assert_ne!(
        single.params(),
        init.params.as_slice(),
        "training changed nothing"
    );
}

#[test]
fn a_joiner_restored_from_a_snapshot_matches_after_the_next_step() {
    let (tc, cfg) = setup();
    let mut a = trainer(&cfg);
    for b in batches(&tc, 0, 0, &[4]) {
        a.accumulate(&b).unwrap();
    }
    let g = a.mean_gradient();
    a.apply(&g).unwrap();
    // The joiner has its own random init, then takes a's state through the wire format.
    let mut j = trainer(&cfg);
    assert_ne!(j.params(), a.params());
    let bytes = a.state().encode();
    j.restore(TrainState::decode(&bytes, usize::MAX).unwrap())
        .unwrap();
    assert_eq!(j.epoch(), 1);
    for b in batches(&tc, 0, 1, &[4]) {
        a.accumulate(&b).unwrap();
        j.accumulate(&b).unwrap();
    }
    let (ga, gj) = (a.mean_gradient(), j.mean_gradient());
    assert_eq!(ga, gj);
    a.apply(&ga).unwrap();
    j.apply(&gj).unwrap();
    assert_eq!(a.params(), j.params());
}

#[test]
fn state_of_another_model_or_a_bad_gradient_is_refused_and_changes_nothing() {
    let (_, cfg) = setup();
    let mut a = trainer(&cfg);
    let before = a.params().to_vec();
    let mut other = cfg.clone();
    other.hidden = 16;
    let b = trainer(&other);
    assert!(a.restore(b.state()).is_err());
    assert!(a.apply(&[0.0; 3]).is_err());
    let mut nan = vec![0.0; before.len()];
    nan[5] = f32::NAN;
    assert!(a.apply(&nan).is_err());
    assert_eq!(a.params(), before.as_slice());
    assert_eq!(a.epoch(), 0);
}

#[test]
fn loss_goes_down_when_training_alone() {
    let (tc, cfg) = setup();
    let mut t = trainer_at(&cfg, 0.05);
    let probe = batches(&tc, 9, 0, &[16]).remove(0);
    let first = {
        let l = t.accumulate(&probe).unwrap();
        t.reset_accumulator();
        l
    };
    for step in 0..30u64 {
        for b in batches(&tc, 0, step, &[8]) {
            t.accumulate(&b).unwrap();
        }
        let g = t.mean_gradient();
        t.apply(&g).unwrap();
    }
    let last = t.accumulate(&probe).unwrap();
    assert!(last < first - 0.2, "loss {first} -> {last}");
}

/// Delayed parameter updates: the step taken with a gradient while the next micro-batches
/// were accumulating equals the plain step, and keeps those micro-batches.
#[test]
fn a_delayed_step_keeps_the_next_micro_batches() {
    let (tc, cfg) = setup();
    let (mut a, mut b) = (trainer(&cfg), trainer(&cfg));
    b.restore(a.state()).unwrap();
    let now = batches(&tc, 0, 0, &[8]);
    let next = batches(&tc, 0, 1, &[4]);
    for t in [&mut a, &mut b] {
        t.accumulate(&now[0]).unwrap();
    }
    let g = a.mean_gradient();
    a.reset_accumulator();
    a.accumulate(&next[0]).unwrap();
    let pending = a.mean_gradient();
    a.apply_keeping_accumulator(&g).unwrap();
    b.apply(&g).unwrap();
    assert_eq!(a.params(), b.params());
    assert_eq!(a.epoch(), 1);
    assert_eq!(a.samples(), 4);
    assert_eq!(a.mean_gradient(), pending);
}
