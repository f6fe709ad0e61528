//! ALBERT (Lan et al. 2020): factorised embeddings (V×E then E→H), one transformer layer
//! shared across all L layers, a masked-language-model head tied to the word embeddings, and a
//! sentence-order-prediction head on the first token.
//!
//! Post-layer-norm blocks with GELU, as in BERT/ALBERT. No dropout by default (ALBERT's
//! pretraining found it hurts; it also keeps the equivalence test exact).

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear, LinearConfig,
};
use burn::prelude::Backend;
use burn::tensor::activation::{gelu, log_softmax, softmax, tanh};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::mlm::MlmBatch;

/// Sizes of an ALBERT model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlbertConfig {
    pub vocab: usize,
    /// Embedding width E (factorised: V×E, then a projection to H).
    pub embed: usize,
    /// Hidden width H.
    pub hidden: usize,
    /// L: how many times the one shared layer is applied.
    pub layers: usize,
    pub heads: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    pub max_positions: usize,
    pub dropout: f64,
}

impl AlbertConfig {
    /// Fits a 2-core CPU: ~0.6 M parameters plus the embedding table (vocab × 64).
    pub fn tiny(vocab: usize) -> Self {
        Self {
            vocab,
            embed: 64,
            hidden: 128,
            layers: 4,
            heads: 2,
            intermediate: 512,
            max_positions: 128,
            dropout: 0.0,
        }
    }
    /// ALBERT-base: E 128, H 768, 12 layers, 12 heads (12 M parameters at a 30k vocabulary).
    pub fn base(vocab: usize) -> Self {
        Self {
            vocab,
            embed: 128,
            hidden: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            max_positions: 512,
            dropout: 0.0,
        }
    }
    /// ALBERT-large: E 128, H 1024, 24 layers, 16 heads (18 M parameters at a 30k vocabulary;
    /// sahajBERT's size).
    pub fn large(vocab: usize) -> Self {
        Self {
            vocab,
            embed: 128,
            hidden: 1024,
            layers: 24,
            heads: 16,
            intermediate: 4096,
            max_positions: 512,
            dropout: 0.0,
        }
    }

    /// `tiny`, `base` or `large`.
    pub fn named(name: &str, vocab: usize) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny(vocab)),
            "base" => Some(Self::base(vocab)),
            "large" => Some(Self::large(vocab)),
            _ => None,
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Albert<B> {
        assert!(
            self.hidden.is_multiple_of(self.heads),
            "hidden width must divide into heads"
        );
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let linear = |i: usize, o: usize| {
            LinearConfig::new(i, o)
                .with_initializer(init.clone())
                .init(device)
        };
        let norm = |d: usize| LayerNormConfig::new(d).with_epsilon(1e-12).init(device);
        let emb = |n: usize, d: usize| {
            EmbeddingConfig::new(n, d)
                .with_initializer(init.clone())
                .init(device)
        };
        Albert {
            word: emb(self.vocab, self.embed),
            position: emb(self.max_positions, self.embed),
            token_type: emb(2, self.embed),
            embed_norm: norm(self.embed),
            project: linear(self.embed, self.hidden),
            layer: SharedLayer {
                query: linear(self.hidden, self.hidden),
                key: linear(self.hidden, self.hidden),
                value: linear(self.hidden, self.hidden),
                attn_out: linear(self.hidden, self.hidden),
                attn_norm: norm(self.hidden),
                ff_in: linear(self.hidden, self.intermediate),
                ff_out: linear(self.intermediate, self.hidden),
                ff_norm: norm(self.hidden),
            },
            mlm_dense: linear(self.hidden, self.embed),
            mlm_norm: norm(self.embed),
            mlm_bias: burn::module::Param::from_tensor(Tensor::zeros([self.vocab], device)),
            pooler: linear(self.hidden, self.hidden),
            sop: linear(self.hidden, 2),
            dropout: DropoutConfig::new(self.dropout).init(),
            heads: self.heads,
            layers: self.layers,
        }
    }
}

/// The transformer layer every depth shares.
#[derive(Module, Debug)]
pub struct SharedLayer<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    attn_out: Linear<B>,
    attn_norm: LayerNorm<B>,
    ff_in: Linear<B>,
    ff_out: Linear<B>,
    ff_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct Albert<B: Backend> {
    word: Embedding<B>,
    position: Embedding<B>,
    token_type: Embedding<B>,
    embed_norm: LayerNorm<B>,
    project: Linear<B>,
    layer: SharedLayer<B>,
    mlm_dense: Linear<B>,
    mlm_norm: LayerNorm<B>,
    mlm_bias: burn::module::Param<Tensor<B, 1>>,
    pooler: Linear<B>,
    sop: Linear<B>,
    dropout: Dropout,
    heads: usize,
    layers: usize,
}

/// What one forward pass over a batch gives.
#[derive(Debug)]
pub struct AlbertOutput<B: Backend> {
    /// Mean over the batch's examples of (mean MLM loss over the example's masked tokens +
    /// SOP loss): the per-example losses add, so gradients of sub-batches weighted by their
    /// sizes sum to the gradient of the whole batch.
    pub loss: Tensor<B, 1>,
    pub mlm_loss: Tensor<B, 1>,
    pub sop_loss: Tensor<B, 1>,
    /// Editable Training's `c_edit·L_edit + c_loc·L_loc` when the batch carries an edit
    /// (already in `loss`).
    pub edit_loss: Option<Tensor<B, 1>>,
    /// Masked tokens predicted right, and how many there were.
    pub mlm_correct: Tensor<B, 1, Int>,
}

fn ints<B: Backend, const D: usize>(
    v: &[i64],
    shape: [usize; D],
    d: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), d)
}

fn floats<B: Backend, const D: usize>(v: &[f32], shape: [usize; D], d: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), d)
}

impl<B: Backend> SharedLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask_bias: Tensor<B, 4>,
        heads: usize,
        drop: &Dropout,
    ) -> Tensor<B, 3> {
        let [b, s, h] = x.dims();
        let dh = h / heads;
        let split = |t: Tensor<B, 3>| t.reshape([b, s, heads, dh]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt()) + mask_bias;
        let attn = drop.forward(softmax(scores, 3));
        let ctx = attn.matmul(v).swap_dims(1, 2).reshape([b, s, h]);
        let x = self
            .attn_norm
            .forward(x + drop.forward(self.attn_out.forward(ctx)));
        let ff = self.ff_out.forward(gelu(self.ff_in.forward(x.clone())));
        self.ff_norm.forward(x + drop.forward(ff))
    }
}

impl<B: Backend> Albert<B> {
    /// Hidden states `[batch, seq, hidden]`.
    pub fn encode(&self, batch: &MlmBatch, device: &B::Device) -> Tensor<B, 3> {
        let (b, s) = (batch.batch, batch.seq);
        let tokens = ints::<B, 2>(&batch.tokens, [b, s], device);
        let types = ints::<B, 2>(&batch.token_types, [b, s], device);
        let positions: Vec<i64> = (0..b).flat_map(|_| 0..s as i64).collect();
        let positions = ints::<B, 2>(&positions, [b, s], device);
        let e = self.word.forward(tokens)
            + self.position.forward(positions)
            + self.token_type.forward(types);
        let e = self.dropout.forward(self.embed_norm.forward(e));
        let mut x = self.project.forward(e);
        let bias: Vec<f32> = batch
            .attention
            .iter()
            .map(|&a| if a > 0.5 { 0.0 } else { -10_000.0 })
            .collect();
        let mask_bias = floats::<B, 2>(&bias, [b, s], device).reshape([b, 1, 1, s]);
        for _ in 0..self.layers {
            x = self
                .layer
                .forward(x, mask_bias.clone(), self.heads, &self.dropout);
        }
        x
    }

    /// What the MLM decoder reads at the batch's masked positions, `[masked, embed]`: the
    /// editable head's input features (`crate::edit`).
    pub fn mlm_features(&self, batch: &MlmBatch, device: &B::Device) -> Tensor<B, 2> {
        let (b, s) = (batch.batch, batch.seq);
        let x = self.encode(batch, device);
        let h = x.dims()[2];
        let m = batch.masked_positions.len();
        let picked = x
            .reshape([b * s, h])
            .select(0, ints::<B, 1>(&batch.masked_positions, [m], device));
        self.mlm_norm.forward(gelu(self.mlm_dense.forward(picked)))
    }

    /// The MLM decoder as an editable head: `W` is the (tied) word-embedding matrix
    /// `[vocab, embed]`, `b` the MLM bias. An edit of it also moves the input embeddings of the
    /// few tokens whose rows it touches (the target and the runner-ups), since they are tied.
    pub fn mlm_head(&self) -> crate::edit::Head {
        let w = self.word.weight.val();
        let [vocab, embed] = w.dims();
        crate::edit::Head::new(
            vocab,
            embed,
            w.into_data().iter::<f32>().collect(),
            self.mlm_bias.val().into_data().iter::<f32>().collect(),
        )
    }

    /// The model with its MLM decoder (and so the tied word embeddings) replaced by `head`.
    pub fn with_mlm_head(mut self, head: &crate::edit::Head) -> Self {
        let device = self.word.weight.device();
        self.word.weight = burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(head.w.clone(), [head.out, head.inp]),
            &device,
        ));
        self.mlm_bias = burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(head.b.clone(), [head.out]),
            &device,
        ));
        self
    }

    /// Losses of a pretraining batch (see [`AlbertOutput::loss`]).
    pub fn forward_loss(&self, batch: &MlmBatch, device: &B::Device) -> AlbertOutput<B> {
        let (b, s) = (batch.batch, batch.seq);
        let x = self.encode(batch, device);
        let h = x.dims()[2];
        let flat = x.clone().reshape([b * s, h]);
        let m = batch.masked_positions.len();

        // MLM on the masked positions only, decoder tied to the word embeddings.
        let mut edit_terms = None;
        let (mlm_loss, mlm_correct) = if m == 0 {
            (Tensor::zeros([1], device), Tensor::zeros([1], device))
        } else {
            let picked = flat.select(0, ints::<B, 1>(&batch.masked_positions, [m], device));
            let t = self.mlm_norm.forward(gelu(self.mlm_dense.forward(picked)));
            // Editable Training: edit the tied decoder at one masked position, exactly
            // differentiable through the edit (`crate::edit::train::head_edit_terms`).
            if let Some(e) = batch.edit.as_ref().filter(|e| e.masked < m) {
                let e_dim = t.dims()[1];
                let he = t.clone().slice([e.masked..e.masked + 1, 0..e_dim]);
                let (edit, loc) = crate::edit::train::head_edit_terms(
                    he,
                    t.clone(),
                    self.word.weight.val().transpose(),
                    self.mlm_bias.val(),
                    e.target as usize,
                    &crate::edit::EditorConfig::default(),
                    device,
                );
                edit_terms = Some(edit * e.c_edit + loc * e.c_loc);
            }
            let logits = t.matmul(self.word.weight.val().transpose())
                + self.mlm_bias.val().unsqueeze_dim::<2>(0);
            let targets = ints::<B, 2>(&batch.masked_targets, [m, 1], device);
            let logp = log_softmax(logits.clone(), 1).gather(1, targets.clone());
            let w = floats::<B, 2>(&batch.masked_weights, [m, 1], device);
            let loss = (logp * w).sum().neg();
            let correct = logits.argmax(1).equal(targets).int().sum();
            (loss, correct)
        };

        // SOP on the first token, through the pooler.
        let first = x.slice([0..b, 0..1, 0..h]).reshape([b, h]);
        let pooled = tanh(self.pooler.forward(first));
        let logits = self.sop.forward(pooled);
        let labels = ints::<B, 2>(&batch.sop_labels, [b, 1], device);
        let sop_loss = log_softmax(logits, 1)
            .gather(1, labels)
            .sum()
            .neg()
            .div_scalar(b as f32);
        let mut loss = mlm_loss.clone() + sop_loss.clone();
        if let Some(e) = &edit_terms {
            loss = loss + e.clone();
        }
        AlbertOutput {
            loss,
            edit_loss: edit_terms,
            mlm_loss,
            sop_loss,
            mlm_correct,
        }
    }
}

/// ALBERT's initialisation drawn from `seed` alone, so every peer of a run starts from the same
/// parameters without talking to anyone: weights from a normal(0, 0.02) truncated at two
/// standard deviations, layer-norm scales 1, biases and shifts 0.
pub fn seeded_params(layout: &crate::params::Layout, seed: u64) -> Vec<f32> {
    use crate::params::Init;
    crate::params::seeded_init(layout, seed, |seg| {
        let name = seg.path.rsplit('.').next().unwrap_or("");
        if name == "gamma" {
            Init::Const(1.0)
        } else if name == "beta" || name == "bias" || seg.path == "mlm_bias" {
            Init::Const(0.0)
        } else {
            Init::Normal(0.02)
        }
    })
}
