//! A model's parameters (and their gradients) as one flat `f32` vector.
//!
//! The collaborative optimizer works on flat vectors: gradients cross the network as one vector,
//! the optimizers (`optim`) run on slices, and a state snapshot is a few flat vectors. The order
//! is burn's module visiting order (field declaration order), which is the same on every peer
//! running the same model code; [`Layout::fingerprint`] hashes the order, the paths and the
//! shapes so that peers with a different model are never grouped and a snapshot of another
//! model is refused.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use sha2::{Digest, Sha256};

/// One parameter tensor inside the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Dotted module path, e.g. `encoder.attention.query.weight`.
    pub path: String,
    pub shape: Vec<usize>,
    /// First element in the flat vector.
    pub offset: usize,
    pub len: usize,
    /// Biases and normalisation scales/shifts: no weight decay, no layer-wise adaptation
    /// (the usual LAMB/LARS exclusion).
    pub exclude_from_decay: bool,
}

/// Where each parameter lives in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub segments: Vec<Segment>,
    pub total: usize,
}

/// The flat vector does not fit the model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("expected {expected} values for this model, got {got}")]
    Length { expected: usize, got: usize },
    #[error("parameter {path} is missing its gradient")]
    MissingGradient { path: String },
    #[error("parameter {path} could not be read: {why}")]
    Read { path: String, why: String },
}

impl Layout {
    /// The layout of `module`'s float parameters.
    pub fn of<B: Backend, M: Module<B>>(module: &M) -> Self {
        let mut v = LayoutVisitor {
            path: Vec::new(),
            segments: Vec::new(),
            total: 0,
        };
        module.visit(&mut v);
        Self {
            segments: v.segments,
            total: v.total,
        }
    }

    /// SHA-256 over every segment's path and shape, in order: two peers with the same
    /// fingerprint flatten their models identically.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for s in &self.segments {
            h.update(s.path.as_bytes());
            h.update([0]);
            for d in &s.shape {
                h.update((*d as u64).to_le_bytes());
            }
            h.update([0xff]);
        }
        h.finalize().into()
    }

    fn check(&self, len: usize) -> Result<(), LayoutError> {
        if len == self.total {
            Ok(())
        } else {
            Err(LayoutError::Length {
                expected: self.total,
                got: len,
            })
        }
    }
}

/// How [`seeded_init`] fills one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Const(f32),
    /// Normal(0, σ) truncated at ±2σ.
    Normal(f64),
}

/// Initial parameters drawn from `seed` and each tensor's path alone, so every peer of a run
/// starts from the same values without talking to anyone; `rule` says how each tensor is drawn.
pub fn seeded_init(layout: &Layout, seed: u64, rule: impl Fn(&Segment) -> Init) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut out = Vec::with_capacity(layout.total);
    for seg in &layout.segments {
        match rule(seg) {
            Init::Const(v) => out.extend(std::iter::repeat_n(v, seg.len)),
            Init::Normal(std) => {
                let mut h = Sha256::new();
                h.update(seed.to_le_bytes());
                h.update(seg.path.as_bytes());
                let mut rng = rand::rngs::StdRng::from_seed(h.finalize().into());
                out.extend((0..seg.len).map(|_| {
                    loop {
                        // Box-Muller; redraw outside ±2σ.
                        let (u1, u2): (f64, f64) = (rng.r#gen::<f64>().max(1e-300), rng.r#gen());
                        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                        if z.abs() <= 2.0 {
                            break (z * std) as f32;
                        }
                    }
                }));
            }
        }
    }
    out
}

fn excluded(path: &str, rank: usize) -> bool {
    rank < 2
        || path.ends_with(".bias")
        || path.ends_with(".beta")
        || path.ends_with(".gamma")
        || path.contains("norm")
}

struct LayoutVisitor {
    path: Vec<String>,
    segments: Vec<Segment>,
    total: usize,
}

impl<B: Backend> ModuleVisitor<B> for LayoutVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.lazy_shape().dims::<D>().to_vec();
        let len: usize = shape.iter().product();
        let path = self.path.join(".");
        self.segments.push(Segment {
            exclude_from_decay: excluded(&path, D),
            path,
            shape,
            offset: self.total,
            len,
        });
        self.total += len;
    }
}

fn read_tensor<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    path: &str,
    out: &mut Vec<f32>,
) -> Result<(), LayoutError> {
    let data = t.into_data().convert::<f32>();
    let slice = data.as_slice::<f32>().map_err(|e| LayoutError::Read {
        path: path.to_string(),
        why: format!("{e:?}"),
    })?;
    out.extend_from_slice(slice);
    Ok(())
}

struct ParamReader {
    path: Vec<String>,
    out: Vec<f32>,
    err: Option<LayoutError>,
}

impl<B: Backend> ModuleVisitor<B> for ParamReader {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.err.is_some() {
            return;
        }
        if let Err(e) = read_tensor(param.val(), &self.path.join("."), &mut self.out) {
            self.err = Some(e);
        }
    }
}

/// The module's parameters as one flat vector, in [`Layout`] order.
pub fn flatten_params<B: Backend, M: Module<B>>(module: &M) -> Result<Vec<f32>, LayoutError> {
    let mut r = ParamReader {
        path: Vec::new(),
        out: Vec::new(),
        err: None,
    };
    module.visit(&mut r);
    match r.err {
        Some(e) => Err(e),
        None => Ok(r.out),
    }
}

struct GradReader<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    path: Vec<String>,
    out: Vec<f32>,
    err: Option<LayoutError>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradReader<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.err.is_some() {
            return;
        }
        let t = param.val();
        let path = self.path.join(".");
        match t.grad(self.grads) {
            Some(g) => {
                if let Err(e) = read_tensor(g, &path, &mut self.out) {
                    self.err = Some(e);
                }
            }
            // A parameter the loss does not reach has a zero gradient (e.g. a head that a
            // batch did not use); anything else is a bug the caller should see.
            None => {
                let n: usize = t.dims().iter().product();
                self.out.extend(std::iter::repeat_n(0.0, n));
            }
        }
    }
}

/// The gradients of every parameter of `module`, flattened in [`Layout`] order (zeros for a
/// parameter the loss does not depend on).
pub fn flatten_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &B::Gradients,
) -> Result<Vec<f32>, LayoutError> {
    let mut r = GradReader::<B> {
        grads,
        path: Vec::new(),
        out: Vec::new(),
        err: None,
    };
    module.visit(&mut r);
    match r.err {
        Some(e) => Err(e),
        None => Ok(r.out),
    }
}

struct ParamWriter<'a> {
    values: &'a [f32],
    at: usize,
}

impl<B: Backend> ModuleMapper<B> for ParamWriter<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, old, mapper) = param.consume();
        let shape = old.dims();
        let n: usize = shape.iter().product();
        let slice = &self.values[self.at..self.at + n];
        self.at += n;
        let require_grad = old.is_require_grad();
        let fresh =
            Tensor::<B, D>::from_data(TensorData::new(slice.to_vec(), shape), &old.device())
                .set_require_grad(require_grad);
        Param::from_mapped_value(id, fresh, mapper)
    }
}

/// `module` with its parameters replaced by `values` (in [`Layout`] order). The new tensors
/// are fresh leaves: no autodiff history carries over.
pub fn load_params<B: Backend, M: Module<B>>(
    module: M,
    layout: &Layout,
    values: &[f32],
) -> Result<M, LayoutError> {
    layout.check(values.len())?;
    let mut w = ParamWriter { values, at: 0 };
    Ok(module.map(&mut w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuTrain};
    use burn::nn::{Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        a: Linear<B>,
        b: Linear<B>,
    }

    fn two<B: Backend>(device: &B::Device) -> Two<B> {
        Two {
            a: LinearConfig::new(3, 4).init(device),
            b: LinearConfig::new(4, 2).with_bias(false).init(device),
        }
    }

    #[test]
    fn layout_follows_field_order_with_paths() {
        let m = two::<Cpu>(&Default::default());
        let l = Layout::of(&m);
        let paths: Vec<_> = l.segments.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, ["a.weight", "a.bias", "b.weight"]);
        assert_eq!(l.total, 12 + 4 + 8);
        assert!(l.segments[1].exclude_from_decay);
        assert!(!l.segments[0].exclude_from_decay);
        assert_eq!(l.segments[2].offset, 16);
    }

    #[test]
    fn flatten_and_load_round_trip_exactly_and_refuse_wrong_lengths() {
        let dev = Default::default();
        let m = two::<CpuTrain>(&dev);
        let l = Layout::of(&m);
        let values: Vec<f32> = (0..l.total).map(|i| i as f32 * 0.25 - 1.0).collect();
        let m = load_params(m, &l, &values).unwrap();
        assert_eq!(flatten_params(&m).unwrap(), values);
        let err = load_params(m, &l, &values[1..]).unwrap_err();
        assert_eq!(
            err,
            LayoutError::Length {
                expected: 24,
                got: 23
            }
        );
    }

    #[test]
    fn gradients_flatten_in_layout_order() {
        let dev = Default::default();
        let m = two::<CpuTrain>(&dev);
        let l = Layout::of(&m);
        let ones = vec![1.0f32; l.total];
        let m = load_params(m, &l, &ones).unwrap();
        let x =
            Tensor::<CpuTrain, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [1, 3]), &dev);
        // y = b(a(x)); loss = sum(y). With all-ones weights: a(x) = 7 per unit (6 + bias 1).
        let loss = m.b.forward(m.a.forward(x)).sum();
        let g = flatten_grads(&m, &loss.backward()).unwrap();
        assert_eq!(g.len(), l.total);
        // d loss / d a.weight[i][j] = x_i * sum_k b[j][k] = x_i * 2.
        assert_eq!(&g[0..4], &[2.0, 2.0, 2.0, 2.0]);
        assert_eq!(&g[4..8], &[4.0; 4]);
        // d loss / d a.bias = 2; d loss / d b.weight = a(x) = 7.
        assert_eq!(&g[12..16], &[2.0; 4]);
        assert_eq!(&g[16..24], &[7.0; 8]);
        assert_ne!(Layout::of(&m).fingerprint(), [0u8; 32]);
    }
}
