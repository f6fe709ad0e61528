//! Optimizers on flat parameter vectors (see `params`): LAMB (ALBERT) and LARS (SwAV), with
//! learning-rate schedules keyed to the global step. Their state is plain vectors, so a state
//! snapshot is exact and the same on every peer.

pub mod lamb;
pub mod lars;
pub mod schedule;

use serde::{Deserialize, Serialize};

use crate::params::Layout;

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OptimizerConfig {
    Lamb(lamb::LambConfig),
    Lars(lars::LarsConfig),
}

/// Optimizer state: the step count and one or two moment vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// Steps taken so far (the global step).
    pub step: u64,
    pub first: Vec<f32>,
    /// Empty for LARS.
    pub second: Vec<f32>,
}

impl OptimizerConfig {
    pub fn init_state(&self, total: usize) -> OptimizerState {
        OptimizerState {
            step: 0,
            first: vec![0.0; total],
            second: match self {
                Self::Lamb(_) => vec![0.0; total],
                Self::Lars(_) => Vec::new(),
            },
        }
    }

    /// One step at learning rate `lr` on `params` with gradient `grad`.
    pub fn step(
        &self,
        layout: &Layout,
        params: &mut [f32],
        grad: &[f32],
        state: &mut OptimizerState,
        lr: f32,
    ) {
        match self {
            Self::Lamb(c) => lamb::step(c, layout, params, grad, state, lr),
            Self::Lars(c) => lars::step(c, layout, params, grad, state, lr),
        }
    }
}

pub(crate) fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}
