//! Baseline vs Editable Training on scikit-learn's digits, then the edit metrics.
//! `cargo run --release -p colony-trainer --example edit -- [mlp|cnn] [epochs] [c_edit] [c_loc] [lr]`
#![allow(clippy::unwrap_used)]

use colony_trainer::backend::{Cpu, CpuTrain};
use colony_trainer::data::images::ImageSet;
use colony_trainer::edit::net::{Arch, features_of};
use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};
use colony_trainer::edit::{EditorConfig, eval};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arch = Arch::named(a.get(1).map_or("mlp", |s| s)).unwrap();
    let epochs: usize = a.get(2).map_or(30, |s| s.parse().unwrap());
    let c_edit: f32 = a.get(3).map_or(1.0, |s| s.parse().unwrap());
    let c_loc: f32 = a.get(4).map_or(1.0, |s| s.parse().unwrap());
    let lr: f32 = a.get(5).map_or(0.01, |s| s.parse().unwrap());
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/digits.csv.gz");
    let set = ImageSet::digits(&path).unwrap();
    let all = Digits::from_set(&set).unwrap();
    let (tr, te) = all.split(7, 0.2);
    let device = Default::default();
    let editor = EditorConfig {
        lr,
        ..Default::default()
    };
    for mode in [Mode::Baseline, Mode::Editable] {
        let mut cfg = TrainConfig::new(arch, mode);
        cfg.epochs = epochs;
        cfg.c_edit = c_edit;
        cfg.c_loc = c_loc;
        cfg.editor = editor;
        let t0 = std::time::Instant::now();
        let (net, rep) = train::<CpuTrain>(&cfg, &tr, &device);
        let secs = t0.elapsed().as_secs_f32();
        let f = features_of::<Cpu>(&net, &te.pixels, &device);
        let s = eval::evaluate(&net.plain_head(), &f, &te.labels, &editor, 1000, 100, 3);
        println!("{} {:?} {secs:.1}s {rep:?}\n  {s:?}", mode.name(), arch);
    }
}
