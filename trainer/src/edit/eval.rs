//! The paper's edit metrics, on a frozen body: every edit changes only the head, so the test
//! set's features are computed once and each edited head is evaluated in plain f32.
//!
//! - success rate: share of edits whose target wins by the margin within `max_steps`;
//! - mean steps: gradient steps per edit;
//! - drawdown: mean increase of the test error after one edit, each edit applied to the
//!   unedited model;
//! - sequential drawdown: the test error increase after `sequential` edits applied one on top
//!   of the other (what a swarm that adopts patches does), not measured by the paper.
//!
//! Edit samples are test images given a wrong label, so an edit that holds makes its own image
//! "wrong" by construction: both drawdowns are measured on the test images that were *not*
//! edited (for one edit this changes little, 1 image in 360; for 100 sequential edits it
//! removes a floor of ~28 points that says nothing about locality).

use rand::{Rng, SeedableRng};

use super::editor::{EditorConfig, edit};
use super::head::Head;
use super::net::{CLASSES, HIDDEN};

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct EditStats {
    pub edits: usize,
    pub base_error: f32,
    pub success_rate: f32,
    pub mean_steps: f32,
    pub drawdown: f32,
    pub sequential_edits: usize,
    pub sequential_drawdown: f32,
    pub sequential_success_rate: f32,
}

/// One edit request: the test image `index` should be classified as `target` (never its label).
pub fn edit_requests(labels: &[usize], n: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let i = rng.gen_range(0..labels.len());
            (i, (labels[i] + rng.gen_range(1..CLASSES)) % CLASSES)
        })
        .collect()
}

/// Edit metrics for `head` over test features/labels: `edits` independent edits and one chain of
/// `sequential` edits.
pub fn evaluate(
    head: &Head,
    features: &[f32],
    labels: &[usize],
    editor: &EditorConfig,
    edits: usize,
    sequential: usize,
    seed: u64,
) -> EditStats {
    let base_error = head.error(features, labels);
    let feat = |i: usize| &features[i * HIDDEN..(i + 1) * HIDDEN];
    // Error of `h` over the test images not in `skip`.
    let err_without = |h: &Head, skip: &[usize]| -> f64 {
        let pred = h.predict_all(features);
        let (mut wrong, mut n) = (0usize, 0usize);
        for (k, (p, y)) in pred.iter().zip(labels).enumerate() {
            if !skip.contains(&k) {
                n += 1;
                wrong += usize::from(p != y);
            }
        }
        wrong as f64 / n.max(1) as f64
    };
    let (mut ok, mut steps, mut dd) = (0usize, 0u64, 0.0f64);
    let reqs = edit_requests(labels, edits, seed);
    for &(i, t) in &reqs {
        let out = edit(head, feat(i), t, editor);
        ok += usize::from(out.success);
        steps += u64::from(out.steps);
        let edited = head.apply(&out.delta).unwrap_or_else(|_| head.clone());
        dd += err_without(&edited, &[i]) - err_without(head, &[i]);
    }
    let mut cur = head.clone();
    let mut seq_ok = 0;
    let chain = edit_requests(labels, sequential, seed ^ 0x5eed);
    for &(i, t) in &chain {
        let out = edit(&cur, feat(i), t, editor);
        seq_ok += usize::from(out.success);
        cur = cur.apply(&out.delta).unwrap_or(cur);
    }
    let edited: Vec<usize> = chain.iter().map(|r| r.0).collect();
    EditStats {
        edits,
        base_error,
        success_rate: ok as f32 / edits.max(1) as f32,
        mean_steps: steps as f32 / edits.max(1) as f32,
        drawdown: (dd / edits.max(1) as f64) as f32,
        sequential_edits: sequential,
        sequential_drawdown: (err_without(&cur, &edited) - err_without(head, &edited)) as f32,
        sequential_success_rate: seq_ok as f32 / sequential.max(1) as f32,
    }
}
