//! The deeper editable block (body's last layer + head, first-order): baseline vs editable.
//! `cargo run --release -p colony-trainer --example edit_block -- [mlp|cnn] [epochs] [c]`
#![allow(clippy::unwrap_used)]

use colony_trainer::backend::CpuTrain;
use colony_trainer::data::images::ImageSet;
use colony_trainer::edit::EditorConfig;
use colony_trainer::edit::block::evaluate_block;
use colony_trainer::edit::net::Arch;
use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arch = Arch::named(a.get(1).map_or("mlp", |s| s)).unwrap();
    let epochs: usize = a.get(2).map_or(30, |s| s.parse().unwrap());
    let c: f32 = a.get(3).map_or(1.0, |s| s.parse().unwrap());
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/digits.csv.gz");
    let all = Digits::from_set(&ImageSet::digits(&path).unwrap()).unwrap();
    let (tr, te) = all.split(7, 0.2);
    let editor = EditorConfig::default();
    for mode in [Mode::Baseline, Mode::Editable] {
        let mut cfg = TrainConfig::new(arch, mode);
        cfg.epochs = epochs;
        cfg.c_edit = c;
        cfg.c_loc = c;
        cfg.block = true;
        let t0 = std::time::Instant::now();
        let (net, _) = train::<CpuTrain>(&cfg, &tr, &Default::default());
        let secs = t0.elapsed().as_secs_f32();
        let s = evaluate_block::<CpuTrain>(&net, &te.pixels, &te.labels, &editor, 300, 3);
        println!("{} {:?} {secs:.1}s\n  {s:?}", mode.name(), arch);
    }
}
