//! What every KV-cached transformer on burn shares: the context of a lower pass, the cached
//! attention of single rows, and the [`SplitModel`](fs_traits::SplitModel) methods that only need
//! a model's single-position upper half (readout Jacobians, score gradients, logits).
//!
//! A model implements [`CachedUpper`] (its forward pass over a sequence and its upper half on
//! replicated rows) and gets its `SplitModel` impl from the crate-internal `impl_split_model!`.

use crate::ops::softmax_last_dim;
use burn::tensor::{Device, Int, Tensor, TensorData};
use fs_checkpoint::{HostMatrix, Linear};
use fs_traits::engine::{check_positions, readout_batching};
use fs_traits::{
    check_attention_query, check_finite, check_layer, check_len, check_position, check_tokens,
    check_tokens_in_vocab, mask_invisible_scores, softmax, visible_keys, AttentionHead, FsError,
    Matrix, MatrixRef, ModelDims, SplitContext,
};

/// Default bytes of activations one readout-Jacobian backward pass may keep alive.
pub(crate) const DEFAULT_ACTIVATION_BUDGET: usize = 512 << 20;

/// Read a tensor back to the host as `f32` (a failed read-back becomes [`FsError::Backend`]).
pub(crate) fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, FsError> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| FsError::Backend(format!("burn: {}", crate::one_line(&e))))
}

/// A float tensor of `shape` from host data on `device`.
pub(crate) fn tensor<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// An index tensor on `device`.
pub(crate) fn indices(ids: impl IntoIterator<Item = usize>, device: &Device) -> Tensor<1, Int> {
    let ids: Vec<i64> = ids.into_iter().map(|i| i as i64).collect();
    let n = ids.len();
    Tensor::from_data(TensorData::new(ids, [n]), device)
}

/// The result of a lower pass: layer-`k` activations, the key/value cache of blocks `≥ k`, and
/// the final-norm output of every position (for the unperturbed logits). All tensors live on the
/// plain (non-autodiff) device.
pub struct CachedContext {
    pub(crate) layer: usize,
    pub(crate) tokens: Vec<u32>,
    /// `H_k` (`T × d`).
    pub(crate) hidden: Tensor<2>,
    /// Keys of blocks `k..n_layer`, each `(H, T, d_head)` (after RoPE where the model has it,
    /// with grouped key/value heads already repeated to `H`).
    pub(crate) keys: Vec<Tensor<3>>,
    /// Values of blocks `k..n_layer`, each `(H, T, d_head)`.
    pub(crate) values: Vec<Tensor<3>>,
    /// `norm_f(h_L)` (`T × d`).
    pub(crate) final_norm: Tensor<2>,
}

impl SplitContext for CachedContext {
    fn layer(&self) -> usize {
        self.layer
    }
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

impl CachedContext {
    /// One context per requested layer from a full forward pass: `hidden[k]` = layer-`k`
    /// activations (`k = 0..=n_layer`), `keys[i]` / `values[i]` = block `i`'s cache.
    pub(crate) fn for_layers(
        tokens: &[u32],
        layers: &[usize],
        hidden: &[Tensor<2>],
        keys: &[Tensor<3>],
        values: &[Tensor<3>],
        final_norm: &Tensor<2>,
    ) -> Vec<CachedContext> {
        layers
            .iter()
            .map(|&layer| CachedContext {
                layer,
                tokens: tokens.to_vec(),
                hidden: hidden[layer].clone(),
                keys: keys[layer..].to_vec(),
                values: values[layer..].to_vec(),
                final_norm: final_norm.clone(),
            })
            .collect()
    }
}

/// Uploads typed host weights (`fs-checkpoint`) to one device: every model's `new` builds its
/// tensors with it.
pub(crate) struct Upload<'a>(pub(crate) &'a Device);

impl Upload<'_> {
    /// A `rows × cols` matrix.
    pub(crate) fn matrix(&self, m: HostMatrix) -> Tensor<2> {
        tensor(m.data, [m.rows, m.cols], self.0)
    }
    /// A vector.
    pub(crate) fn vector(&self, v: Vec<f32>) -> Tensor<1> {
        let n = v.len();
        tensor(v, [n], self.0)
    }
    /// A linear layer: weight `[in, out]` and its bias, if any.
    pub(crate) fn linear(&self, l: Linear) -> (Tensor<2>, Option<Tensor<1>>) {
        (self.matrix(l.weight), l.bias.map(|b| self.vector(b)))
    }
}

/// What every cached model reads out with, beside its blocks: the plain (non-autodiff) device,
/// the dimensions, the unembedding `W_U` (on the device for the passes, on the host for the
/// estimators' weighted Gram) and the memory budget of the readout-Jacobian passes.
pub(crate) struct Readout {
    pub(crate) device: Device,
    pub(crate) dims: ModelDims,
    /// `W_U` (`V × d`) on the device: the token embedding when tied.
    pub(crate) lm_head: Tensor<2>,
    /// `W_U` on the host, row-major.
    pub(crate) lm_head_host: Vec<f32>,
    /// Bytes of activations one readout-Jacobian backward pass may keep alive.
    pub(crate) activation_budget: usize,
    /// Approximate autodiff bytes per replicated row per block.
    pub(crate) bytes_per_row_per_block: usize,
    /// The final-logit soft-cap `c` (`z = c·tanh(W_U u / c)`), if the model has one.
    pub(crate) final_logit_softcap: Option<f64>,
    /// Whether `SplitModel::device_exact_fisher` forms the exact Fisher on the device
    /// ([`device_exact_fisher`]): on for a GPU (wgpu, CUDA) model, off on the CPU backend (where
    /// the host estimators are faster and exact to f64); settable for tests.
    pub(crate) fisher_on_device: bool,
}

impl Readout {
    /// Upload the token embedding and build the readout on the plain view of `device`: `W_U`
    /// is `lm_head` when the checkpoint has one, else the (tied) embedding. Returns the
    /// embedding too.
    pub(crate) fn with_embedding(
        device: &Device,
        dims: ModelDims,
        embed: HostMatrix,
        lm_head: Option<HostMatrix>,
        bytes_per_row_per_block: usize,
    ) -> (Tensor<2>, Readout) {
        let device = device.clone().without_autodiff();
        let on_gpu = device != Device::flex();
        let up = Upload(&device);
        let lm_head_host = lm_head.as_ref().unwrap_or(&embed).data.clone();
        let embed = up.matrix(embed);
        let lm_head = lm_head.map_or_else(|| embed.clone(), |m| up.matrix(m));
        let readout = Readout {
            device,
            dims,
            lm_head,
            lm_head_host,
            activation_budget: DEFAULT_ACTIVATION_BUDGET,
            bytes_per_row_per_block,
            final_logit_softcap: None,
            fisher_on_device: on_gpu,
        };
        (embed, readout)
    }

    /// Logits `z = W_U u` (soft-capped when the model caps) of readout rows `u` `(n, d_u)`.
    pub(crate) fn logits_of(&self, u: Tensor<2>) -> Tensor<2> {
        let z = u.matmul(self.lm_head.clone().transpose());
        match self.final_logit_softcap {
            None => z,
            Some(c) => z.div_scalar(c).tanh().mul_scalar(c),
        }
    }

    /// Wait for the uploads to finish (a device error surfaces here, not at the first pass).
    pub(crate) fn sync(&self) -> Result<(), crate::Error> {
        self.device.sync().map_err(|e| crate::Error::Burn(crate::one_line(&e)))
    }
}

/// A transformer whose upper half can run on single rows against a key/value cache.
pub(crate) trait CachedUpper {
    /// The device, dimensions, unembedding and pass budget.
    fn readout(&self) -> &Readout;
    /// The plain (non-autodiff) device the weights live on.
    fn device(&self) -> &Device {
        &self.readout().device
    }
    fn model_dims(&self) -> ModelDims {
        self.readout().dims
    }
    /// `W_U` on the host (`V × d`, row-major).
    fn lm_head_host(&self) -> &[f32] {
        &self.readout().lm_head_host
    }
    /// Bytes of activations one readout-Jacobian pass may keep alive.
    fn activation_budget(&self) -> usize {
        self.readout().activation_budget
    }
    /// Approximate autodiff bytes per replicated row per block.
    fn bytes_per_row_per_block(&self) -> usize {
        self.readout().bytes_per_row_per_block
    }
    /// The full causal forward pass (validated tokens), one context per requested layer.
    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<CachedContext>;
    /// The upper half on rows `h` `(P, R, d)`, row `(p, r)` at position `positions[p]`:
    /// `u = norm_f(x_L)`, `(P, R, d)` — or, with `stop`, the pass stopped inside block
    /// `stop.layer` (`P = 1`): the scores of query head `stop.head` against the keys
    /// `0..=position` ([`head_scores`]), `(1, R, position + 1)`, before any mask.
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: Tensor<3>,
        stop: Option<AttentionHead>,
    ) -> Tensor<3>;
    /// [`run_upper`](Self::run_upper) to the readout `u`.
    fn upper(&self, ctx: &CachedContext, positions: &[usize], h: Tensor<3>) -> Tensor<3> {
        self.run_upper(ctx, positions, h, None)
    }
    /// [`run_upper`](Self::run_upper) to the scores of `head` at `position`.
    fn upper_scores(
        &self,
        ctx: &CachedContext,
        position: usize,
        h: Tensor<3>,
        head: AttentionHead,
    ) -> Tensor<3> {
        self.run_upper(ctx, &[position], h, Some(head))
    }
    /// Query heads per block, and the sliding window of block `layer` (`None`: full causal).
    fn attention_layout(&self, layer: usize) -> (usize, Option<usize>);
}

/// How one attention layer scores: `s = scale · q·k`, then `s ← cap·tanh(s/cap)` when
/// soft-capped, then the causal mask, narrowed to `i − j < window` for sliding layers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attention {
    pub(crate) scale: f64,
    pub(crate) softcap: Option<f64>,
    pub(crate) window: Option<usize>,
}

impl Attention {
    /// Plain scaled dot-product attention over every earlier position.
    pub(crate) fn plain(scale: f64) -> Self {
        Attention { scale, softcap: None, window: None }
    }

    /// Raw scores `q·k` → scaled and soft-capped scores.
    pub(crate) fn scores<const D: usize>(&self, raw: Tensor<D>) -> Tensor<D> {
        let s = raw.mul_scalar(self.scale);
        match self.softcap {
            None => s,
            Some(c) => s.div_scalar(c).tanh().mul_scalar(c),
        }
    }
}

/// [`fs_traits::engine::context_mask`] as a `(P, 1, 1, t_max)` tensor; `None` when no row has
/// any context.
pub(crate) fn context_mask(
    positions: &[usize],
    window: Option<usize>,
    device: &Device,
) -> Option<(Tensor<4>, usize)> {
    fs_traits::engine::context_mask(positions, window)
        .map(|(m, t_max)| (tensor(m, [positions.len(), 1, 1, t_max], device), t_max))
}

/// Attention of single rows against the cache: `q`, `k_self`, `v_self` are `(P, H, R, d_head)`;
/// each row attends to the cached keys/values `(H, T, d_head)` of positions `< t_p` (through
/// `mask`) and to its own key/value:
///
/// ```text
///     s_ctx = cap(q·K_ctxᵀ·scale) + mask,   s_self = cap(⟨q, k_self⟩·scale),
///     out = softmax([s_ctx, s_self]) · [V_ctx; v_self]
/// ```
///
/// Returns `(P, H, R, d_head)`.
pub(crate) fn attend_cached(
    q: Tensor<4>,
    k_self: Tensor<4>,
    v_self: Tensor<4>,
    keys: &Tensor<3>,
    values: &Tensor<3>,
    mask: Option<&(Tensor<4>, usize)>,
    attn: &Attention,
) -> Tensor<4> {
    match mask {
        None => v_self,
        Some((mask, t_max)) => {
            let self_score = attn.scores(q.clone().mul(k_self).sum_dim(3));
            let k_ctx = keys.clone().narrow(1, 0, *t_max).unsqueeze::<4>();
            let v_ctx = values.clone().narrow(1, 0, *t_max).unsqueeze::<4>();
            let ctx_scores = attn.scores(q.matmul(k_ctx.swap_dims(2, 3))).add(mask.clone());
            let probs = softmax_last_dim(Tensor::cat(vec![ctx_scores, self_score], 3));
            let p_ctx = probs.clone().narrow(3, 0, *t_max);
            let p_self = probs.narrow(3, *t_max, 1);
            p_ctx.matmul(v_ctx).add(p_self.mul(v_self))
        }
    }
}

/// The scores of query head `head` for single rows at `position` (`P = 1`): queries `q` and
/// the rows' own keys `k_self` `(1, H, R, d_head)` against the cached keys `(H, T, d_head)` of
/// positions `< position`, scaled and soft-capped as the layer does ([`Attention::scores`]), no
/// mask: `(1, R, position + 1)`, the own key last.
pub(crate) fn head_scores(
    q: Tensor<4>,
    k_self: Tensor<4>,
    keys: &Tensor<3>,
    position: usize,
    head: usize,
    attn: &Attention,
) -> Tensor<3> {
    let [_, _, r, _] = q.dims();
    let q = q.narrow(1, head, 1);
    let own = q.clone().mul(k_self.narrow(1, head, 1)).sum_dim(3);
    let raw = if position == 0 {
        own
    } else {
        let k_ctx = keys.clone().narrow(0, head, 1).narrow(1, 0, position).unsqueeze::<4>();
        Tensor::cat(vec![q.matmul(k_ctx.swap_dims(2, 3)), own], 3)
    };
    attn.scores(raw).reshape([1, r, position + 1])
}

/// Causal self-attention over a whole sequence: `q`, `k`, `v` `(H, T, d_head)`.
pub(crate) fn causal_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    attn: &Attention,
) -> Tensor<3> {
    let [_, t_len, _] = q.dims();
    let causal =
        tensor(fs_traits::engine::causal_mask(t_len, attn.window), [1, t_len, t_len], &q.device());
    let scores = attn.scores(q.matmul(k.swap_dims(1, 2))).add(causal);
    softmax_last_dim(scores).matmul(v)
}

/// `r` copies of each `h_{positions[p]}` as a leaf `(P, r, d)` on the autodiff view of the
/// device, marked `require_grad` (the only tensor the backward pass computes a gradient for).
fn replicated_leaf<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
    r: usize,
) -> Result<Tensor<3>, FsError> {
    // Selected and repeated on the device (no host round trip), then a leaf with autodiff on.
    let rows = ctx.hidden.clone().select(0, indices(positions.iter().copied(), m.device()));
    let replicas: Tensor<3> = rows.unsqueeze_dim(1).repeat_dim(1, r);
    Ok(replicas.autodiff().require_grad())
}

/// The gradient of the leaf `h` after `loss.backward()`, on the host.
fn leaf_gradient(loss: Tensor<1>, h: &Tensor<3>) -> Result<Vec<f32>, FsError> {
    read(leaf_gradient_on_device(loss, h)?)
}

/// The gradient of the leaf `h` after `loss.backward()`, left on the device.
fn leaf_gradient_on_device(loss: Tensor<1>, h: &Tensor<3>) -> Result<Tensor<3>, FsError> {
    let grads = loss.backward();
    h.grad(&grads)
        .ok_or_else(|| FsError::Backend("burn: no gradient reached the activation".into()))
}

/// `SplitModel::lower_layers`.
pub(crate) fn lower_layers<M: CachedUpper>(
    m: &M,
    tokens: &[u32],
    layers: &[usize],
) -> Result<Vec<CachedContext>, FsError> {
    let dims = m.model_dims();
    for &layer in layers {
        check_layer(layer, dims.n_layers)?;
    }
    check_tokens(tokens, dims.vocab_size, dims.max_seq_len)?;
    Ok(m.forward_sequence(tokens, layers))
}

/// `SplitModel::activation`.
pub(crate) fn activation<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
) -> Result<Vec<f32>, FsError> {
    check_position(position, ctx.tokens.len())?;
    read(ctx.hidden.clone().select(0, indices([position], m.device())))
}

/// `SplitModel::upper_logits`: `z = W_U · u(h)` for one row `h` at `position`.
pub(crate) fn upper_logits<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    h: &[f32],
) -> Result<Vec<f32>, FsError> {
    let d = m.model_dims().d_model;
    check_position(position, ctx.tokens.len())?;
    check_len("h", h.len(), d)?;
    check_finite("h", h)?;
    let h = tensor(h.to_vec(), [1, 1, d], m.device());
    let u = m.upper(ctx, &[position], h).reshape([1, d]);
    read(m.readout().logits_of(u))
}

/// `SplitModel::with_activation`: the first `position + 1` rows of the cache, with row
/// `position` of `H_k` replaced by `h` and its final-norm row recomputed by the upper half. The
/// keys/values of blocks `≥ k` keep their (stale) row `position`: every single-row upper pass
/// recomputes its own key/value from `h` and reads the cache only below `position`.
pub(crate) fn with_activation<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    h: &[f32],
) -> Result<CachedContext, FsError> {
    let d = m.model_dims().d_model;
    check_position(position, ctx.tokens.len())?;
    check_len("h", h.len(), d)?;
    check_finite("h", h)?;
    let row = tensor(h.to_vec(), [1, d], m.device());
    let u = m.upper(ctx, &[position], row.clone().reshape([1, 1, d])).reshape([1, d]);
    let keep = |full: &Tensor<2>, new_row: Tensor<2>| -> Tensor<2> {
        if position == 0 {
            new_row
        } else {
            Tensor::cat(vec![full.clone().narrow(0, 0, position), new_row], 0)
        }
    };
    let narrow = |cache: &[Tensor<3>]| -> Vec<Tensor<3>> {
        cache.iter().map(|c| c.clone().narrow(1, 0, position + 1)).collect()
    };
    Ok(CachedContext {
        layer: ctx.layer,
        tokens: ctx.tokens[..=position].to_vec(),
        hidden: keep(&ctx.hidden, row),
        keys: narrow(&ctx.keys),
        values: narrow(&ctx.values),
        final_norm: keep(&ctx.final_norm, u),
    })
}

/// `SplitModel::logits`: the cached final-norm rows times `W_Uᵀ`.
pub(crate) fn logits<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
) -> Result<Matrix<f32>, FsError> {
    check_positions(positions, ctx.tokens.len())?;
    let v = m.model_dims().vocab_size;
    if positions.is_empty() {
        return Ok(Matrix::zeros(0, v));
    }
    let rows = ctx.final_norm.clone().select(0, indices(positions.iter().copied(), m.device()));
    let data = read(m.readout().logits_of(rows))?;
    Matrix::from_vec(positions.len(), v, data)
}

/// `SplitModel::score_gradients`: `S` replicas of `h`, one backward pass of
/// `Σ_s ⟨w_{y_s} − m, u_s⟩` (`∂ log p_y/∂u = w_y − m`, `m = W_Uᵀp`; the unembedding stays out of
/// the autodiff graph: the coefficients are formed on the host, `m` accumulated in `f64`).
pub(crate) fn score_gradients<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    tokens: &[u32],
) -> Result<Matrix<f32>, FsError> {
    let dims = m.model_dims();
    check_position(position, ctx.tokens.len())?;
    check_tokens_in_vocab(tokens, dims.vocab_size)?;
    let d = dims.d_model;
    if tokens.is_empty() {
        return Ok(Matrix::zeros(0, d));
    }
    let z = logits(m, ctx, &[position])?;
    let p = softmax(z.as_slice())?;
    // With a final soft-cap, ∂z_y/∂u = s_y w_y: the slopes weight every row.
    let slopes = fs_traits::logit_slopes(m.readout().final_logit_softcap, z.as_slice());
    let slope = |y: usize| slopes.as_ref().map_or(1.0, |s| s[y]);
    let w_u = m.lm_head_host();
    let mut mean = vec![0f64; d];
    for (y, (&p, w)) in p.iter().zip(w_u.chunks_exact(d)).enumerate() {
        let ps = p * slope(y);
        for (mi, &wi) in mean.iter_mut().zip(w) {
            *mi += ps * wi as f64;
        }
    }
    let coeff: Vec<f32> = tokens
        .iter()
        .flat_map(|&y| {
            let sy = slope(y as usize);
            let w = &w_u[y as usize * d..(y as usize + 1) * d];
            w.iter().zip(&mean).map(|(&wi, mi)| (sy * wi as f64 - mi) as f32).collect::<Vec<_>>()
        })
        .collect();
    readout_vjp(m, ctx, position, Matrix::from_vec(tokens.len(), d, coeff)?.view())
}

/// `SplitModel::readout_vjp`: `R` replicas of the position's activation, one backward pass of
/// `Σ_i ⟨w_i, u_i⟩`.
pub(crate) fn readout_vjp<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    cotangents: MatrixRef<'_, f32>,
) -> Result<Matrix<f32>, FsError> {
    let dims = m.model_dims();
    check_position(position, ctx.tokens.len())?;
    check_len("cotangent length (d_u)", cotangents.cols(), dims.readout_dim)?;
    check_finite("cotangents", cotangents.as_slice())?;
    let r = cotangents.rows();
    if r == 0 {
        return Ok(Matrix::zeros(0, dims.d_model));
    }
    let c = tensor(cotangents.as_slice().to_vec(), [1, r, dims.readout_dim], m.device());
    let h = replicated_leaf(m, ctx, &[position], r)?;
    let u = m.upper(ctx, &[position], h.clone());
    let data = leaf_gradient(u.mul(c).sum(), &h)?;
    Matrix::from_vec(r, dims.d_model, data)
}

/// Rows `rows` of the readout Jacobians at `positions`: one backward pass of
/// `Σ_p Σ_i ⟨e_{rows.start+i}, u_{p,i}⟩` over `rows.len()` replicas of each `h_t`. Returns one
/// `rows.len() × d` block per position.
fn readout_jacobian_rows<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
    rows: std::ops::Range<usize>,
) -> Result<Vec<Vec<f32>>, FsError> {
    let (d, r) = (m.model_dims().d_model, rows.len());
    let g = read(readout_jacobian_rows_on_device(m, ctx, positions, rows)?)?;
    Ok(g.chunks_exact(r * d).map(<[f32]>::to_vec).collect())
}

/// [`readout_jacobian_rows`] left on the device: `(P, rows.len(), d)`.
fn readout_jacobian_rows_on_device<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
    rows: std::ops::Range<usize>,
) -> Result<Tensor<3>, FsError> {
    let d = m.model_dims().d_model;
    let r = rows.len();
    let h = replicated_leaf(m, ctx, positions, r)?;
    let u = m.upper(ctx, positions, h.clone());
    // Row i of the selector is e_{rows.start + i}, built on the device.
    let ids = Tensor::<1, Int>::arange(rows.start as i64..rows.end as i64, m.device());
    let selector: Tensor<3> = ids.one_hot::<2>(d).float().reshape([1, r, d]);
    leaf_gradient_on_device(u.mul(selector).sum(), &h)
}

/// `SplitModel::readout_jacobians`, under the model's activation budget.
pub(crate) fn readout_jacobians<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
) -> Result<Vec<Matrix<f32>>, FsError> {
    check_positions(positions, ctx.tokens.len())?;
    let dims = m.model_dims();
    let d = dims.d_model;
    // A backward pass keeps every upper block's activations alive for each row.
    let bytes_per_row = m.bytes_per_row_per_block() * (dims.n_layers - ctx.layer).max(1);
    let (per_pass, rows_per_pass) = readout_batching(d, bytes_per_row, m.activation_budget());
    let mut out = Vec::with_capacity(positions.len());
    for chunk in positions.chunks(per_pass) {
        let mut buffers = vec![Vec::with_capacity(d * d); chunk.len()];
        for start in (0..d).step_by(rows_per_pass) {
            let rows = start..(start + rows_per_pass).min(d);
            let part = readout_jacobian_rows(m, ctx, chunk, rows)?;
            for (b, p) in buffers.iter_mut().zip(part) {
                b.extend_from_slice(&p);
            }
        }
        for a in buffers {
            out.push(Matrix::from_vec(d, d, a)?);
        }
    }
    Ok(out)
}

/// Check an attention request ([`fs_traits::check_attention_query`]); the window of the
/// head's block.
fn check_attention<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    head: AttentionHead,
) -> Result<Option<usize>, FsError> {
    let (heads, _) = m.attention_layout(0);
    let n_layers = m.model_dims().n_layers;
    check_attention_query(head, position, ctx.tokens.len(), ctx.layer, n_layers, heads)?;
    Ok(m.attention_layout(head.layer).1)
}

/// `SplitModel::attention_scores`: one single-row pass stopped at the head's block; keys
/// outside the layer's window set to `−∞`.
pub(crate) fn attention_scores<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    head: AttentionHead,
    h: &[f32],
) -> Result<Vec<f32>, FsError> {
    let window = check_attention(m, ctx, position, head)?;
    let d = m.model_dims().d_model;
    check_len("h", h.len(), d)?;
    check_finite("h", h)?;
    let h = tensor(h.to_vec(), [1, 1, d], m.device());
    let mut s = read(m.upper_scores(ctx, position, h, head))?;
    check_len("attention scores", s.len(), position + 1)?;
    mask_invisible_scores(&mut s, position, window);
    Ok(s)
}

/// Keys per backward pass of [`attention_jacobian`].
const ATTENTION_ROWS_PER_PASS: usize = 256;

/// `SplitModel::attention_jacobian`: for the keys the query sees (only those: under a sliding
/// window the rest stay zero), `R` replicas of the activation through the upper half up to the
/// head's scores and one backward pass of `Σ_r s_{r, i_r}` per group of keys `i_r`.
pub(crate) fn attention_jacobian<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    head: AttentionHead,
) -> Result<Matrix<f32>, FsError> {
    let window = check_attention(m, ctx, position, head)?;
    let (n, d) = (position + 1, m.model_dims().d_model);
    let mut out = vec![0f32; n * d];
    for keys in visible_keys(position, window).chunks(ATTENTION_ROWS_PER_PASS) {
        let r = keys.len();
        let h = replicated_leaf(m, ctx, &[position], r)?;
        let s = m.upper_scores(ctx, position, h.clone(), head);
        let mut pick = vec![0f32; r * n];
        for (row, &key) in keys.iter().enumerate() {
            pick[row * n + key] = 1.0;
        }
        let pick = tensor(pick, [1, r, n], m.device());
        let rows = leaf_gradient(s.mul(pick).sum(), &h)?;
        for (&key, row) in keys.iter().zip(rows.chunks_exact(d)) {
            out[key * d..(key + 1) * d].copy_from_slice(row);
        }
    }
    Matrix::from_vec(n, d, out)
}

/// Vocabulary rows per chunk of the device Gram ([`output_gram_on_device`]).
const DEVICE_VOCAB_CHUNK: usize = 8192;

/// The centered output Gram `G = Σ_y p_y (s_y w_y − m)(s_y w_y − m)ᵀ` of one position's logits
/// `z` on the readout's device, in f32 (wgpu has no f64): `p` and the soft-cap slopes `s` in
/// f64 on the host, uploaded once; `m = W_Uᵀ(p ⊙ s)`, then per vocabulary chunk the centered,
/// scaled rows `√p_y (s_y w_y − m)` and their product, summed on the device. `(d_u, d_u)`.
fn output_gram_on_device(r: &Readout, z: &[f32]) -> Result<Tensor<2>, FsError> {
    let (v, du) = (r.dims.vocab_size, r.dims.readout_dim);
    let p = softmax(z)?;
    let slopes = fs_traits::logit_slopes(r.final_logit_softcap, z);
    let slope = |y: usize| slopes.as_ref().map_or(1.0, |s| s[y]);
    let column = |f: &dyn Fn(usize) -> f64| -> Tensor<2> {
        tensor((0..v).map(|y| f(y) as f32).collect(), [v, 1], &r.device)
    };
    let ps = column(&|y| p[y] * slope(y));
    let root_p = column(&|y| p[y].sqrt());
    let s = slopes.is_some().then(|| column(&|y| slope(y)));
    let m = ps.transpose().matmul(r.lm_head.clone());
    let mut g = Tensor::<2>::zeros([du, du], &r.device);
    for start in (0..v).step_by(DEVICE_VOCAB_CHUNK) {
        let n = DEVICE_VOCAB_CHUNK.min(v - start);
        let mut w = r.lm_head.clone().narrow(0, start, n);
        if let Some(s) = &s {
            w = w.mul(s.clone().narrow(0, start, n));
        }
        let b = w.sub(m.clone()).mul(root_p.clone().narrow(0, start, n));
        g = g.add(b.clone().transpose().matmul(b));
    }
    Ok(g)
}

/// `SplitModel::device_exact_fisher`: with [`Readout::fisher_on_device`] (a wgpu or CUDA model),
/// the readout Jacobians by backward passes left on the device, each position's Gram
/// [`output_gram_on_device`] and the sandwich `Aᵀ G A` there, in f32 (burn's wgpu backend has no
/// f64; the error against the host's f64 accumulation is measured in the suite); only the
/// `d × d` matrices are read back and symmetrised in f64. `None` otherwise.
pub(crate) fn device_exact_fisher<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
) -> Result<Option<Vec<Matrix<f64>>>, FsError> {
    let r = m.readout();
    if !r.fisher_on_device {
        return Ok(None);
    }
    check_positions(positions, ctx.tokens.len())?;
    let dims = r.dims;
    let (d, du) = (dims.d_model, dims.readout_dim);
    let z = logits(m, ctx, positions)?;
    let bytes_per_row = m.bytes_per_row_per_block() * (dims.n_layers - ctx.layer).max(1);
    let (per_pass, rows_per_pass) = readout_batching(d, bytes_per_row, m.activation_budget());
    let mut out = Vec::with_capacity(positions.len());
    for (c, chunk) in positions.chunks(per_pass).enumerate() {
        let parts = (0..du)
            .step_by(rows_per_pass)
            .map(|start| {
                let rows = start..(start + rows_per_pass).min(du);
                readout_jacobian_rows_on_device(m, ctx, chunk, rows)
            })
            .collect::<Result<Vec<_>, FsError>>()?;
        let a = Tensor::cat(parts, 1);
        for i in 0..chunk.len() {
            let g = output_gram_on_device(r, z.row(c * per_pass + i))?;
            let a = a.clone().narrow(0, i, 1).reshape([du, d]);
            let f = read(a.clone().transpose().matmul(g.matmul(a)))?;
            out.push(Matrix::from_fn(d, d, |x, y| {
                0.5 * (f[x * d + y] as f64 + f[y * d + x] as f64)
            }));
        }
    }
    Ok(Some(out))
}

/// `SplitModel::unembedding`.
pub(crate) fn unembedding<M: CachedUpper>(m: &M) -> fs_traits::Unembedding<'_, f32> {
    let dims = m.model_dims();
    MatrixRef::new(dims.vocab_size, dims.readout_dim, m.lm_head_host())
        .expect("lm_head host copy has V·d elements by construction")
        .into()
}

/// Implement [`SplitModel`](fs_traits::SplitModel) for a [`CachedUpper`] model (crate-internal:
/// it calls the `pub(crate)` helpers above).
macro_rules! impl_split_model {
    ($t:ty) => {
        impl $t {
            /// The device the model runs on (without autodiff; the gradient passes use its
            /// autodiff view).
            pub fn device(&self) -> &$crate::Device {
                &self.readout.device
            }

            /// Set the bytes of activations one readout-Jacobian backward pass may keep alive
            /// (default 512 MiB). More positions (or more of one position's `d` rows) per pass
            /// give larger GEMMs; fewer keep the peak memory down.
            pub fn set_activation_budget(&mut self, bytes: usize) {
                self.readout.activation_budget = bytes.max(1);
            }

            /// Force `positions` positions per readout-Jacobian backward pass (all `d` rows
            /// each, through every block), whatever the activation budget.
            pub fn set_position_batch(&mut self, positions: usize) {
                let r = &mut self.readout;
                let per_position =
                    r.bytes_per_row_per_block * r.dims.n_layers.max(1) * r.dims.d_model;
                r.activation_budget = per_position.saturating_mul(positions.max(1));
            }

            /// Form the exact Fisher on the device (`SplitModel::device_exact_fisher`): on by
            /// default on a GPU, off on the CPU backend; turning it on there runs the device
            /// code path on the CPU (tests).
            pub fn set_fisher_on_device(&mut self, on: bool) {
                self.readout.fisher_on_device = on;
            }
        }

        impl fs_traits::SplitModel for $t {
            type Scalar = f32;
            type Context = $crate::CachedContext;
            fn dims(&self) -> fs_traits::ModelDims {
                $crate::cached::CachedUpper::model_dims(self)
            }
            fn lower(
                &self,
                tokens: &[u32],
                layer: usize,
            ) -> Result<Self::Context, fs_traits::FsError> {
                Ok($crate::cached::lower_layers(self, tokens, &[layer])?.remove(0))
            }
            fn lower_layers(
                &self,
                tokens: &[u32],
                layers: &[usize],
            ) -> Result<Vec<Self::Context>, fs_traits::FsError> {
                $crate::cached::lower_layers(self, tokens, layers)
            }
            fn activation(
                &self,
                ctx: &Self::Context,
                position: usize,
            ) -> Result<Vec<f32>, fs_traits::FsError> {
                $crate::cached::activation(self, ctx, position)
            }
            fn upper_logits(
                &self,
                ctx: &Self::Context,
                position: usize,
                h: &[f32],
            ) -> Result<Vec<f32>, fs_traits::FsError> {
                $crate::cached::upper_logits(self, ctx, position, h)
            }
            fn logits(
                &self,
                ctx: &Self::Context,
                positions: &[usize],
            ) -> Result<fs_traits::Matrix<f32>, fs_traits::FsError> {
                $crate::cached::logits(self, ctx, positions)
            }
            fn with_activation(
                &self,
                ctx: &Self::Context,
                position: usize,
                h: &[f32],
            ) -> Result<Self::Context, fs_traits::FsError> {
                $crate::cached::with_activation(self, ctx, position, h)
            }
            fn score_gradients(
                &self,
                ctx: &Self::Context,
                position: usize,
                tokens: &[u32],
            ) -> Result<fs_traits::Matrix<f32>, fs_traits::FsError> {
                $crate::cached::score_gradients(self, ctx, position, tokens)
            }
            fn readout_jacobians(
                &self,
                ctx: &Self::Context,
                positions: &[usize],
            ) -> Result<Vec<fs_traits::Matrix<f32>>, fs_traits::FsError> {
                $crate::cached::readout_jacobians(self, ctx, positions)
            }
            fn readout_vjp(
                &self,
                ctx: &Self::Context,
                position: usize,
                cotangents: fs_traits::MatrixRef<'_, f32>,
            ) -> Result<fs_traits::Matrix<f32>, fs_traits::FsError> {
                $crate::cached::readout_vjp(self, ctx, position, cotangents)
            }
            fn unembedding(&self) -> fs_traits::Unembedding<'_, f32> {
                $crate::cached::unembedding(self)
            }
            fn final_logit_softcap(&self) -> Option<f64> {
                $crate::cached::CachedUpper::readout(self).final_logit_softcap
            }
            fn device_exact_fisher(
                &self,
                ctx: &Self::Context,
                positions: &[usize],
            ) -> Result<Option<Vec<fs_traits::Matrix<f64>>>, fs_traits::FsError> {
                $crate::cached::device_exact_fisher(self, ctx, positions)
            }
            fn attention_heads(&self) -> usize {
                $crate::cached::CachedUpper::attention_layout(self, 0).0
            }
            fn attention_scores(
                &self,
                ctx: &Self::Context,
                position: usize,
                head: fs_traits::AttentionHead,
                h: &[f32],
            ) -> Result<Vec<f32>, fs_traits::FsError> {
                $crate::cached::attention_scores(self, ctx, position, head, h)
            }
            fn attention_jacobian(
                &self,
                ctx: &Self::Context,
                position: usize,
                head: fs_traits::AttentionHead,
            ) -> Result<fs_traits::Matrix<f32>, fs_traits::FsError> {
                $crate::cached::attention_jacobian(self, ctx, position, head)
            }
        }
    };
}
pub(crate) use impl_split_model;
