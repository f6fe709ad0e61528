//! Editable Training on the real digits set (scripts/fetch-data.sh puts it in .cache/data):
//! editable training lowers drawdown against baseline training at equal success, model files
//! round-trip and refuse damage, and the patch chain is a function of the set of patches.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use colony_protocol::NodeKeypair;
use colony_protocol::patch::{Delta, Patch};
use colony_trainer::backend::{Cpu, CpuTrain};
use colony_trainer::data::images::ImageSet;
use colony_trainer::edit::chain::{StepFate, base_version, fold};
use colony_trainer::edit::model::{EditModel, Limits, ModelFile, check_patch, model_file};
use colony_trainer::edit::net::{Arch, features_of};
use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};
use colony_trainer::edit::{EditorConfig, eval};

fn digits() -> ImageSet {
    let p = colony_trainer::data::images::default_digits_path();
    ImageSet::digits(&p).unwrap_or_else(|e| {
        panic!("{e}: the digits set is fetched by scripts/fetch-data.sh (or set COLONY_DIGITS)")
    })
}

#[test]
fn editable_training_lowers_drawdown_against_baseline() {
    let set = digits();
    let (tr, te) = Digits::from_set(&set).unwrap().split(7, 0.2);
    let editor = EditorConfig::default();
    let device = Default::default();
    let mut stats = Vec::new();
    for mode in [Mode::Baseline, Mode::Editable] {
        let mut cfg = TrainConfig::new(Arch::Mlp, mode);
        cfg.epochs = 20;
        let (net, _) = train::<CpuTrain>(&cfg, &tr, &device);
        let f = features_of::<Cpu>(&net, &te.pixels, &device);
        let s = eval::evaluate(&net.plain_head(), &f, &te.labels, &editor, 200, 20, 3);
        eprintln!("{}: {s:?}", mode.name());
        assert!(
            s.base_error < 0.08,
            "{} base error {}",
            mode.name(),
            s.base_error
        );
        assert_eq!(s.success_rate, 1.0, "{}", mode.name());
        assert!(s.mean_steps <= 9.0);
        stats.push(s);
    }
    assert!(
        stats[1].drawdown < 0.75 * stats[0].drawdown,
        "editable drawdown {} vs baseline {}",
        stats[1].drawdown,
        stats[0].drawdown
    );
}

/// A small trained model saved to a file, loaded as a verifier would.
fn small_model(dir: &std::path::Path) -> (EditModel, PathBuf) {
    let set = digits();
    let (tr, _) = Digits::from_set(&set).unwrap().split(7, 0.2);
    let mut cfg = TrainConfig::new(Arch::Mlp, Mode::Editable);
    cfg.epochs = 20;
    let (net, _) = train::<CpuTrain>(&cfg, &tr, &Default::default());
    let file = model_file(&net, "editable", &cfg.editor, &set, 7, 0.2).unwrap();
    let path = dir.join("digits.edit");
    let id = file.save(&path).unwrap();
    let model = EditModel::load(&path, &set).unwrap();
    assert_eq!(model.id, id);
    (model, path)
}

fn make_patch(
    model: &EditModel,
    key: &NodeKeypair,
    sample: usize,
    target: u32,
    parent: ([u8; 32], u64),
    head: &colony_trainer::edit::Head,
) -> Patch {
    let set = digits();
    let d = Digits::from_set(&set).unwrap();
    let x = d.image(sample).to_vec();
    let out = model.solve(head, &x, target as usize).unwrap();
    assert!(out.success);
    Patch {
        model: model.id.clone(),
        parent: parent.0,
        parent_len: parent.1,
        request: colony_protocol::patch::hash(&[&[sample as u8, target as u8]]),
        sample: x,
        target,
        delta: out.delta,
        editor: model.editor.spec(),
        steps: out.steps,
        author: key.public(),
        created_ms: 1,
    }
}

#[test]
fn model_files_round_trip_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (model, path) = small_model(dir.path());
    let (file, id) = ModelFile::load(&path).unwrap();
    assert_eq!(id, model.id);
    assert_eq!(file.arch, Arch::Mlp);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = ModelFile::load(&path).unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
    std::fs::write(&path, b"hello").unwrap();
    let e = ModelFile::load(&path).unwrap_err().to_string();
    assert!(e.contains("not a Colony editable model"), "{e}");
}

#[test]
fn checks_accept_a_real_patch_and_name_what_is_wrong_with_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = small_model(dir.path());
    let key = NodeKeypair::from_secret([3; 32]);
    let base = base_version(&model.id);
    let d = Digits::from_set(&digits()).unwrap();
    let target = (d.labels[5] as u32 + 1) % 10;
    let p = make_patch(&model, &key, 5, target, (base, 0), &model.base);
    let limits = Limits::default();
    let v = check_patch(&model, &model.base, &p, &limits);
    assert!(v.accept, "{}", v.reason);
    assert!(colony_protocol::encode(&p, 1 << 20).unwrap().len() <= 2048);
    // A delta that makes the target win everywhere: the edit holds, drawdown is huge.
    let mut greedy = p.clone();
    greedy.delta = Delta::Rank1 {
        rows: vec![],
        h: vec![0.0; 128],
        bias: vec![(target, 1000.0)],
    };
    let v = check_patch(&model, &model.base, &greedy, &limits);
    assert!(!v.accept && v.reason.contains("drawdown"), "{}", v.reason);
    // The chain as a whole may not drift too far from the base.
    let strict = Limits {
        max_total_drawdown: -0.01,
        ..limits
    };
    let v = check_patch(&model, &model.base, &p, &strict);
    assert!(
        !v.accept && v.reason.contains("over the base"),
        "{}",
        v.reason
    );
    // A delta that does nothing: the edit does not hold.
    let mut idle = p.clone();
    idle.delta = Delta::Rank1 {
        rows: vec![],
        h: vec![0.0; 128],
        bias: vec![],
    };
    let v = check_patch(&model, &model.base, &idle, &limits);
    assert!(
        !v.accept && v.reason.contains("does not hold"),
        "{}",
        v.reason
    );
    // Wrong shapes and non-finite values.
    let mut wrong = p.clone();
    wrong.delta = Delta::Dense {
        w: vec![0.0; 3],
        b: vec![0.0; 10],
    };
    assert!(
        check_patch(&model, &model.base, &wrong, &limits)
            .reason
            .contains("shape")
    );
    let mut nan = p.clone();
    nan.sample[0] = f32::NAN;
    assert!(
        check_patch(&model, &model.base, &nan, &limits)
            .reason
            .contains("finite")
    );
    let mut other = p;
    other.model = "someone-else".into();
    assert!(
        check_patch(&model, &model.base, &other, &limits)
            .reason
            .contains("model")
    );
}

#[test]
fn the_chain_is_a_function_of_the_set_of_patches() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = small_model(dir.path());
    let d = Digits::from_set(&digits()).unwrap();
    let base = base_version(&model.id);
    let limits = Limits::default();
    let (a, b) = (
        NodeKeypair::from_secret([1; 32]),
        NodeKeypair::from_secret([2; 32]),
    );
    // Two concurrent patches on the base, made by two authors.
    let p1 = make_patch(
        &model,
        &a,
        10,
        (d.labels[10] as u32 + 1) % 10,
        (base, 0),
        &model.base,
    );
    let p2 = make_patch(
        &model,
        &b,
        20,
        (d.labels[20] as u32 + 2) % 10,
        (base, 0),
        &model.base,
    );
    let (i1, i2) = (p1.id().unwrap(), p2.id().unwrap());
    let set = |ps: &[(&[u8; 32], &Patch)]| -> BTreeMap<[u8; 32], Patch> {
        ps.iter().map(|(i, p)| (**i, (*p).clone())).collect()
    };
    let one = fold(
        &model,
        &set(&[(&i2, &p2), (&i1, &p1)]),
        &HashSet::new(),
        &limits,
    );
    let two = fold(
        &model,
        &set(&[(&i1, &p1), (&i2, &p2)]),
        &HashSet::new(),
        &limits,
    );
    assert_eq!(one.version, two.version);
    assert_eq!(one.len, 2, "{:?}", one.steps);
    assert_eq!(one.head, two.head);
    // Both edits hold on the final head.
    for p in [&p1, &p2] {
        let h = model.features(&p.sample);
        assert_eq!(one.head.predict(&h), p.target as usize);
    }
    // A third patch on top of the first version applies after both; rolling back the first
    // rebuilds the chain from the base without it.
    let v1 = one.steps[0].version;
    let h1 = one.heads[&v1].clone();
    let p3 = make_patch(&model, &a, 30, (d.labels[30] as u32 + 3) % 10, (v1, 1), &h1);
    let i3 = p3.id().unwrap();
    let all = set(&[(&i1, &p1), (&i2, &p2), (&i3, &p3)]);
    let three = fold(&model, &all, &HashSet::new(), &limits);
    assert_eq!(three.len, 3);
    let first = one.steps[0].patch;
    let back = fold(&model, &all, &HashSet::from([first]), &limits);
    assert_eq!(
        back.steps
            .iter()
            .filter(|s| s.fate == StepFate::RolledBack)
            .count(),
        1
    );
    assert_eq!(back.len, 2);
    // Rolling back a patch rolls back its request: a second answer to it is not applied.
    let mut dup1 = p1.clone();
    dup1.author = b.public();
    let idup1 = dup1.id().unwrap();
    let both = set(&[(&i1, &p1), (&idup1, &dup1), (&i2, &p2)]);
    let rb = fold(&model, &both, &HashSet::from([i1]), &limits);
    assert_eq!(rb.len, 1, "{:?}", rb.steps);
    assert_eq!(
        rb.steps
            .iter()
            .filter(|s| s.fate == StepFate::RolledBack)
            .count(),
        2
    );
    // A second answer to the same request is superseded.
    let mut dup = p2.clone();
    dup.author = a.public();
    let idup = dup.id().unwrap();
    let with_dup = fold(
        &model,
        &set(&[(&i1, &p1), (&i2, &p2), (&idup, &dup)]),
        &HashSet::new(),
        &limits,
    );
    assert_eq!(with_dup.len, 2);
    assert!(
        with_dup
            .steps
            .iter()
            .any(|s| s.fate == StepFate::Superseded)
    );
}

/// The editor on the ALBERT MLM head: make a masked position predict the token the model ranks
/// third (or lower); the line search takes at most one step per token above it or within the
/// margin, and the edited model's own forward pass then predicts it.
#[test]
fn the_editor_fixes_an_albert_mlm_prediction() {
    use colony_trainer::data::mlm::MlmBatch;
    use colony_trainer::edit::head::target_margin;
    use colony_trainer::models::albert::AlbertConfig;
    let device = Default::default();
    <Cpu as burn::prelude::Backend>::seed(&device, 7);
    let model = AlbertConfig::tiny(300).init::<Cpu>(&device);
    let tokens: Vec<i64> = vec![2, 17, 45, 4, 99, 120, 7, 3];
    let batch = MlmBatch {
        batch: 1,
        seq: 8,
        tokens: tokens.clone(),
        token_types: vec![0; 8],
        attention: vec![1.0; 8],
        masked_positions: vec![3],
        masked_targets: vec![0],
        masked_weights: vec![1.0],
        sop_labels: vec![0],
        edit: None,
    };
    let h: Vec<f32> = model
        .mlm_features(&batch, &device)
        .into_data()
        .iter::<f32>()
        .collect();
    let head = model.mlm_head();
    assert_eq!((head.out, head.inp), (300, h.len()));
    let z = head.logits(&h);
    let mut ranked: Vec<usize> = (0..z.len()).collect();
    ranked.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    let target = *ranked[2..]
        .iter()
        .find(|t| !tokens.contains(&(**t as i64)))
        .unwrap();
    // Each step of the line search settles one token that is above the target or within the
    // margin of it, and never unsettles one: at most that many steps.
    let cfg = EditorConfig::default();
    let above = (0..z.len())
        .filter(|&j| j != target && z[j] > z[target] - cfg.lr * cfg.margin)
        .count();
    let out = colony_trainer::edit::edit(&head, &h, target, &cfg);
    assert!(out.success, "margin {}", out.margin);
    assert!(
        out.steps as usize <= above,
        "{} steps for {above} tokens above",
        out.steps
    );
    let Delta::Rank1 { rows, .. } = &out.delta else {
        panic!("not rank one")
    };
    assert!(rows.len() <= above + 1);
    let edited = head.apply(&out.delta).unwrap();
    assert!(target_margin(&edited.logits(&h), target).0 > 0.0);
    // Through burn: the edited model's decoder at that position now answers the target (the
    // touched embedding rows are not in the input, so the features are unchanged).
    let model = model.with_mlm_head(&edited);
    let h2 = model.mlm_features(&batch, &device);
    let logits: Vec<f32> = h2
        .matmul(burn_weights(&edited, &device))
        .into_data()
        .iter::<f32>()
        .collect();
    let z2: Vec<f32> = logits.iter().zip(&edited.b).map(|(a, b)| a + b).collect();
    assert_eq!(colony_trainer::edit::head::argmax(&z2), target);
}

fn burn_weights(
    head: &colony_trainer::edit::Head,
    device: &burn::tensor::Device<Cpu>,
) -> burn::tensor::Tensor<Cpu, 2> {
    burn::tensor::Tensor::<Cpu, 2>::from_data(
        burn::tensor::TensorData::new(head.w.clone(), [head.out, head.inp]),
        device,
    )
    .transpose()
}

/// Editable Training of ALBERT's MLM head: a batch with an edit request adds the edit and
/// locality terms to the loss (exactly `loss − plain loss`), and the gradient reaches the
/// encoder through the locality term and the edit.
#[test]
fn albert_editable_training_adds_differentiable_edit_terms() {
    use burn::module::Module;
    use colony_trainer::data::mlm::{Sampler, TokenizedCorpus};
    use colony_trainer::data::text::Corpus;
    use colony_trainer::data::tokenizer::TextTokenizer;
    use colony_trainer::models::albert::AlbertConfig;
    let docs = [
        "The quick brown fox jumps. It lands on the lazy dog. The dog wakes up.",
        "A stitch in time saves nine. Measure twice, cut once. Then measure again.",
        "Only one sentence here with several words in it. And another one follows.",
    ];
    let c = Corpus::from_documents(&docs);
    let t = TextTokenizer::train(c.texts(), 300).unwrap();
    let tc = TokenizedCorpus::new(&c, &t).unwrap();
    let s = Sampler {
        run_seed: 3,
        peer: vec![1],
    };
    let plain = s.batch(&tc, 0, 0, 4, 32);
    let edited = s.editable_batch(&tc, 0, 0, 4, 32, 0.5);
    assert_eq!(plain.tokens, edited.tokens);
    let e = edited.edit.clone().expect("an edit request");
    assert_ne!(i64::from(e.target), edited.masked_targets[e.masked]);
    let device = Default::default();
    let model = AlbertConfig::tiny(tc.vocab).init::<CpuTrain>(&device);
    let a = model.forward_loss(&plain, &device);
    let b = model.forward_loss(&edited, &device);
    assert!(a.edit_loss.is_none());
    let terms: f32 = b.edit_loss.clone().unwrap().into_scalar();
    let diff = b.loss.clone().into_scalar() - a.loss.into_scalar();
    assert!(terms.is_finite() && terms >= 0.0);
    assert!((diff - terms).abs() < 1e-4, "{diff} vs {terms}");
    // The terms alone have a gradient on the encoder's shared layer and the MLM transform.
    let grads = b.edit_loss.unwrap().backward();
    let mut nonzero = 0;
    let params = colony_trainer::params::flatten_grads(&model, &grads).unwrap();
    for g in &params {
        if *g != 0.0 {
            nonzero += 1;
        }
    }
    assert!(nonzero > 1000, "{nonzero} non-zero gradient entries");
    let _ = model.num_params();
}

/// The deeper editable block (the body's last layer with the head, first-order Editable
/// Training, Polyak-step editor): success within k steps, lower drawdown than baseline.
#[test]
fn first_order_block_editing_lowers_drawdown_against_baseline() {
    use colony_trainer::edit::block::evaluate_block;
    let (tr, te) = Digits::from_set(&digits()).unwrap().split(7, 0.2);
    let editor = EditorConfig::default();
    let mut dd = Vec::new();
    for mode in [Mode::Baseline, Mode::Editable] {
        let mut cfg = TrainConfig::new(Arch::Mlp, mode);
        cfg.epochs = 20;
        cfg.block = true;
        let (net, _) = train::<CpuTrain>(&cfg, &tr, &Default::default());
        let s = evaluate_block::<CpuTrain>(&net, &te.pixels, &te.labels, &editor, 100, 3);
        eprintln!("{}: {s:?}", mode.name());
        assert_eq!(s.success_rate, 1.0, "{}", mode.name());
        assert!(s.mean_steps <= editor.max_steps as f32);
        dd.push(s.drawdown);
    }
    assert!(
        dd[1] < 0.75 * dd[0],
        "editable {} vs baseline {}",
        dd[1],
        dd[0]
    );
}
