//! The patch chain: the adopted state of a model as a deterministic function of the *set* of
//! accepted patches (and the set of rolled-back ones), so that nodes that learnt of the same
//! patches in different orders end at the same version.
//!
//! Fold: sort the accepted patches by `(parent_len, patch_id)`; walk them from the base. A patch
//! whose parent is the current version applies as verified. A patch made on another version (a
//! concurrent patch) is re-checked on top of the current head and applies only if it still
//! passes. If its edit no longer holds there, every node re-runs the editor on the same
//! sample from the patched head (a deterministic computation, so all nodes get the same
//! result) and applies that if it passes the checks; a second patch answering a request that already has an applied answer is
//! superseded. Each applied patch moves the version to `H(version ‖ patch_id)`.

use std::collections::{BTreeMap, HashMap, HashSet};

use colony_protocol::patch::{Hash32, Patch, next_version};

use super::head::Head;
use super::model::{EditModel, Limits, check_patch};

#[derive(Clone, Debug, PartialEq)]
pub enum StepFate {
    Applied,
    /// Made on another version; on top of the current head its edit no longer held, so the
    /// editor ran again from the patch's result (`steps` more steps) and the result passed.
    Rebased {
        steps: u32,
    },
    /// Re-checked on top of earlier patches and failed.
    Conflict(String),
    /// Another patch already answers the same request.
    Superseded,
    RolledBack,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChainStep {
    pub patch: Hash32,
    pub fate: StepFate,
    /// The version after this step (unchanged unless applied).
    pub version: Hash32,
}

#[derive(Clone, Debug)]
pub struct Chain {
    pub base: Hash32,
    pub version: Hash32,
    /// Patches applied.
    pub len: u64,
    pub head: Head,
    pub steps: Vec<ChainStep>,
    /// Every version on the chain (the base included) and its length.
    pub versions: HashMap<Hash32, u64>,
    /// The head at every version on the chain (for checking patches made on an older one).
    pub heads: HashMap<Hash32, Head>,
    /// The applied edits in chain order: the sample's features and the target. The first `n`
    /// are the edits of the version of length `n`.
    pub edits: Vec<(Vec<f32>, usize)>,
}

/// The first of `edits` that `head` no longer answers, if any.
pub fn broken_edit(head: &Head, edits: &[(Vec<f32>, usize)]) -> Option<usize> {
    edits.iter().position(|(h, t)| head.predict(h) != *t)
}

/// A model's base version: its id's bytes (hex-decoded), or their hash if the id is not hex.
pub fn base_version(model_id: &str) -> Hash32 {
    match hex::decode(model_id) {
        Ok(b) if b.len() == 32 => b.try_into().unwrap_or([0; 32]),
        _ => colony_protocol::patch::hash(&[model_id.as_bytes()]),
    }
}

/// Folds `accepted` (patch id → patch) over the model's base head.
pub fn fold(
    model: &EditModel,
    accepted: &BTreeMap<Hash32, Patch>,
    rolled_back: &HashSet<Hash32>,
    limits: &Limits,
) -> Chain {
    let base = base_version(&model.id);
    let mut order: Vec<(&Hash32, &Patch)> = accepted.iter().collect();
    order.sort_by_key(|(id, p)| (p.parent_len, **id));
    let mut head = model.base.clone();
    let mut version = base;
    let mut len = 0u64;
    let mut versions = HashMap::from([(base, 0u64)]);
    let mut heads = HashMap::from([(base, head.clone())]);
    let mut answered = HashSet::new();
    // Rolling a patch back rolls its request back: other answers to it are not applied.
    let revoked: HashSet<Hash32> = accepted
        .iter()
        .filter(|(id, _)| rolled_back.contains(*id))
        .map(|(_, p)| p.request)
        .collect();
    let mut steps = Vec::new();
    let mut edits: Vec<(Vec<f32>, usize)> = Vec::new();
    for (id, p) in order {
        let fate = if rolled_back.contains(id) || revoked.contains(&p.request) {
            StepFate::RolledBack
        } else if answered.contains(&p.request) {
            StepFate::Superseded
        } else {
            let next = if p.parent == version {
                head.apply(&p.delta)
                    .map(|h| (h, StepFate::Applied))
                    .map_err(|e| e.to_string())
            } else {
                rebase(model, &head, p, limits, &edits)
            };
            match next {
                Ok((h, fate)) => match broken_edit(&h, &edits) {
                    Some(k) => StepFate::Conflict(format!("it undoes edit {} of the chain", k + 1)),
                    None => {
                        head = h;
                        fate
                    }
                },
                Err(why) => StepFate::Conflict(why),
            }
        };
        if matches!(fate, StepFate::Applied | StepFate::Rebased { .. }) {
            answered.insert(p.request);
            edits.push((model.features(&p.sample), p.target as usize));
            version = next_version(&version, id);
            len += 1;
            versions.insert(version, len);
            heads.insert(version, head.clone());
        }
        steps.push(ChainStep {
            patch: *id,
            fate,
            version,
        });
    }
    Chain {
        base,
        version,
        len,
        head,
        steps,
        versions,
        heads,
        edits,
    }
}

/// Re-checks a patch made on another version on top of `head`; re-runs the editor from the
/// patched head when only the edit's margin was lost.
///
/// When the patch breaks earlier edits of the chain (or loses its own), the editor runs again
/// on each broken edit in chain order, the patch's own last, for up to three rounds: the
/// repaired head applies if every edit then holds and the drawdown stays under the limit.
fn rebase(
    model: &EditModel,
    head: &Head,
    p: &Patch,
    limits: &Limits,
    earlier: &[(Vec<f32>, usize)],
) -> Result<(Head, StepFate), String> {
    let v = check_patch(model, head, p, limits);
    if v.accept && broken_edit(v.head.as_ref().unwrap_or(head), earlier).is_none() {
        return v.head.map(|h| (h, StepFate::Applied)).ok_or(v.reason);
    }
    let Some(next) = v.head.filter(|_| {
        v.accept || (v.margin < limits.min_margin && v.drawdown <= limits.max_drawdown)
    }) else {
        return Err(v.reason);
    };
    let mut all = earlier.to_vec();
    all.push((model.features(&p.sample), p.target as usize));
    let (next, steps) = repair(model, next, &all, limits).map_err(|e| format!("rebase: {e}"))?;
    let drawdown = model.error(&next) - model.error(head);
    if drawdown > limits.max_drawdown {
        return Err(format!(
            "rebase: drawdown {:.2}% on the control set",
            drawdown * 100.0
        ));
    }
    Ok((next, StepFate::Rebased { steps }))
}

/// Re-runs the editor on every edit of `all` that `head` no longer answers with the margin, in
/// order, for up to three rounds; the repaired head and the steps taken, or which edit still
/// fails.
pub fn repair(
    model: &EditModel,
    mut head: Head,
    all: &[(Vec<f32>, usize)],
    limits: &Limits,
) -> Result<(Head, u32), String> {
    let mut steps = 0;
    for _round in 0..3 {
        let mut fixed = true;
        for (h, t) in all {
            let (m, _) = super::head::target_margin(&head.logits(h), *t);
            if m < limits.min_margin {
                fixed = false;
                let out = super::edit(&head, h, *t, &model.editor);
                steps += out.steps;
                head = head.apply(&out.delta).map_err(|e| e.to_string())?;
            }
        }
        if fixed {
            break;
        }
    }
    if let Some(k) = all
        .iter()
        .position(|(h, t)| super::head::target_margin(&head.logits(h), *t).0 < limits.min_margin)
    {
        return Err(format!(
            "edit {} of the chain does not hold after re-editing",
            k + 1
        ));
    }
    Ok((head, steps))
}

/// What a solver publishes for `sample → target` on a version with head `head` and edits
/// `earlier`: the editor's rank-one delta when it leaves every earlier edit holding; otherwise
/// the earlier edits broken by it are re-edited jointly (see [`repair`]) and the delta is the
/// whole change to the head (dense). Returns the delta and the editor steps taken.
pub fn solve_on_chain(
    model: &EditModel,
    head: &Head,
    earlier: &[(Vec<f32>, usize)],
    sample: &[f32],
    target: usize,
    limits: &Limits,
) -> Result<(colony_protocol::patch::Delta, u32), String> {
    let out = model.solve(head, sample, target)?;
    if !out.success {
        return Err(format!(
            "the editor did not fix the sample in {} steps",
            out.steps
        ));
    }
    let next = head.apply(&out.delta).map_err(|e| e.to_string())?;
    if broken_edit(&next, earlier).is_none() {
        return Ok((out.delta, out.steps));
    }
    let mut all = earlier.to_vec();
    all.push((model.features(sample), target));
    let (fixed, extra) = repair(model, next, &all, limits)?;
    let steps = out.steps + extra;
    if steps > limits.max_steps {
        return Err(format!(
            "keeping the earlier fixes needs {steps} editor steps (at most {})",
            limits.max_steps
        ));
    }
    let w = fixed.w.iter().zip(&head.w).map(|(a, b)| a - b).collect();
    let b = fixed.b.iter().zip(&head.b).map(|(a, b)| a - b).collect();
    Ok((colony_protocol::patch::Delta::Dense { w, b }, steps))
}
