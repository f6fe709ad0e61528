//! Baseline vs Editable Training on scikit-learn's digits, then the edit metrics.
//! `cargo run --release -p colony-trainer --example edit -- [mlp|cnn] [epochs] [c_edit] [c_loc]
//! [editor] [lr] [head|block]` (editor: line-search, scaled, sgd, momentum, rmsprop; `block`:
//! the body's last layer with the head, first-order, Polyak steps whatever the editor).
//! Prints, per training, the mean |h|² of the control features and how many of the 128 units
//! are active on average, then the edit metrics.
#![allow(clippy::unwrap_used)]

use colony_trainer::backend::{Cpu, CpuTrain};
use colony_trainer::data::images::{ImageSet, default_digits_path};
use colony_trainer::edit::block::evaluate_block;
use colony_trainer::edit::net::{Arch, features_of};
use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};
use colony_trainer::edit::{EditorConfig, eval};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arch = Arch::named(a.get(1).map_or("mlp", |s| s)).unwrap();
    let epochs: usize = a.get(2).map_or(30, |s| s.parse().unwrap());
    let c_edit: f32 = a.get(3).map_or(1.0, |s| s.parse().unwrap());
    let c_loc: f32 = a.get(4).map_or(1.0, |s| s.parse().unwrap());
    let kind = EditorConfig::kind_named(a.get(5).map_or("line-search", |s| s)).unwrap();
    let lr: f32 = a.get(6).map_or(1.05, |s| s.parse().unwrap());
    let block = a.get(7).is_some_and(|s| s == "block");
    let all = Digits::from_set(&ImageSet::digits(&default_digits_path()).unwrap()).unwrap();
    let (tr, te) = all.split(7, 0.2);
    let device = Default::default();
    let editor = EditorConfig {
        kind,
        lr,
        ..Default::default()
    };
    for mode in [Mode::Baseline, Mode::Editable] {
        let mut cfg = TrainConfig::new(arch, mode);
        cfg.epochs = epochs;
        cfg.c_edit = c_edit;
        cfg.c_loc = c_loc;
        cfg.editor = editor;
        cfg.block = block;
        let t0 = std::time::Instant::now();
        let (net, rep) = train::<CpuTrain>(&cfg, &tr, &device);
        let secs = t0.elapsed().as_secs_f32();
        let f = features_of::<Cpu>(&net, &te.pixels, &device);
        let n = te.labels.len() as f32;
        let hh = f.iter().map(|x| x * x).sum::<f32>() / n;
        let active = f.iter().filter(|x| **x > 0.0).count() as f32 / n;
        let s = if block {
            evaluate_block::<CpuTrain>(&net, &te.pixels, &te.labels, &editor, 300, 3)
        } else {
            eval::evaluate(&net.plain_head(), &f, &te.labels, &editor, 1000, 100, 3)
        };
        println!(
            "{} {:?} {secs:.1}s {rep:?} mean |h|^2 {hh:.1}, active units {active:.1}\n  {s:?}",
            mode.name(),
            arch
        );
    }
}
