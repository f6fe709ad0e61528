//! Masked-language-model + sentence-order-prediction examples (ALBERT pretraining).
//!
//! An example is `[CLS] A [SEP] B [SEP]` where A and B are consecutive spans of one document's
//! sentences; with probability ½ they are swapped (SOP label 1). 15% of the non-special tokens
//! (at least one) are chosen for prediction: 80% become `[MASK]`, 10% a random token, 10% stay.
//!
//! Every random choice comes from a seed, so a peer's data stream is a pure function of
//! (run seed, peer, epoch, micro-batch index) — see [`Sampler`].

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::text::Corpus;
use super::tokenizer::{Specials, TextTokenizer, TokenizerError};

/// A corpus with every sentence tokenized once.
#[derive(Debug, Clone)]
pub struct TokenizedCorpus {
    /// Documents → sentences → token ids.
    pub documents: Vec<Vec<Vec<u32>>>,
    pub specials: Specials,
    pub vocab: usize,
}

impl TokenizedCorpus {
    pub fn new(corpus: &Corpus, tok: &TextTokenizer) -> Result<Self, TokenizerError> {
        let mut documents = Vec::with_capacity(corpus.documents.len());
        for d in &corpus.documents {
            let mut sents = Vec::with_capacity(d.len());
            for s in d {
                let ids = tok.encode(s)?;
                if !ids.is_empty() {
                    sents.push(ids);
                }
            }
            if sents.iter().map(Vec::len).sum::<usize>() >= 2 {
                documents.push(sents);
            }
        }
        Ok(Self {
            documents,
            specials: tok.specials,
            vocab: tok.vocab_size(),
        })
    }
}

/// One pretraining example before batching.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub token_types: Vec<u8>,
    /// Positions chosen for prediction, and the original tokens there.
    pub masked: Vec<(usize, u32)>,
    /// 1 when the two segments were swapped.
    pub sop: u8,
}

/// Builds one example from document `doc` with at most `seq` tokens.
pub fn make_example(c: &TokenizedCorpus, doc: usize, seq: usize, rng: &mut StdRng) -> Example {
    let sp = c.specials;
    let sents = &c.documents[doc];
    let budget = seq.saturating_sub(3).max(2);
    // Two segments: split the sentences at a random boundary, or split one sentence's tokens.
    let (mut a, mut b): (Vec<u32>, Vec<u32>) = if sents.len() >= 2 {
        let k = rng.gen_range(1..sents.len());
        (sents[..k].concat(), sents[k..].concat())
    } else {
        let all = &sents[0];
        let k = rng.gen_range(1..all.len());
        (all[..k].to_vec(), all[k..].to_vec())
    };
    // Truncate the longer segment from its far end until both fit (A keeps its tail, B its
    // head: the two stay adjacent, which is what SOP is about).
    while a.len() + b.len() > budget {
        if a.len() > b.len() {
            a.remove(0);
        } else {
            b.pop();
        }
    }
    let sop = u8::from(rng.gen_bool(0.5));
    if sop == 1 {
        std::mem::swap(&mut a, &mut b);
    }
    let mut tokens = Vec::with_capacity(a.len() + b.len() + 3);
    let mut types = Vec::with_capacity(tokens.capacity());
    tokens.push(sp.cls);
    tokens.extend(&a);
    tokens.push(sp.sep);
    types.resize(tokens.len(), 0);
    tokens.extend(&b);
    tokens.push(sp.sep);
    types.resize(tokens.len(), 1);

    let candidates: Vec<usize> = (0..tokens.len())
        .filter(|&i| tokens[i] != sp.cls && tokens[i] != sp.sep)
        .collect();
    let n_mask = ((candidates.len() as f64 * 0.15).round() as usize).max(1);
    let mut chosen: Vec<usize> = rand::seq::index::sample(rng, candidates.len(), n_mask)
        .into_iter()
        .map(|i| candidates[i])
        .collect();
    chosen.sort_unstable();
    let mut masked = Vec::with_capacity(chosen.len());
    for i in chosen {
        masked.push((i, tokens[i]));
        let r: f64 = rng.r#gen();
        if r < 0.8 {
            tokens[i] = sp.mask;
        } else if r < 0.9 {
            // A random ordinary token (ids of the specials are the first five).
            tokens[i] = rng.gen_range(5..c.vocab.max(6) as u32);
        }
    }
    Example {
        tokens,
        token_types: types,
        masked,
        sop,
    }
}

/// A padded batch, laid out row-major `[batch, seq]`, ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct MlmBatch {
    pub batch: usize,
    pub seq: usize,
    pub tokens: Vec<i64>,
    pub token_types: Vec<i64>,
    /// 1 for a real token, 0 for padding.
    pub attention: Vec<f32>,
    /// Flat indices (row·seq + col) of the positions to predict.
    pub masked_positions: Vec<i64>,
    pub masked_targets: Vec<i64>,
    /// `1 / (batch · masked tokens of that example)`: the MLM loss is the mean over examples
    /// of each example's mean over its masked tokens.
    pub masked_weights: Vec<f32>,
    pub sop_labels: Vec<i64>,
    /// Editable Training: an edit to make at one masked position, whose terms join the loss.
    pub edit: Option<MlmEdit>,
}

/// An edit request attached to a batch: masked position `masked` (an index into
/// `masked_positions`) should predict `target`; the edit's loss and the locality term over the
/// batch's masked positions join the loss with weights `c_edit` and `c_loc`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlmEdit {
    pub masked: usize,
    pub target: u32,
    pub c_edit: f32,
    pub c_loc: f32,
}

impl MlmBatch {
    /// Pads `examples` to `seq` (the longest example when `seq` is 0).
    pub fn collate(examples: &[Example], pad: u32, seq: usize) -> Self {
        let b = examples.len();
        let seq = if seq == 0 {
            examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1)
        } else {
            seq
        };
        let mut out = MlmBatch {
            batch: b,
            seq,
            tokens: vec![i64::from(pad); b * seq],
            token_types: vec![0; b * seq],
            attention: vec![0.0; b * seq],
            masked_positions: Vec::new(),
            masked_targets: Vec::new(),
            masked_weights: Vec::new(),
            sop_labels: Vec::with_capacity(b),
            edit: None,
        };
        for (r, e) in examples.iter().enumerate() {
            let n = e.tokens.len().min(seq);
            for i in 0..n {
                out.tokens[r * seq + i] = i64::from(e.tokens[i]);
                out.token_types[r * seq + i] = i64::from(e.token_types[i]);
                out.attention[r * seq + i] = 1.0;
            }
            let kept: Vec<_> = e.masked.iter().filter(|(p, _)| *p < n).collect();
            let w = 1.0 / (b as f32 * kept.len().max(1) as f32);
            for (p, t) in kept {
                out.masked_positions.push((r * seq + p) as i64);
                out.masked_targets.push(i64::from(*t));
                out.masked_weights.push(w);
            }
            out.sop_labels.push(i64::from(e.sop));
        }
        out
    }
}

/// A peer's deterministic data stream: micro-batch `j` of epoch `e` for peer `p` in a run with
/// seed `s` is the same on every machine, and different peers draw different documents.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub run_seed: u64,
    pub peer: Vec<u8>,
}

impl Sampler {
    pub fn rng(&self, epoch: u64, index: u64) -> StdRng {
        let mut h = Sha256::new();
        h.update(self.run_seed.to_le_bytes());
        h.update((self.peer.len() as u64).to_le_bytes());
        h.update(&self.peer);
        h.update(epoch.to_le_bytes());
        h.update(index.to_le_bytes());
        StdRng::from_seed(h.finalize().into())
    }

    /// Micro-batch `index` of `epoch`: `size` examples of at most `seq` tokens.
    pub fn batch(
        &self,
        c: &TokenizedCorpus,
        epoch: u64,
        index: u64,
        size: usize,
        seq: usize,
    ) -> MlmBatch {
        let mut rng = self.rng(epoch, index);
        let examples: Vec<Example> = (0..size)
            .map(|_| {
                let d = rng.gen_range(0..c.documents.len());
                make_example(c, d, seq, &mut rng)
            })
            .collect();
        MlmBatch::collate(&examples, c.specials.pad, seq)
    }

    /// [`Sampler::batch`] with an edit request for Editable Training: a random masked position
    /// and a random token other than its true one (deterministic like the batch).
    pub fn editable_batch(
        &self,
        c: &TokenizedCorpus,
        epoch: u64,
        index: u64,
        size: usize,
        seq: usize,
        coef: f32,
    ) -> MlmBatch {
        let mut b = self.batch(c, epoch, index, size, seq);
        let mut rng = self.rng(epoch, index ^ 0xed17_ed17_ed17_ed17);
        if !b.masked_positions.is_empty() {
            let masked = rng.gen_range(0..b.masked_positions.len());
            let vocab = c.vocab.max(2) as u32;
            let truth = b.masked_targets[masked] as u32;
            let target = (truth + rng.gen_range(1..vocab)) % vocab;
            b.edit = Some(MlmEdit {
                masked,
                target,
                c_edit: coef,
                c_loc: coef,
            });
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> TokenizedCorpus {
        let docs = [
            "The quick brown fox jumps. It lands on the lazy dog. The dog wakes up.",
            "A stitch in time saves nine. Measure twice, cut once.",
            "Only one sentence here with several words in it",
        ];
        let c = Corpus::from_documents(&docs);
        let t = TextTokenizer::train(c.texts(), 300).unwrap();
        TokenizedCorpus::new(&c, &t).unwrap()
    }

    #[test]
    fn examples_are_well_formed_and_deterministic() {
        let c = corpus();
        let s = Sampler {
            run_seed: 7,
            peer: b"peer-a".to_vec(),
        };
        let b1 = s.batch(&c, 3, 11, 8, 24);
        let b2 = s.batch(&c, 3, 11, 8, 24);
        assert_eq!(b1, b2);
        let other = Sampler {
            peer: b"peer-b".to_vec(),
            ..s.clone()
        };
        assert_ne!(b1, other.batch(&c, 3, 11, 8, 24));
        assert_eq!(b1.tokens.len(), 8 * 24);
        for r in 0..8 {
            let row = &b1.tokens[r * 24..(r + 1) * 24];
            assert_eq!(row[0], i64::from(c.specials.cls));
            assert_eq!(
                row.iter()
                    .filter(|&&t| t == i64::from(c.specials.sep))
                    .count(),
                2
            );
            // Weights of one row sum to 1/batch.
            let w: f32 = b1
                .masked_positions
                .iter()
                .zip(&b1.masked_weights)
                .filter(|(p, _)| (**p as usize) / 24 == r)
                .map(|(_, w)| w)
                .sum();
            assert!((w - 1.0 / 8.0).abs() < 1e-6, "row {r}: {w}");
        }
        assert!(b1.sop_labels.iter().all(|&l| l == 0 || l == 1));
    }

    #[test]
    fn long_documents_are_truncated_to_the_sequence() {
        let c = corpus();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let e = make_example(&c, 0, 8, &mut rng);
            assert!(e.tokens.len() <= 8, "{:?}", e.tokens);
            assert!(!e.masked.is_empty());
        }
    }
}
