//! GPT-2 (HF `GPT2LMHeadModel` semantics) as a [`SplitModel`] on dfdx.
//!
//! * Conv1D weights are stored `[in, out]` and applied as `x · W + b` (`c_attn` is split into
//!   its query, key and value column blocks at load time);
//! * `gelu_new` (tanh approximation) and LayerNorm (`layer_norm_epsilon` from the config) are
//!   built from elementary ops ([`crate::ops`]);
//! * learned absolute positions; `lm_head` tied to `wte` (an untied `lm_head.weight` is used when
//!   the config says `tie_word_embeddings: false` and the checkpoint carries one);
//! * attention scale `1/√d_head`, causal.
//!
//! Split layer `k ∈ 0..=n_layer`: `k = 0` is the embedding output `wte[x] + wpe[t]`, `k = i` the
//! output of block `i − 1`, `k = n_layer` the last block's output before `ln_f`.
//!
//! **One attention routine for both halves.** A row at position `t` attends to the cached keys
//! and values of positions `j < t` (an additive mask of `−10³⁰` hides `j ≥ t`) and to its own key
//! and value, with the softmax normalised after the value product:
//!
//! ```text
//!     s_j = ⟨q, k_j⟩/√d_h (j < t),   s_* = ⟨q, k_self⟩/√d_h,   μ = max(s_j, s_*) (a constant),
//!     out = (Σ_j e^{s_j−μ} v_j + e^{s_*−μ} v_self) / (Σ_j e^{s_j−μ} + e^{s_*−μ}).
//! ```
//!
//! The lower pass runs it on all `T` rows with the sequence's own keys as the cache (that is
//! causal attention); the upper half runs it on replicated single rows `h` against the keys and
//! values the lower pass cached for blocks `≥ k`, so `R` copies of `h` cost `R` single-token
//! passes, not `R` sequences; [`SplitModel::extend`] runs it on one new row against the prefix.
//!
//! **Jacobians by batched VJPs.** dfdx has no forward mode. The readout Jacobian `A = ∂u/∂h`
//! (`u = ln_f` output) takes `d` copies of `h` and one backward pass of `Σ_i ⟨e_i, u_i⟩` (row `i`
//! of the input gradient is row `i` of `A`); score gradients take `S` copies and one backward
//! pass of `Σ_s ⟨w_{y_s} − m, u_s⟩`, `m = W_Uᵀp`. Only `h` is traced; products with weights and
//! cached keys/values use [`Engine`]'s input-only backward.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use dfdx::prelude::{
    Axes2, Axes3, Axis, Backward, BroadcastTo, GatherTo, HasShape, MaxTo, NoneTape, PermuteTo,
    Rank0, ReshapeTo, SumTo, Tape, TensorFromVec, Trace, TryConcatAlong, TryMatMul, WithEmptyTape,
};
use fs_checkpoint::{Gpt2Config, Gpt2Weights, HostMatrix, LayerNorm, Linear};
use fs_traits::engine::{check_positions, readout_batching};
use fs_traits::{
    check_attention_query, check_finite, check_layer, check_len, check_position, check_tokens,
    check_tokens_in_vocab, softmax, AttentionHead, FsError, Matrix, MatrixRef, ModelDims,
    SplitContext, SplitModel,
};

use crate::ops::{gelu_new, layer_norm, linear, Batch, Engine, Mat, Mat64, Vector};
use crate::{Device, Error};

/// Default bytes of activations and gradients one backward pass may keep alive.
const DEFAULT_ACTIVATION_BUDGET: usize = 1 << 30;

/// Unembedding rows per chunk of the device-side Gram ([`Net::fisher_on_device`]): a chunk's
/// `B` is `8192 × d` f32 (25 MB at d = 768).
const DEVICE_VOCAB_CHUNK: usize = 8192;

/// A LayerNorm's parameters.
struct Norm<D: Engine> {
    weight: Vector<D>,
    bias: Vector<D>,
}

/// One transformer block's parameters (weights `[in, out]`).
struct Block<D: Engine> {
    ln_1: Norm<D>,
    /// Query, key and value column blocks of `c_attn` (`d × d` each) and their biases.
    wq: Mat<D>,
    wk: Mat<D>,
    wv: Mat<D>,
    bq: Vector<D>,
    bk: Vector<D>,
    bv: Vector<D>,
    proj_w: Mat<D>,
    proj_b: Vector<D>,
    ln_2: Norm<D>,
    fc_w: Mat<D>,
    fc_b: Vector<D>,
    out_w: Mat<D>,
    out_b: Vector<D>,
}

/// The network on one dfdx device.
struct Net<D: Engine> {
    dev: D,
    cfg: Gpt2Config,
    wte: Mat<D>,
    wpe: Mat<D>,
    blocks: Vec<Block<D>>,
    ln_f: Norm<D>,
    /// `W_U` (`V × d`), for the device-side Gram.
    lm_head: Mat<D>,
    /// `W_Uᵀ` (`d × V`, a transposed view of `lm_head`).
    lm_head_t: Mat<D>,
}

/// The network on whichever device it was loaded on (one per model: the variants' sizes differ
/// by dfdx's device handles only).
#[cfg_attr(feature = "cuda", allow(clippy::large_enum_variant))]
enum AnyNet {
    Cpu(Net<dfdx::tensor::Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(Net<dfdx::tensor::Cuda>),
}

/// Run `$body` with `$net` bound to the device-specific network.
macro_rules! with_net {
    ($self:expr, $net:ident => $body:expr) => {
        match &$self.net {
            AnyNet::Cpu($net) => $body,
            #[cfg(feature = "cuda")]
            AnyNet::Cuda($net) => $body,
        }
    };
}

/// How the rows of a backward pass are grouped.
#[derive(Clone, Copy, Debug)]
enum Batching {
    /// Keep about this many bytes of activations and gradients alive per pass.
    Budget(usize),
    /// Exactly this many positions (all `d` rows each) per pass.
    Positions(usize),
}

/// GPT-2 on dfdx.
pub struct Gpt2 {
    cfg: Gpt2Config,
    net: AnyNet,
    /// `W_U` on the host (`V × d`), for the estimators' weighted Gram.
    lm_head_host: Vec<f32>,
    batching: Batching,
    /// Form the exact Fisher on the device ([`SplitModel::device_exact_fisher`]).
    fisher_on_device: bool,
}

/// Everything one forward pass over a sequence produced, shared by the contexts of every layer.
struct SequenceCache {
    tokens: Vec<u32>,
    /// `hidden[k]` = `H_k` (`T × d`, row-major), `k = 0..=n_layer`.
    hidden: Vec<Vec<f32>>,
    /// Every block's keys and values.
    kv: KvCache,
    /// `ln_f(h_L)` (`T × d`).
    final_norm: Vec<f32>,
}

impl SequenceCache {
    /// The cache shared by the contexts of every layer. `Send + Sync` on the CPU; with CUDA,
    /// dfdx's device tensors (like its `Cuda` device, and so the model itself) are neither, and a
    /// context stays on the thread of its model.
    #[cfg_attr(feature = "cuda", allow(clippy::arc_with_non_send_sync))]
    fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

/// Every block's keys and values (`H × T × d_head` each), on the device where the lower pass
/// left them and on the host where an edit (`with_activation`, `extend`) made them; each side is
/// copied to the other once, when first needed (so an upper pass on a lowered context uploads
/// nothing, and the lower pass downloads no keys or values).
struct KvCache {
    host: OnceLock<HostKv>,
    device: OnceLock<DeviceKv>,
}

/// Keys and values on the host: `keys[i]` / `values[i]` = block `i`'s, row-major.
struct HostKv {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// Keys and values on a dfdx device: `(keys, values)` of each block.
enum DeviceKv {
    Cpu(Vec<(Batch<dfdx::tensor::Cpu>, Batch<dfdx::tensor::Cpu>)>),
    #[cfg(feature = "cuda")]
    Cuda(Vec<(Batch<dfdx::tensor::Cuda>, Batch<dfdx::tensor::Cuda>)>),
}

impl KvCache {
    fn on_host(keys: Vec<Vec<f32>>, values: Vec<Vec<f32>>) -> Self {
        KvCache { host: OnceLock::from(HostKv { keys, values }), device: OnceLock::new() }
    }

    fn on_device(kv: DeviceKv) -> Self {
        KvCache { host: OnceLock::new(), device: OnceLock::from(kv) }
    }

    /// The host copy (downloaded from the device the first time).
    fn host(&self) -> &HostKv {
        self.host.get_or_init(|| {
            fn download<D: Engine>(kv: &[(Batch<D>, Batch<D>)]) -> HostKv {
                let (keys, values) = kv.iter().map(|(k, v)| (k.as_vec(), v.as_vec())).unzip();
                HostKv { keys, values }
            }
            match self.device.get().expect("a KV cache is made on one side") {
                DeviceKv::Cpu(kv) => download(kv),
                #[cfg(feature = "cuda")]
                DeviceKv::Cuda(kv) => download(kv),
            }
        })
    }
}

/// The dfdx devices [`DeviceKv`] holds tensors of.
trait KvDevice: Engine {
    /// `kv`'s tensors if they live on this kind of device.
    fn kv_of(kv: &DeviceKv) -> Option<&[(Batch<Self>, Batch<Self>)]>;
    /// Wrap this device's tensors.
    fn wrap_kv(kv: Vec<(Batch<Self>, Batch<Self>)>) -> DeviceKv;
}

impl KvDevice for dfdx::tensor::Cpu {
    fn kv_of(kv: &DeviceKv) -> Option<&[(Batch<Self>, Batch<Self>)]> {
        match kv {
            DeviceKv::Cpu(kv) => Some(kv),
            #[cfg(feature = "cuda")]
            _ => None,
        }
    }
    fn wrap_kv(kv: Vec<(Batch<Self>, Batch<Self>)>) -> DeviceKv {
        DeviceKv::Cpu(kv)
    }
}

#[cfg(feature = "cuda")]
impl KvDevice for dfdx::tensor::Cuda {
    fn kv_of(kv: &DeviceKv) -> Option<&[(Batch<Self>, Batch<Self>)]> {
        match kv {
            DeviceKv::Cuda(kv) => Some(kv),
            _ => None,
        }
    }
    fn wrap_kv(kv: Vec<(Batch<Self>, Batch<Self>)>) -> DeviceKv {
        DeviceKv::Cuda(kv)
    }
}

/// One new token's row, computed against a cached prefix ([`SplitModel::extend`]).
struct NewRow {
    /// Its layer-`k` activation for every `k = 0..=n_layer` (`d` each).
    hidden: Vec<Vec<f32>>,
    /// Its key per block (`H × d_head`).
    keys: Vec<Vec<f32>>,
    /// Its value per block (`H × d_head`).
    values: Vec<Vec<f32>>,
    /// Its `ln_f` output (`d`).
    final_norm: Vec<f32>,
}

/// The result of [`Gpt2`]'s lower pass: the split layer and the sequence's cached activations,
/// keys and values (host memory; shared between the contexts of one
/// [`lower_layers`](SplitModel::lower_layers) call).
pub struct Gpt2Context {
    layer: usize,
    cache: Arc<SequenceCache>,
}

impl SplitContext for Gpt2Context {
    fn layer(&self) -> usize {
        self.layer
    }
    fn tokens(&self) -> &[u32] {
        &self.cache.tokens
    }
}

/// Turn a panic inside dfdx (a kernel failure; dfdx's infallible ops unwrap their errors) into a
/// one-line backend error.
pub(crate) fn guarded<R>(f: impl FnOnce() -> Result<R, FsError>) -> Result<R, FsError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(FsError::Backend(format!(
            "dfdx: {}",
            msg.lines().next().unwrap_or_default().trim_end()
        )))
    })
}

impl Gpt2 {
    /// Build the network from typed host weights ([`Gpt2Weights`], read by `fs-checkpoint` from
    /// safetensors, GGUF or random values) on `device`; `c_attn` is split into its query, key
    /// and value column blocks here. `W_U` stays on the host too, for the estimators' weighted
    /// Gram.
    pub fn new(weights: Gpt2Weights, device: &Device) -> Result<Self, Error> {
        let lm_head_host = weights.unembedding().data.clone();
        let cfg = weights.config.clone();
        let net = guarded(|| {
            Ok(match device {
                Device::Cpu(dev) => AnyNet::Cpu(Net::build(dev, weights, &lm_head_host)),
                #[cfg(feature = "cuda")]
                Device::Cuda(dev) => AnyNet::Cuda(Net::build(dev, weights, &lm_head_host)),
            })
        })?;
        let fisher_on_device = !matches!(net, AnyNet::Cpu(_));
        Ok(Gpt2 {
            cfg,
            net,
            lm_head_host,
            batching: Batching::Budget(DEFAULT_ACTIVATION_BUDGET),
            fisher_on_device,
        })
    }

    /// Form the exact Fisher on the model's device (`SplitModel::device_exact_fisher`): on by
    /// default for a CUDA model, off on the CPU, where the host estimators are faster; turning it
    /// on there runs the device code path on the CPU (tests).
    pub fn set_fisher_on_device(&mut self, on: bool) {
        self.fisher_on_device = on;
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// Set the bytes of activations and gradients one backward pass may keep alive (default
    /// 1 GiB). More positions (or more of one position's `d` copies of `h`) per pass give larger
    /// GEMMs; fewer keep the peak memory down. A budget below one position's `d` rows splits a
    /// position's readout Jacobian over several passes (blocks of rows of `A`).
    pub fn set_activation_budget(&mut self, bytes: usize) {
        self.batching = Batching::Budget(bytes.max(1));
    }

    /// Force `positions` positions per readout-Jacobian backward pass (all `d` copies of `h`
    /// each), whatever the activation budget.
    pub fn set_position_batch(&mut self, positions: usize) {
        self.batching = Batching::Positions(positions.max(1));
    }

    /// Approximate bytes one row of a backward pass keeps alive through the upper half from
    /// `layer` with `t_ctx` cached positions: the forward activations the tape holds and their
    /// gradients, per block.
    fn bytes_per_row(&self, layer: usize, t_ctx: usize) -> usize {
        let (d, inner, h) = (self.cfg.n_embd, self.cfg.inner_dim(), self.cfg.n_head);
        let per_block = 3 * inner + 16 * d + 4 * h * t_ctx;
        8 * (self.cfg.n_layer - layer).max(1) * per_block + 16 * d
    }

    /// `(positions per pass, rows per pass)` for readout Jacobians of `d` rows per position.
    fn readout_batching(&self, layer: usize, t_ctx: usize) -> (usize, usize) {
        let d = self.cfg.n_embd;
        match self.batching {
            Batching::Positions(p) => (p, d),
            Batching::Budget(bytes) => readout_batching(d, self.bytes_per_row(layer, t_ctx), bytes),
        }
    }

    /// Rows per pass for score gradients.
    fn rows_per_pass(&self, layer: usize, t_ctx: usize) -> usize {
        match self.batching {
            Batching::Positions(p) => p * self.cfg.n_embd,
            Batching::Budget(bytes) => (bytes / self.bytes_per_row(layer, t_ctx).max(1)).max(1),
        }
    }

    /// `p = softmax(z)` at `position` (f64 sums, rounded to f32).
    fn probabilities(&self, ctx: &Gpt2Context, position: usize) -> Result<Vec<f32>, FsError> {
        let z = self.logits(ctx, &[position])?;
        Ok(softmax(z.as_slice())?.into_iter().map(|p| p as f32).collect())
    }
}

/// Split the `[d, 3d]` `c_attn` weight into its `[d, d]` query, key and value column blocks.
fn split_columns(w: &[f32], rows: usize, d: usize) -> [Vec<f32>; 3] {
    let mut out = [Vec::with_capacity(rows * d), Vec::with_capacity(rows * d), Vec::new()];
    out[2].reserve(rows * d);
    for row in w.chunks_exact(3 * d) {
        for (j, part) in out.iter_mut().enumerate() {
            part.extend_from_slice(&row[j * d..(j + 1) * d]);
        }
    }
    out
}

impl<D: KvDevice> Net<D> {
    fn build(dev: &D, weights: Gpt2Weights, lm_head: &[f32]) -> Self {
        let Gpt2Weights { config: cfg, wte, wpe, blocks: host_blocks, ln_f, .. } = weights;
        let (d, v) = (cfg.n_embd, cfg.vocab_size);
        let mat = |m: HostMatrix| dev.tensor_from_vec(m.data, (m.rows, m.cols));
        let vector = |data: Vec<f32>| {
            let n = data.len();
            dev.tensor_from_vec(data, (n,))
        };
        let norm = |n: LayerNorm| Norm { weight: vector(n.weight), bias: vector(n.bias) };
        let bias = |l: &Linear| l.bias.clone().unwrap_or_default();
        let blocks = host_blocks
            .into_iter()
            .map(|b| {
                let [wq, wk, wv] = split_columns(&b.attn_qkv.weight.data, d, d);
                let qkv_b = bias(&b.attn_qkv);
                Block {
                    ln_1: norm(b.ln_1),
                    wq: dev.tensor_from_vec(wq, (d, d)),
                    wk: dev.tensor_from_vec(wk, (d, d)),
                    wv: dev.tensor_from_vec(wv, (d, d)),
                    bq: vector(qkv_b[..d].to_vec()),
                    bk: vector(qkv_b[d..2 * d].to_vec()),
                    bv: vector(qkv_b[2 * d..].to_vec()),
                    proj_b: vector(bias(&b.attn_out)),
                    proj_w: mat(b.attn_out.weight),
                    ln_2: norm(b.ln_2),
                    fc_b: vector(bias(&b.mlp_in)),
                    fc_w: mat(b.mlp_in.weight),
                    out_b: vector(bias(&b.mlp_out)),
                    out_w: mat(b.mlp_out.weight),
                }
            })
            .collect();
        let lm_head = dev.tensor_from_vec(lm_head.to_vec(), (v, d));
        let lm_head_t = lm_head.clone().permute::<(usize, usize), Axes2<1, 0>>();
        Net {
            dev: dev.clone(),
            wte: mat(wte),
            wpe: mat(wpe),
            blocks,
            ln_f: norm(ln_f),
            lm_head,
            lm_head_t,
            cfg,
        }
    }

    fn heads(&self) -> (usize, usize) {
        (self.cfg.n_head, self.cfg.n_embd / self.cfg.n_head)
    }

    /// Rows `(n, d)` viewed as heads `(H, n, d_head)` (a strided view).
    fn split_heads<T: Tape<f32, D>>(&self, x: Mat<D, T>) -> Batch<D, T> {
        let n = x.shape().0;
        let (h, dh) = self.heads();
        x.reshape_like(&(n, h, dh)).permute::<(usize, usize, usize), Axes3<1, 0, 2>>()
    }

    /// Additive mask `(n, T_ctx)`: row `r` (at position `row_pos[r]`) sees cached positions
    /// `j < row_pos[r]`.
    fn mask(&self, row_pos: &[usize], t_ctx: usize) -> Mat<D> {
        let m = fs_traits::engine::prefix_mask(row_pos, t_ctx, None);
        self.dev.tensor_from_vec(m, (row_pos.len(), t_ctx))
    }

    /// Attention of rows `q`, `k_self`, `v_self` (`n × d`) against cached keys/values
    /// `(H, T_ctx, d_head)` under `mask` (`n × T_ctx`), plus each row's own key/value (module
    /// docs). Returns `n × d`.
    fn attend<T: Tape<f32, D>>(
        &self,
        q: Mat<D, T>,
        k_self: Mat<D, T>,
        v_self: Mat<D, T>,
        keys: &Batch<D>,
        values: &Batch<D>,
        mask: &Mat<D>,
    ) -> Mat<D, T> {
        let (n, d) = *q.shape();
        let (h, dh) = self.heads();
        let t_ctx = keys.shape().1;
        let scale = 1.0 / (dh as f32).sqrt();
        let q = self.split_heads(q * scale);
        let k_self = self.split_heads(k_self);
        let v_self = self.split_heads(v_self);
        // ⟨q, k_self⟩ per head and row: (H, n).
        let self_score = (q.with_empty_tape() * k_self).sum::<(usize, usize), Axis<2>>();
        let keys_t = keys.clone().permute::<(usize, usize, usize), Axes3<0, 2, 1>>();
        let scores =
            D::const_bmm(q, &keys_t) + mask.clone().broadcast_like::<_, Axis<0>>(&(h, n, t_ctx));
        // The softmax shift: a constant (no gradient), the max over context and self.
        let shift = scores
            .retaped::<NoneTape>()
            .max::<(usize, usize), Axis<2>>()
            .maximum(self_score.retaped::<NoneTape>());
        let e_ctx = (scores - shift.clone().broadcast_like::<_, Axis<2>>(&(h, n, t_ctx))).exp();
        let e_self = (self_score - shift).exp();
        let denom =
            e_ctx.with_empty_tape().sum::<(usize, usize), Axis<2>>() + e_self.with_empty_tape();
        let out =
            D::const_bmm(e_ctx, values) + e_self.broadcast_like::<_, Axis<2>>(&(h, n, dh)) * v_self;
        let out = out / denom.broadcast_like::<_, Axis<2>>(&(h, n, dh));
        out.permute::<(usize, usize, usize), Axes3<1, 0, 2>>().reshape_like(&(n, d))
    }

    /// One block on rows `x` (`n × d`). With `cache = Some((keys, values))` the rows attend to
    /// that cache; with `None` they attend to each other causally (the lower pass: the rows are
    /// positions `0..n` and the cache is their own keys/values). Returns the block output and
    /// the rows' keys and values as heads `(H, n, d_head)`, contiguous.
    fn block<T: Tape<f32, D>>(
        &self,
        b: &Block<D>,
        x: Mat<D, T>,
        cache: Option<(&Batch<D>, &Batch<D>)>,
        mask: &Mat<D>,
    ) -> (Mat<D, T>, Batch<D>, Batch<D>) {
        let eps = self.cfg.layer_norm_epsilon;
        let a = layer_norm(x.with_empty_tape(), &b.ln_1.weight, &b.ln_1.bias, eps);
        let q = linear(a.with_empty_tape(), &b.wq, &b.bq);
        let k = linear(a.with_empty_tape(), &b.wk, &b.bk);
        let v = linear(a, &b.wv, &b.bv);
        let n = x.shape().0;
        let (h, dh) = self.heads();
        let own_k = self.split_heads(k.retaped::<NoneTape>()).reshape_like(&(h, n, dh));
        let own_v = self.split_heads(v.retaped::<NoneTape>()).reshape_like(&(h, n, dh));
        let (keys, values) = cache.unwrap_or((&own_k, &own_v));
        let att = self.attend(q, k, v, keys, values, mask);
        let x = x + linear(att, &b.proj_w, &b.proj_b);
        let a = layer_norm(x.with_empty_tape(), &b.ln_2.weight, &b.ln_2.bias, eps);
        let mlp = linear(gelu_new(linear(a, &b.fc_w, &b.fc_b)), &b.out_w, &b.out_b);
        (x + mlp, own_k, own_v)
    }

    /// `ln_f` of rows.
    fn final_norm<T: Tape<f32, D>>(&self, x: Mat<D, T>) -> Mat<D, T> {
        layer_norm(x, &self.ln_f.weight, &self.ln_f.bias, self.cfg.layer_norm_epsilon)
    }

    /// `wte[token] + wpe[position]` for each `(token, position)` pair, `n × d`.
    fn embed(&self, tokens: &[u32], positions: &[usize]) -> Mat<D> {
        let n = tokens.len();
        let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
        let ids = self.dev.tensor_from_vec(ids, (n,));
        let pos = self.dev.tensor_from_vec(positions.to_vec(), (n,));
        let tok: Mat<D> = self.wte.clone().gather(ids);
        let pos: Mat<D> = self.wpe.clone().gather(pos);
        tok + pos
    }

    /// The full causal forward pass over `tokens`.
    fn forward_sequence(&self, tokens: &[u32]) -> SequenceCache {
        let t_len = tokens.len();
        let positions: Vec<usize> = (0..t_len).collect();
        let mask = self.mask(&positions, t_len);
        let mut x = self.embed(tokens, &positions);
        let mut hidden = vec![x.as_vec()];
        let mut kv = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (y, k, v) = self.block(b, x, None, &mask);
            x = y;
            hidden.push(x.as_vec());
            kv.push((k, v));
        }
        let final_norm = self.final_norm(x).as_vec();
        SequenceCache {
            tokens: tokens.to_vec(),
            hidden,
            kv: KvCache::on_device(D::wrap_kv(kv)),
            final_norm,
        }
    }

    /// The cached keys and values of blocks `from..` on the device, `(H, T, d_head)` each: the
    /// lower pass's own tensors, or the host copy uploaded once per context.
    fn upload_cache(&self, cache: &SequenceCache, from: usize) -> Vec<(Batch<D>, Batch<D>)> {
        let upload = || {
            let (h, dh) = self.heads();
            let t = cache.tokens.len();
            let host = cache.kv.host();
            host.keys
                .iter()
                .zip(&host.values)
                .map(|(k, v)| {
                    (
                        self.dev.tensor_from_vec(k.clone(), (h, t, dh)),
                        self.dev.tensor_from_vec(v.clone(), (h, t, dh)),
                    )
                })
                .collect::<Vec<_>>()
        };
        match D::kv_of(cache.kv.device.get_or_init(|| D::wrap_kv(upload()))) {
            Some(kv) => kv[from..].to_vec(),
            // Made on another kind of device: through the host.
            None => upload().split_off(from),
        }
    }

    /// The upper half from `layer` on rows `x` (`n × d`), row `r` at position `row_pos[r]`
    /// against the cached keys/values `kv` of blocks `layer..`: returns `u = ln_f(x_L)`.
    fn upper<T: Tape<f32, D>>(
        &self,
        layer: usize,
        x: Mat<D, T>,
        kv: &[(Batch<D>, Batch<D>)],
        row_pos: &[usize],
    ) -> Mat<D, T> {
        let t_ctx = kv.first().map_or(1, |(k, _)| k.shape().1);
        let mask = self.mask(row_pos, t_ctx);
        let mut x = x;
        for (b, (k, v)) in self.blocks[layer..].iter().zip(kv) {
            x = self.block(b, x, Some((k, v)), &mask).0;
        }
        self.final_norm(x)
    }

    /// The upper half from `layer` on rows `x` (`n × d`, all at `position`), stopped inside block
    /// `head.layer`: the scores `⟨q, k_i⟩/√d_h` of query head `head.head` against the keys
    /// `i = 0..=position` (the cached keys of `cache` below `position`, the rows' own key last),
    /// `n × (position + 1)`. The head's columns are picked out of `q` and `k` by a constant
    /// selector product, and the columns placed by two more, so only [`Engine`]'s input-only
    /// products enter the backward pass.
    fn head_scores<T: Tape<f32, D>>(
        &self,
        layer: usize,
        x: Mat<D, T>,
        kv: &[(Batch<D>, Batch<D>)],
        cache: &SequenceCache,
        position: usize,
        head: AttentionHead,
    ) -> Mat<D, T> {
        let t_ctx = kv.first().map_or(1, |(k, _)| k.shape().1);
        let n = x.shape().0;
        let mask = self.mask(&vec![position; n], t_ctx);
        let mut x = x;
        for (b, (k, v)) in self.blocks[layer..head.layer].iter().zip(kv) {
            x = self.block(b, x, Some((k, v)), &mask).0;
        }
        let b = &self.blocks[head.layer];
        let (d, (_, dh)) = (self.cfg.n_embd, self.heads());
        let (j, width) = (head.head, position + 1);
        let constant = |data: Vec<f32>, rows: usize, cols: usize| -> Mat<D> {
            self.dev.tensor_from_vec(data, (rows, cols))
        };
        let mut select = vec![0f32; d * dh];
        for c in 0..dh {
            select[(j * dh + c) * dh + c] = 1.0;
        }
        let select = constant(select, d, dh);
        let a = layer_norm(x, &b.ln_1.weight, &b.ln_1.bias, self.cfg.layer_norm_epsilon);
        let q = D::const_matmul(linear(a.with_empty_tape(), &b.wq, &b.bq), &select)
            * (1.0 / (dh as f32).sqrt());
        let k = D::const_matmul(linear(a, &b.wk, &b.bk), &select);
        let q_ctx = q.with_empty_tape();
        let own = (q * k).sum::<(usize,), Axis<1>>().reshape_like(&(n, 1));
        let mut last = vec![0f32; width];
        last[position] = 1.0;
        let scores = D::const_matmul(own, &constant(last, 1, width));
        if position == 0 {
            return scores;
        }
        // Head j's cached keys of positions < position, transposed: d_head × position.
        let t_len = cache.tokens.len();
        let keys = &cache.kv.host().keys[head.layer];
        let mut keys_t = vec![0f32; dh * position];
        for i in 0..position {
            for c in 0..dh {
                keys_t[c * position + i] = keys[(j * t_len + i) * dh + c];
            }
        }
        let mut place = vec![0f32; position * width];
        for i in 0..position {
            place[i * width + i] = 1.0;
        }
        let context = D::const_matmul(q_ctx, &constant(keys_t, dh, position));
        scores + D::const_matmul(context, &constant(place, position, width))
    }

    /// Logits `u · W_Uᵀ` of rows `u` (`n × d`), row-major `n × V`.
    fn unembed(&self, u: Mat<D>) -> Vec<f32> {
        u.matmul(self.lm_head_t.clone()).as_vec()
    }

    /// Input gradients of `Σ_r ⟨seeds_r, u(x_r)⟩` for rows `x` (`n × d`, row-major) at positions
    /// `row_pos`: one batched backward pass. Returns `n × d`, on the device.
    fn vjp(
        &self,
        layer: usize,
        kv: &[(Batch<D>, Batch<D>)],
        rows: Vec<f32>,
        row_pos: &[usize],
        seeds: Vec<f32>,
    ) -> Mat<D> {
        let n = row_pos.len();
        let d = self.cfg.n_embd;
        let x = self.dev.tensor_from_vec(rows, (n, d));
        let seeds = self.dev.tensor_from_vec(seeds, (n, d));
        let u = self.upper(layer, x.leaky_trace(), kv, row_pos);
        let grads = (u * seeds).sum::<Rank0, _>().backward();
        grads.get(&x)
    }

    /// `F = Aᵀ G A` on the device for one position, from its readout Jacobian `a` (`d × d`, on
    /// the device) and its next-token distribution `p` (`V`): the weighted Gram
    /// `G = Σ_y p_y (w_y − m)(w_y − m)ᵀ`, `m = W_Uᵀ p`, in vocabulary chunks of
    /// [`DEVICE_VOCAB_CHUNK`] rows, each chunk's product `BᵀB` (`B = diag(√p)(W − 1mᵀ)`) in f32
    /// and the chunks summed in f64; the sandwich in f64. Returns `F` row-major, not yet
    /// symmetrised.
    fn fisher_on_device(&self, a: Mat<D>, p: &[f32]) -> Vec<f64> {
        let (v, d) = (self.cfg.vocab_size, self.cfg.n_embd);
        let p_row: Mat<D> = self.dev.tensor_from_vec(p.to_vec(), (1, v));
        let mean: Vector<D> = p_row.matmul(self.lm_head.clone()).reshape_like(&(d,));
        let mut g: Mat64<D> = self.dev.zeros_like(&(d, d));
        for start in (0..v).step_by(DEVICE_VOCAB_CHUNK) {
            let end = (start + DEVICE_VOCAB_CHUNK).min(v);
            let c = end - start;
            let root: Vector<D> =
                self.dev.tensor_from_vec(p[start..end].iter().map(|x| x.sqrt()).collect(), (c,));
            let w: Mat<D> = self.lm_head.clone().slice((start..end, ..));
            let b = (w - mean.clone().broadcast_like::<_, Axis<0>>(&(c, d)))
                * root.broadcast_like::<_, Axis<1>>(&(c, d));
            let chunk = b.clone().permute::<(usize, usize), Axes2<1, 0>>().matmul(b);
            g = g + D::widen(chunk);
        }
        let a = D::widen(a);
        let ga = g.matmul(a.clone());
        a.permute::<(usize, usize), Axes2<1, 0>>().matmul(ga).as_vec()
    }

    /// The row of a new token at `position` against the first `position` positions of `cache`
    /// (blocks from 0).
    fn step(&self, cache: &SequenceCache, token: u32, position: usize) -> NewRow {
        let kv = self.upload_cache(cache, 0);
        let t_ctx = cache.tokens.len();
        let mask = self.mask(&[position], t_ctx);
        let mut x = self.embed(&[token], &[position]);
        let mut hidden = vec![x.as_vec()];
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (b, (k, v)) in self.blocks.iter().zip(&kv) {
            let (y, k_row, v_row) = self.block(b, x, Some((k, v)), &mask);
            x = y;
            hidden.push(x.as_vec());
            keys.push(k_row.as_vec());
            values.push(v_row.as_vec());
        }
        let final_norm = self.final_norm(x).as_vec();
        NewRow { hidden, keys, values, final_norm }
    }
}

impl Gpt2 {
    /// The inputs of one readout-Jacobian backward pass: `width` copies of `h_t` for each
    /// position of `chunk`, their positions, and the seed rows `e_{start}, …, e_{start+width−1}`
    /// (so the input gradient's rows are rows `start..start + width` of each `A_t`).
    fn identity_pass(
        &self,
        ctx: &Gpt2Context,
        chunk: &[usize],
        start: usize,
        width: usize,
    ) -> (Vec<f32>, Vec<usize>, Vec<f32>) {
        let d = self.cfg.n_embd;
        let groups: Vec<(usize, usize)> = chunk.iter().map(|&t| (t, width)).collect();
        let (rows, row_pos) = self.replicate(ctx, &groups);
        let mut seeds = vec![0f32; chunk.len() * width * d];
        for p in 0..chunk.len() {
            for r in 0..width {
                seeds[(p * width + r) * d + start + r] = 1.0;
            }
        }
        (rows, row_pos, seeds)
    }

    /// Copies of `h_t` for each `(position, copies)`, with each row's position.
    fn replicate(&self, ctx: &Gpt2Context, groups: &[(usize, usize)]) -> (Vec<f32>, Vec<usize>) {
        let d = self.cfg.n_embd;
        let hidden = &ctx.cache.hidden[ctx.layer];
        let mut rows = Vec::new();
        let mut row_pos = Vec::new();
        for &(t, copies) in groups {
            for _ in 0..copies {
                rows.extend_from_slice(&hidden[t * d..(t + 1) * d]);
                row_pos.push(t);
            }
        }
        (rows, row_pos)
    }
}

impl SplitModel for Gpt2 {
    type Scalar = f32;
    type Context = Gpt2Context;

    fn dims(&self) -> ModelDims {
        self.cfg.dims()
    }

    fn lower(&self, tokens: &[u32], layer: usize) -> Result<Gpt2Context, FsError> {
        Ok(self.lower_layers(tokens, &[layer])?.remove(0))
    }

    fn lower_layers(&self, tokens: &[u32], layers: &[usize]) -> Result<Vec<Gpt2Context>, FsError> {
        for &layer in layers {
            check_layer(layer, self.cfg.n_layer)?;
        }
        check_tokens(tokens, self.cfg.vocab_size, Some(self.cfg.n_positions))?;
        let cache = guarded(|| Ok(with_net!(self, net => net.forward_sequence(tokens))))?;
        let cache = SequenceCache::shared(cache);
        Ok(layers.iter().map(|&layer| Gpt2Context { layer, cache: cache.clone() }).collect())
    }

    fn activation(&self, ctx: &Gpt2Context, position: usize) -> Result<Vec<f32>, FsError> {
        check_position(position, ctx.cache.tokens.len())?;
        let d = self.cfg.n_embd;
        Ok(ctx.cache.hidden[ctx.layer][position * d..(position + 1) * d].to_vec())
    }

    fn upper_logits(
        &self,
        ctx: &Gpt2Context,
        position: usize,
        h: &[f32],
    ) -> Result<Vec<f32>, FsError> {
        let d = self.cfg.n_embd;
        check_position(position, ctx.cache.tokens.len())?;
        check_len("h", h.len(), d)?;
        check_finite("h", h)?;
        guarded(|| {
            Ok(with_net!(self, net => {
                let kv = net.upload_cache(&ctx.cache, ctx.layer);
                let x = net.dev.tensor_from_vec(h.to_vec(), (1, d));
                net.unembed(net.upper(ctx.layer, x, &kv, &[position]))
            }))
        })
    }

    /// The first `position + 1` rows of the cache with row `position` of `H_k` replaced by `h`
    /// and its `ln_f` row recomputed by the upper half. The other layers' activations and the
    /// blocks' keys/values keep their (stale) row `position`: the context is only used at layer
    /// `k`, and every single-row upper pass recomputes its own key/value from `h`.
    fn with_activation(
        &self,
        ctx: &Gpt2Context,
        position: usize,
        h: &[f32],
    ) -> Result<Gpt2Context, FsError> {
        let d = self.cfg.n_embd;
        let cache = &ctx.cache;
        let t_len = cache.tokens.len();
        check_position(position, t_len)?;
        check_len("h", h.len(), d)?;
        check_finite("h", h)?;
        let u = guarded(|| {
            Ok(with_net!(self, net => {
                let kv = net.upload_cache(cache, ctx.layer);
                let x = net.dev.tensor_from_vec(h.to_vec(), (1, d));
                net.upper(ctx.layer, x, &kv, &[position]).as_vec()
            }))
        })?;
        let keep = position + 1;
        let hidden = cache
            .hidden
            .iter()
            .enumerate()
            .map(|(layer, rows)| {
                let mut rows = rows[..keep * d].to_vec();
                if layer == ctx.layer {
                    rows[position * d..].copy_from_slice(h);
                }
                rows
            })
            .collect();
        let (heads, dh) = (self.cfg.n_head, d / self.cfg.n_head);
        let narrow_heads = |full: &Vec<f32>| -> Vec<f32> {
            (0..heads)
                .flat_map(|head| &full[head * t_len * dh..(head * t_len + keep) * dh])
                .copied()
                .collect()
        };
        let mut final_norm = cache.final_norm[..keep * d].to_vec();
        final_norm[position * d..].copy_from_slice(&u);
        let kv = cache.kv.host();
        Ok(Gpt2Context {
            layer: ctx.layer,
            cache: SequenceCache::shared(SequenceCache {
                tokens: cache.tokens[..keep].to_vec(),
                hidden,
                kv: KvCache::on_host(
                    kv.keys.iter().map(narrow_heads).collect(),
                    kv.values.iter().map(narrow_heads).collect(),
                ),
                final_norm,
            }),
        })
    }

    fn logits(&self, ctx: &Gpt2Context, positions: &[usize]) -> Result<Matrix<f32>, FsError> {
        check_positions(positions, ctx.cache.tokens.len())?;
        let (d, v) = (self.cfg.n_embd, self.cfg.vocab_size);
        if positions.is_empty() {
            return Ok(Matrix::zeros(0, v));
        }
        let rows: Vec<f32> = positions
            .iter()
            .flat_map(|&t| ctx.cache.final_norm[t * d..(t + 1) * d].iter().copied())
            .collect();
        let data = guarded(|| {
            Ok(with_net!(self, net => {
                net.unembed(net.dev.tensor_from_vec(rows, (positions.len(), d)))
            }))
        })?;
        Matrix::from_vec(positions.len(), v, data)
    }

    /// `S` copies of `h`, backward passes of `Σ_s ⟨w_{y_s} − m, u_s⟩` (`∂ log p_y/∂u = w_y − m`,
    /// `m = W_Uᵀp`; the unembedding stays out of the graph), as many copies per pass as the
    /// activation budget allows.
    fn score_gradients(
        &self,
        ctx: &Gpt2Context,
        position: usize,
        tokens: &[u32],
    ) -> Result<Matrix<f32>, FsError> {
        let d = self.cfg.n_embd;
        check_position(position, ctx.cache.tokens.len())?;
        check_tokens_in_vocab(tokens, self.cfg.vocab_size)?;
        if tokens.is_empty() {
            return Ok(Matrix::zeros(0, d));
        }
        let p = self.probabilities(ctx, position)?;
        let mut mean = vec![0f64; d];
        for (py, w) in p.iter().zip(self.lm_head_host.chunks_exact(d)) {
            for (m, &x) in mean.iter_mut().zip(w) {
                *m += *py as f64 * x as f64;
            }
        }
        let per_pass = self.rows_per_pass(ctx.layer, ctx.cache.tokens.len());
        let mut out = Vec::with_capacity(tokens.len() * d);
        for chunk in tokens.chunks(per_pass) {
            let seeds: Vec<f32> = chunk
                .iter()
                .flat_map(|&y| {
                    let w = &self.lm_head_host[y as usize * d..(y as usize + 1) * d];
                    w.iter().zip(&mean).map(|(&w, &m)| (w as f64 - m) as f32)
                })
                .collect();
            let (rows, row_pos) = self.replicate(ctx, &[(position, chunk.len())]);
            let g = guarded(|| {
                Ok(with_net!(self, net => {
                    let kv = net.upload_cache(&ctx.cache, ctx.layer);
                    net.vjp(ctx.layer, &kv, rows, &row_pos, seeds).as_vec()
                }))
            })?;
            out.extend(g);
        }
        Matrix::from_vec(tokens.len(), d, out)
    }

    /// With [`Gpt2::set_fisher_on_device`] (a CUDA model): the readout Jacobians as in
    /// [`readout_jacobians`](SplitModel::readout_jacobians) but left on the device, then each
    /// position's `F = Aᵀ G A` there (vocabulary chunks of `G` in f32 products summed in f64, the
    /// sandwich in f64); only `d × d` comes back (and the logits, for `p`).
    fn device_exact_fisher(
        &self,
        ctx: &Gpt2Context,
        positions: &[usize],
    ) -> Result<Option<Vec<Matrix<f64>>>, FsError> {
        if !self.fisher_on_device {
            return Ok(None);
        }
        check_positions(positions, ctx.cache.tokens.len())?;
        let d = self.cfg.n_embd;
        let (per_pass, rows_per_pass) = self.readout_batching(ctx.layer, ctx.cache.tokens.len());
        let logits = self.logits(ctx, positions)?;
        let mut out = Vec::with_capacity(positions.len());
        guarded(|| {
            with_net!(self, net => {
                let kv = net.upload_cache(&ctx.cache, ctx.layer);
                for (c, chunk) in positions.chunks(per_pass).enumerate() {
                    // parts[p]: position p's blocks of rows of A, in order.
                    let mut parts: Vec<Vec<Mat<_>>> = vec![Vec::new(); chunk.len()];
                    for start in (0..d).step_by(rows_per_pass) {
                        let width = (start + rows_per_pass).min(d) - start;
                        let (rows, row_pos, seeds) = self.identity_pass(ctx, chunk, start, width);
                        let g = net.vjp(ctx.layer, &kv, rows, &row_pos, seeds);
                        for (p, part) in parts.iter_mut().enumerate() {
                            part.push(g.clone().slice((p * width..(p + 1) * width, ..)));
                        }
                    }
                    for (p, part) in parts.into_iter().enumerate() {
                        let a = part
                            .into_iter()
                            .reduce(|a, b| (a, b).concat_along(Axis::<0>))
                            .expect("d ≥ 1 rows");
                        let row = logits.row(c * per_pass + p);
                        let prob: Vec<f32> = softmax(row)?.into_iter().map(|x| x as f32).collect();
                        let f = net.fisher_on_device(a, &prob);
                        let sym = (0..d * d)
                            .map(|ij| 0.5 * (f[ij] + f[(ij % d) * d + ij / d]))
                            .collect();
                        out.push(Matrix::from_vec(d, d, sym)?);
                    }
                }
                Ok(())
            })
        })?;
        Ok(Some(out))
    }

    /// `A_t = ∂u/∂h` at each position: `d` copies of `h_t` seeded with the identity rows, one
    /// backward pass for as many positions (or as many rows of one position's `A`) as the
    /// batching allows. Row `i` of the input gradient is row `i` of `A`.
    fn readout_jacobians(
        &self,
        ctx: &Gpt2Context,
        positions: &[usize],
    ) -> Result<Vec<Matrix<f32>>, FsError> {
        check_positions(positions, ctx.cache.tokens.len())?;
        let d = self.cfg.n_embd;
        let (per_pass, rows_per_pass) = self.readout_batching(ctx.layer, ctx.cache.tokens.len());
        let mut out = Vec::with_capacity(positions.len());
        guarded(|| {
            with_net!(self, net => {
                let kv = net.upload_cache(&ctx.cache, ctx.layer);
                for chunk in positions.chunks(per_pass) {
                    let mut a = vec![vec![0f32; d * d]; chunk.len()];
                    for start in (0..d).step_by(rows_per_pass) {
                        let end = (start + rows_per_pass).min(d);
                        let width = end - start;
                        let (rows, row_pos, seeds) = self.identity_pass(ctx, chunk, start, width);
                        let g = net.vjp(ctx.layer, &kv, rows, &row_pos, seeds).as_vec();
                        for (p, a) in a.iter_mut().enumerate() {
                            let block = &g[p * width * d..(p + 1) * width * d];
                            a[start * d..end * d].copy_from_slice(block);
                        }
                    }
                    for a in a {
                        out.push(Matrix::from_vec(d, d, a)?);
                    }
                }
                Ok(())
            })
        })?;
        Ok(out)
    }

    fn attention_heads(&self) -> usize {
        self.cfg.n_head
    }

    /// One single-row pass from the split layer to the head's scores (GPT-2 has no sliding
    /// windows: every key `0..=position` is visible).
    fn attention_scores(
        &self,
        ctx: &Gpt2Context,
        position: usize,
        head: AttentionHead,
        h: &[f32],
    ) -> Result<Vec<f32>, FsError> {
        let d = self.cfg.n_embd;
        let (seq_len, (layers, heads)) =
            (ctx.cache.tokens.len(), (self.cfg.n_layer, self.cfg.n_head));
        check_attention_query(head, position, seq_len, ctx.layer, layers, heads)?;
        check_len("h", h.len(), d)?;
        check_finite("h", h)?;
        guarded(|| {
            Ok(with_net!(self, net => {
                let kv = net.upload_cache(&ctx.cache, ctx.layer);
                let x = net.dev.tensor_from_vec(h.to_vec(), (1, d));
                net.head_scores(ctx.layer, x, &kv, &ctx.cache, position, head).as_vec()
            }))
        })
    }

    /// `J = ∂s/∂h`: `position + 1` copies of `h`, backward passes of `Σ_r s_{r, i_r}` (row `r`
    /// seeded with key `i_r`), as many copies per pass as the activation budget allows.
    fn attention_jacobian(
        &self,
        ctx: &Gpt2Context,
        position: usize,
        head: AttentionHead,
    ) -> Result<Matrix<f32>, FsError> {
        let (seq_len, (layers, heads)) =
            (ctx.cache.tokens.len(), (self.cfg.n_layer, self.cfg.n_head));
        check_attention_query(head, position, seq_len, ctx.layer, layers, heads)?;
        let (d, n) = (self.cfg.n_embd, position + 1);
        let per_pass = self.rows_per_pass(ctx.layer, ctx.cache.tokens.len()).max(1);
        let mut out = Vec::with_capacity(n * d);
        guarded(|| {
            with_net!(self, net => {
                let kv = net.upload_cache(&ctx.cache, ctx.layer);
                for start in (0..n).step_by(per_pass) {
                    let r = per_pass.min(n - start);
                    let (rows, _) = self.replicate(ctx, &[(position, r)]);
                    let x = net.dev.tensor_from_vec(rows, (r, d));
                    let s = net.head_scores(ctx.layer, x.leaky_trace(), &kv, &ctx.cache, position, head);
                    let mut seeds = vec![0f32; r * n];
                    for i in 0..r {
                        seeds[i * n + start + i] = 1.0;
                    }
                    let seeds: Mat<_> = net.dev.tensor_from_vec(seeds, (r, n));
                    let grads = (s * seeds).sum::<Rank0, _>().backward();
                    out.extend(grads.get(&x).as_vec());
                }
                Ok(())
            })
        })?;
        Matrix::from_vec(n, d, out)
    }

    fn unembedding(&self) -> fs_traits::Unembedding<'_, f32> {
        MatrixRef::new(self.cfg.vocab_size, self.cfg.n_embd, &self.lm_head_host)
            .expect("lm_head host copy has V·d elements by construction")
            .into()
    }

    /// Reuses the cached prefix: the new token runs as one row through every block against the
    /// keys/values of positions `< prefix_len` (position id `prefix_len`), and the new context
    /// is the prefix's cache plus that row.
    fn extend(
        &self,
        ctx: &Gpt2Context,
        prefix_len: usize,
        token: u32,
    ) -> Result<Gpt2Context, FsError> {
        let cache = &ctx.cache;
        let t_len = cache.tokens.len();
        if prefix_len > t_len {
            return Err(FsError::invalid(
                "prefix_len",
                prefix_len,
                format!("at most the sequence length {t_len}"),
            ));
        }
        let mut tokens = cache.tokens[..prefix_len].to_vec();
        tokens.push(token);
        check_tokens(&tokens, self.cfg.vocab_size, Some(self.cfg.n_positions))?;
        let row = guarded(|| Ok(with_net!(self, net => net.step(cache, token, prefix_len))))?;
        let d = self.cfg.n_embd;
        let (h, dh) = (self.cfg.n_head, d / self.cfg.n_head);
        let hidden = cache
            .hidden
            .iter()
            .zip(&row.hidden)
            .map(|(old, new)| [&old[..prefix_len * d], new.as_slice()].concat())
            .collect();
        // Keys/values are (H, T, d_head): keep each head's first prefix_len rows, append the new.
        let extend_heads = |old: &[f32], new: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(h * (prefix_len + 1) * dh);
            for head in 0..h {
                out.extend_from_slice(&old[head * t_len * dh..(head * t_len + prefix_len) * dh]);
                out.extend_from_slice(&new[head * dh..(head + 1) * dh]);
            }
            out
        };
        let kv = cache.kv.host();
        let keys = kv.keys.iter().zip(&row.keys).map(|(o, n)| extend_heads(o, n)).collect();
        let values = kv.values.iter().zip(&row.values).map(|(o, n)| extend_heads(o, n)).collect();
        let final_norm = [&cache.final_norm[..prefix_len * d], row.final_norm.as_slice()].concat();
        Ok(Gpt2Context {
            layer: ctx.layer,
            cache: SequenceCache::shared(SequenceCache {
                tokens,
                hidden,
                kv: KvCache::on_host(keys, values),
                final_norm,
            }),
        })
    }
}
