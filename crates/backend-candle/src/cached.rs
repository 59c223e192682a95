//! What every KV-cached transformer on candle shares: the context of a lower pass, the cached
//! attention of single rows, and the [`SplitModel`](fs_traits::SplitModel) methods that only need
//! a model's single-position upper half (readout Jacobians, score gradients, logits).
//!
//! A model implements [`CachedUpper`] (its forward pass over a sequence and its upper half on
//! replicated rows) and gets its `SplitModel` impl from the crate-internal `impl_split_model!`.

use crate::ops::softmax_last_dim;
use crate::ops::Weight;
use crate::Float;
use candle_core::{DType, Device, Tensor, Var, D};
use fs_checkpoint::{HostMatrix, StoredLinear, StoredMatrix};
use fs_traits::engine::{check_positions, first_line, readout_batching};
use fs_traits::{
    check_attention_query, check_finite, check_layer, check_len, check_position, check_tokens,
    check_tokens_in_vocab, mask_invisible_scores, softmax, visible_keys, AttentionHead, FsError,
    Matrix, MatrixRef, ModelDims, SplitContext, Unembedding,
};

/// Convert a candle error into the seam's error type.
pub(crate) fn be(e: candle_core::Error) -> FsError {
    FsError::Backend(format!("candle: {}", first_line(&e.to_string())))
}

/// Default bytes of activations one readout-Jacobian backward pass may keep alive.
pub(crate) const DEFAULT_ACTIVATION_BUDGET: usize = 512 << 20;

/// The result of a lower pass: layer-`k` activations, the key/value cache of blocks `≥ k`, and
/// the final-norm output of every position (for the unperturbed logits).
pub struct CachedContext {
    pub(crate) layer: usize,
    pub(crate) tokens: Vec<u32>,
    /// `H_k` (`T × d`).
    pub(crate) hidden: Tensor,
    /// Keys of blocks `k..n_layer`, each `(H, T, d_head)` (after RoPE where the model has it,
    /// with grouped key/value heads already repeated to `H`).
    pub(crate) keys: Vec<Tensor>,
    /// Values of blocks `k..n_layer`, each `(H, T, d_head)`.
    pub(crate) values: Vec<Tensor>,
    /// `norm_f(h_L)` (`T × d`).
    pub(crate) final_norm: Tensor,
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
        hidden: &[Tensor],
        keys: &[Tensor],
        values: &[Tensor],
        final_norm: &Tensor,
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

/// Uploads typed host weights (`fs-checkpoint`) to one device in the model's compute dtype
/// (f32, or f64 for the reference models, [`Float`]): every model's `new` builds its tensors
/// with it.
pub(crate) struct Upload<'a>(pub(crate) &'a Device, pub(crate) DType);

impl Upload<'_> {
    /// A `rows × cols` matrix.
    pub(crate) fn matrix(&self, m: HostMatrix) -> candle_core::Result<Tensor> {
        Tensor::from_vec(m.data, (m.rows, m.cols), self.0)?.to_dtype(self.1)
    }
    /// A vector.
    pub(crate) fn vector(&self, v: Vec<f32>) -> candle_core::Result<Tensor> {
        let n = v.len();
        Tensor::from_vec(v, n, self.0)?.to_dtype(self.1)
    }
    /// A linear layer kept in its stored precision where the device and dtype allow
    /// ([`Weight::new_in`]).
    pub(crate) fn stored_linear(
        &self,
        l: StoredLinear,
    ) -> candle_core::Result<(Weight, Option<Tensor>)> {
        Ok((Weight::new_in(l.weight, self.0, self.1)?, l.bias.map(|b| self.vector(b)).transpose()?))
    }
}

/// A `V × d` table — the token embedding, the unembedding `W_U`, or both when tied — as the
/// passes use it: an f32 tensor on the device, or the checkpoint's matrix in its stored
/// precision on the host (CPU only), whose rows are widened when a pass needs them (the tokens'
/// rows for the embedding, vocabulary chunks for the logits).
#[derive(Clone)]
pub(crate) enum Table {
    /// `V × d`, f32, on the device.
    Dense(Tensor),
    /// `V × d` as stored, host.
    Stored(StoredMatrix),
}

impl Table {
    /// A stored table for `device` in compute dtype `dtype` (kept as stored on the CPU for an
    /// f32 model unless it is f32; see [`Weight::new_in`] for why).
    pub(crate) fn new(
        m: StoredMatrix,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Table> {
        if m.is_f32() || !device.is_cpu() || dtype != DType::F32 {
            let t = Tensor::from_vec(m.to_f32(), (m.rows(), m.cols()), device)?;
            Ok(Table::Dense(t.to_dtype(dtype)?))
        } else {
            Ok(Table::Stored(m))
        }
    }

    /// Rows `ids` as an `(n, d)` tensor on `device` (the table's dtype; a stored table is only
    /// kept for f32 models).
    pub(crate) fn rows(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Table::Dense(t) => t.index_select(&Tensor::new(ids, device)?, 0),
            Table::Stored(m) => Tensor::from_vec(m.gather_rows(ids), (ids.len(), m.cols()), device),
        }
    }

    /// `x Tᵀ` for rows `x` `(n, d)`: `(n, V)` (the logits of readout rows). A stored table is
    /// multiplied as a stored weight (`[V, d]` = `[out, in]`): widened chunk by chunk.
    pub(crate) fn times_transposed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Table::Dense(t) => x.matmul(&t.t()?),
            Table::Stored(m) => crate::ops::linear(x, &Weight::Stored(m.clone()), None),
        }
    }

    /// `p T` for rows `p` `(n, V)`: `(n, d)` (the mean output embedding `m = W_Uᵀp`).
    pub(crate) fn times(&self, p: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Table::Dense(t) => p.matmul(t),
            Table::Stored(m) => crate::ops::stored_times(p, m),
        }
    }

    /// Rows `rows` as a `(n, d)` tensor on `device` in `dtype` (a stored table widened, CPU only).
    fn chunk(
        &self,
        rows: std::ops::Range<usize>,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        match self {
            Table::Dense(t) => t.narrow(0, rows.start, rows.len())?.to_dtype(dtype),
            Table::Stored(m) => {
                let mut out = vec![0f32; rows.len() * m.cols()];
                let n = rows.len();
                m.widen_rows_into(rows, &mut out);
                Tensor::from_vec(out, (n, m.cols()), device)?.to_dtype(dtype)
            }
        }
    }

    /// Rows `rows` into `out` (row-major, the model's scalar), for the estimators' streaming
    /// reads.
    fn read_rows<S: Float>(
        &self,
        rows: std::ops::Range<usize>,
        out: &mut [S],
    ) -> candle_core::Result<()> {
        match self {
            Table::Dense(t) => {
                let d = t.dim(1)?;
                // On the CPU, one copy straight out of the tensor's storage.
                let (storage, layout) = t.storage_and_layout();
                if let (candle_core::Storage::Cpu(cpu), Some((o, _))) =
                    (&*storage, layout.contiguous_offsets())
                {
                    let v = S::cpu_storage_as_slice(cpu)?;
                    out.copy_from_slice(&v[o + rows.start * d..o + rows.end * d]);
                    return Ok(());
                }
                drop(storage);
                let data = t.narrow(0, rows.start, rows.len())?.flatten_all()?.to_vec1::<S>()?;
                out.copy_from_slice(&data);
            }
            Table::Stored(m) => match S::typed_mut(out) {
                fs_traits::TypedSliceMut::F32(out) => m.widen_rows_into(rows, out),
                fs_traits::TypedSliceMut::F64(_) => {
                    candle_core::bail!("a stored-precision table in an f64 model")
                }
            },
        }
        Ok(())
    }
}

/// What every cached model reads out with, beside its blocks: the device, the dimensions, the
/// unembedding `W_U` (shared with the token embedding when tied) and the memory budget of the
/// readout-Jacobian passes.
pub(crate) struct Readout {
    pub(crate) device: Device,
    pub(crate) dims: ModelDims,
    /// `W_U` (`V × d`): the token embedding when tied.
    pub(crate) lm_head: Table,
    /// Bytes of tangents one readout-Jacobian pass may keep alive.
    pub(crate) activation_budget: usize,
    /// Approximate bytes a forward-mode pass keeps alive per tangent row per block (the widest
    /// layer's tangents and their temporaries).
    pub(crate) bytes_per_row_per_block: usize,
    /// The final-logit soft-cap `c` (`z = c·tanh(W_U u / c)`), if the model has one.
    pub(crate) final_logit_softcap: Option<f64>,
    /// The dtype every tensor of the model computes in (the model's [`Float`]).
    pub(crate) dtype: DType,
    /// Whether `SplitModel::device_exact_fisher` forms the exact Fisher on the model's device
    /// ([`device_exact_fisher`]): on for a GPU model, off on the CPU (where the host estimators
    /// are faster); settable for tests.
    pub(crate) fisher_on_device: bool,
}

impl Readout {
    /// Logits `z = W_U u` (soft-capped when the model caps) of readout rows `u` `(n, d_u)`.
    pub(crate) fn logits_of(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.lm_head.times_transposed(u)?;
        match self.final_logit_softcap {
            None => Ok(z),
            Some(c) => (z / c)?.tanh()? * c,
        }
    }

    /// Build the readout and the token embedding (`V × d`, as stored, or in `up`'s dtype):
    /// `W_U` is `lm_head` when the checkpoint has one, else the (tied) embedding, shared.
    /// `f32_bytes_per_row_per_block` is the f32 estimate, scaled to the dtype. Returns the
    /// embedding too.
    pub(crate) fn with_embedding(
        up: &Upload<'_>,
        dims: ModelDims,
        embed: StoredMatrix,
        lm_head: Option<StoredMatrix>,
        f32_bytes_per_row_per_block: usize,
    ) -> candle_core::Result<(Table, Readout)> {
        let (device, dtype) = (up.0, up.1);
        let embed = Table::new(embed, device, dtype)?;
        let lm_head = match lm_head {
            Some(m) => Table::new(m, device, dtype)?,
            None => embed.clone(),
        };
        let readout = Readout {
            device: device.clone(),
            dims,
            lm_head,
            activation_budget: DEFAULT_ACTIVATION_BUDGET,
            bytes_per_row_per_block: f32_bytes_per_row_per_block / 4 * dtype.size_in_bytes(),
            final_logit_softcap: None,
            dtype,
            fisher_on_device: !device.is_cpu(),
        };
        Ok((embed, readout))
    }
}

impl<S: Float> fs_traits::UnembeddingRows<S> for Readout {
    fn shape(&self) -> (usize, usize) {
        (self.dims.vocab_size, self.dims.readout_dim)
    }
    fn read_rows(&self, rows: std::ops::Range<usize>, out: &mut [S]) -> Result<(), FsError> {
        self.lm_head.read_rows(rows, out).map_err(be)
    }
}

/// A transformer whose upper half can run on single rows against a key/value cache.
pub(crate) trait CachedUpper {
    /// The device, dimensions, unembedding and pass budget.
    fn readout(&self) -> &Readout;
    fn device(&self) -> &Device {
        &self.readout().device
    }
    fn model_dims(&self) -> ModelDims {
        self.readout().dims
    }
    /// `W_U` (`V × d`).
    fn lm_head(&self) -> &Table {
        &self.readout().lm_head
    }
    /// Bytes of tangents one readout-Jacobian pass may keep alive.
    fn activation_budget(&self) -> usize {
        self.readout().activation_budget
    }
    /// Approximate bytes a forward-mode pass keeps alive per tangent row per block.
    fn bytes_per_row_per_block(&self) -> usize {
        self.readout().bytes_per_row_per_block
    }
    /// The full causal forward pass, one context per requested layer.
    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<CachedContext>>;
    /// The upper half on rows `h` `(P, R, d)`, row `(p, r)` at position `positions[p]`:
    /// `u = norm_f(x_L)`, `(P, R, d)` — or, with `stop`, the pass stopped inside block
    /// `stop.layer` (`P = 1`): the scores of query head `stop.head` against the keys
    /// `0..=position` ([`head_scores`]), `(R, position + 1)`, before any mask.
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: &Tensor,
        stop: Option<AttentionHead>,
    ) -> candle_core::Result<Tensor>;
    /// [`run_upper`](Self::run_upper) to the readout `u`.
    fn upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.run_upper(ctx, positions, h, None)
    }
    /// [`run_upper`](Self::run_upper) to the scores of `head` at `position`.
    fn upper_scores(
        &self,
        ctx: &CachedContext,
        position: usize,
        h: &Tensor,
        head: AttentionHead,
    ) -> candle_core::Result<Tensor> {
        self.run_upper(ctx, &[position], h, Some(head))
    }
    /// Query heads per block, and the sliding window of block `layer` (`None`: full causal).
    fn attention_layout(&self, layer: usize) -> (usize, Option<usize>);
    /// The upper half differentiated forward ([`crate::jvp`]): primal rows `(P, 1, d)` and
    /// tangents `(P, R, d)` at `positions` in, `u` and `u̇` out.
    fn upper_jvp(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: crate::jvp::Dual,
    ) -> candle_core::Result<crate::jvp::Dual>;
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
    pub(crate) fn scores(&self, raw: &Tensor) -> candle_core::Result<Tensor> {
        let s = (raw * self.scale)?;
        match self.softcap {
            None => Ok(s),
            Some(c) => (s / c)?.tanh()? * c,
        }
    }
}

/// [`fs_traits::engine::context_mask`] as a `(P, 1, 1, t_max)` tensor of the model's dtype;
/// `None` when no row has any context.
pub(crate) fn context_mask(
    positions: &[usize],
    window: Option<usize>,
    readout: &Readout,
) -> candle_core::Result<Option<(Tensor, usize)>> {
    fs_traits::engine::context_mask(positions, window)
        .map(|(m, t_max)| {
            let mask = Tensor::from_vec(m, (positions.len(), 1, 1, t_max), &readout.device)?;
            Ok((mask.to_dtype(readout.dtype)?, t_max))
        })
        .transpose()
}

/// Attention of single rows against the cache: `q`, `k_self`, `v_self` are `(P, H, R, d_head)`;
/// each row attends to the cached keys/values `(H, T, d_head)` of positions `< t_p` (through
/// `mask`) and to its own key/value. Returns `(P, H, R, d_head)`.
pub(crate) fn attend_cached(
    q: &Tensor,
    k_self: &Tensor,
    v_self: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&(Tensor, usize)>,
    attn: &Attention,
) -> candle_core::Result<Tensor> {
    match mask {
        None => Ok(v_self.clone()),
        Some((mask, t_max)) => {
            let self_score = attn.scores(&(q * k_self)?.sum_keepdim(D::Minus1)?)?;
            let k_ctx = keys.narrow(1, 0, *t_max)?.unsqueeze(0)?;
            let v_ctx = values.narrow(1, 0, *t_max)?.unsqueeze(0)?;
            let ctx_scores = attn.scores(&q.broadcast_matmul(&k_ctx.t()?)?)?.broadcast_add(mask)?;
            let probs = softmax_last_dim(&Tensor::cat(&[&ctx_scores, &self_score], 3)?)?;
            let p_ctx = probs.narrow(3, 0, *t_max)?.contiguous()?;
            let p_self = probs.narrow(3, *t_max, 1)?;
            p_ctx.broadcast_matmul(&v_ctx)? + p_self.broadcast_mul(v_self)?
        }
    }
}

/// The scores of query head `head` for single rows at `position` (`P = 1`): queries `q` and
/// the rows' own keys `k_self` `(1, H, R, d_head)` against the cached keys `(H, T, d_head)` of
/// positions `< position`, scaled and soft-capped as the layer does ([`Attention::scores`]), no
/// mask: `(R, position + 1)`, the own key last.
pub(crate) fn head_scores(
    q: &Tensor,
    k_self: &Tensor,
    keys: &Tensor,
    position: usize,
    head: usize,
    attn: &Attention,
) -> candle_core::Result<Tensor> {
    let q = q.narrow(1, head, 1)?.contiguous()?;
    let own = (&q * k_self.narrow(1, head, 1)?)?.sum_keepdim(D::Minus1)?;
    let raw = if position == 0 {
        own
    } else {
        let k_ctx = keys.narrow(0, head, 1)?.narrow(1, 0, position)?.unsqueeze(0)?;
        Tensor::cat(&[&q.broadcast_matmul(&k_ctx.t()?)?, &own], 3)?
    };
    let r = q.dim(2)?;
    attn.scores(&raw)?.reshape((r, position + 1))
}

/// Causal self-attention over a whole sequence: `q`, `k`, `v` `(H, T, d_head)`.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attn: &Attention,
) -> candle_core::Result<Tensor> {
    let t_len = q.dim(1)?;
    let causal = Tensor::from_vec(
        fs_traits::engine::causal_mask(t_len, attn.window),
        (1, t_len, t_len),
        q.device(),
    )?
    .to_dtype(q.dtype())?;
    let scores = attn.scores(&q.matmul(&k.t()?)?)?.broadcast_add(&causal)?;
    softmax_last_dim(&scores)?.matmul(v)
}

fn replicated<M: CachedUpper>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
    r: usize,
) -> candle_core::Result<Tensor> {
    let d = m.model_dims().d_model;
    let idx: Vec<u32> = positions.iter().map(|&t| t as u32).collect();
    let rows = ctx.hidden.index_select(&Tensor::new(idx.as_slice(), m.device())?, 0)?;
    rows.unsqueeze(1)?.broadcast_as((positions.len(), r, d))?.contiguous()
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
    m.forward_sequence(tokens, layers).map_err(be)
}

/// `SplitModel::activation`.
pub(crate) fn activation<S: Float>(
    ctx: &CachedContext,
    position: usize,
) -> Result<Vec<S>, FsError> {
    check_position(position, ctx.tokens.len())?;
    ctx.hidden.get(position).and_then(|r| r.to_vec1::<S>()).map_err(be)
}

/// `SplitModel::upper_logits`.
pub(crate) fn upper_logits<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    h: &[S],
) -> Result<Vec<S>, FsError> {
    let d = m.model_dims().d_model;
    check_position(position, ctx.tokens.len())?;
    check_len("h", h.len(), d)?;
    check_finite("h", h)?;
    (|| {
        let h = Tensor::from_slice(h, (1, 1, d), m.device())?;
        let u = m.upper(ctx, &[position], &h)?.reshape((1, d))?;
        m.readout().logits_of(&u)?.flatten_all()?.to_vec1::<S>()
    })()
    .map_err(be)
}

/// `SplitModel::with_activation`: the first `position + 1` rows of the cache, with row
/// `position` of `H_k` replaced by `h` and its final-norm row recomputed by the upper half. The
/// keys/values of blocks `≥ k` keep their (stale) row `position`: every single-row upper pass
/// recomputes its own key/value from `h` and reads the cache only below `position`.
pub(crate) fn with_activation<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    h: &[S],
) -> Result<CachedContext, FsError> {
    let d = m.model_dims().d_model;
    check_position(position, ctx.tokens.len())?;
    check_len("h", h.len(), d)?;
    check_finite("h", h)?;
    (|| {
        let row = Tensor::from_slice(h, (1, d), m.device())?;
        let u = m.upper(ctx, &[position], &row.reshape((1, 1, d))?)?.reshape((1, d))?;
        let keep = |full: &Tensor, new_row: &Tensor| -> candle_core::Result<Tensor> {
            if position == 0 {
                Ok(new_row.clone())
            } else {
                Tensor::cat(&[&full.narrow(0, 0, position)?, new_row], 0)
            }
        };
        let narrow = |cache: &[Tensor]| -> candle_core::Result<Vec<Tensor>> {
            cache.iter().map(|c| c.narrow(1, 0, position + 1)).collect()
        };
        Ok(CachedContext {
            layer: ctx.layer,
            tokens: ctx.tokens[..=position].to_vec(),
            hidden: keep(&ctx.hidden, &row)?,
            keys: narrow(&ctx.keys)?,
            values: narrow(&ctx.values)?,
            final_norm: keep(&ctx.final_norm, &u)?,
        })
    })()
    .map_err(be)
}

/// `SplitModel::logits`.
pub(crate) fn logits<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
) -> Result<Matrix<S>, FsError> {
    check_positions(positions, ctx.tokens.len())?;
    let v = m.model_dims().vocab_size;
    if positions.is_empty() {
        return Ok(Matrix::zeros(0, v));
    }
    let data = (|| {
        let idx: Vec<u32> = positions.iter().map(|&t| t as u32).collect();
        let rows = ctx.final_norm.index_select(&Tensor::new(idx.as_slice(), m.device())?, 0)?;
        m.readout().logits_of(&rows)?.flatten_all()?.to_vec1::<S>()
    })()
    .map_err(be)?;
    Matrix::from_vec(positions.len(), v, data)
}

/// `SplitModel::score_gradients`: `S` replicas of `h`, one backward pass of
/// `Σ_s ⟨w_{y_s} − m, u_s⟩` (`∂ log p_y/∂u = w_y − m`, `m = W_Uᵀp`; the unembedding stays out of
/// the autograd graph).
pub(crate) fn score_gradients<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    tokens: &[u32],
) -> Result<Matrix<S>, FsError> {
    let dims = m.model_dims();
    check_position(position, ctx.tokens.len())?;
    check_tokens_in_vocab(tokens, dims.vocab_size)?;
    if tokens.is_empty() {
        return Ok(Matrix::zeros(0, dims.d_model));
    }
    let z = logits::<M, S>(m, ctx, &[position])?;
    // With a final soft-cap, ∂z_y/∂u = s_y w_y: weight p and the chosen rows by the slopes.
    let slopes = fs_traits::logit_slopes(m.readout().final_logit_softcap, z.as_slice());
    let slope = |y: usize| slopes.as_ref().map_or(1.0, |s| s[y]);
    let p: Vec<S> = softmax(z.as_slice())?
        .into_iter()
        .enumerate()
        .map(|(y, x)| S::round_from_f64(x * slope(y)))
        .collect();
    let row_slopes: Vec<S> = tokens.iter().map(|&y| S::round_from_f64(slope(y as usize))).collect();
    let data = (|| {
        let p = Tensor::from_vec(p, (1, dims.vocab_size), m.device())?;
        let mean = m.lm_head().times(&p)?;
        let s = Tensor::from_vec(row_slopes, (tokens.len(), 1), m.device())?;
        let c = m
            .lm_head()
            .rows(tokens, m.device())?
            .broadcast_mul(&s)?
            .broadcast_sub(&mean)?
            .unsqueeze(0)?;
        vjp_rows(m, ctx, position, &c)
    })()
    .map_err(be)?;
    Matrix::from_vec(tokens.len(), dims.d_model, data)
}

/// Columns `cols` of the readout Jacobians at `positions`, by one forward-mode pass
/// ([`crate::jvp`]) seeded with those identity rows: `u̇_r = A e_r`. Returns, per position, the
/// `d_u × |cols|` block row-major.
fn readout_jacobian_columns<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
    cols: std::ops::Range<usize>,
) -> candle_core::Result<Vec<Vec<S>>> {
    let idx: Vec<u32> = positions.iter().map(|&t| t as u32).collect();
    let rows = ctx.hidden.index_select(&Tensor::new(idx.as_slice(), m.device())?, 0)?;
    let seed = crate::jvp::seed(&rows, positions.len(), cols)?;
    let u = m.upper_jvp(ctx, positions, seed)?;
    // u̇ is (P, R, d_u): transpose to (P, d_u, R) so each position's block is A[:, cols]; one
    // copy to the host for all positions (not one per position).
    let a = u.dx.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<S>()?;
    let block = a.len() / positions.len().max(1);
    Ok(a.chunks_exact(block.max(1)).map(<[S]>::to_vec).collect())
}

/// `SplitModel::readout_jacobians`, in forward-mode passes under the model's activation budget.
pub(crate) fn readout_jacobians<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    positions: &[usize],
) -> Result<Vec<Matrix<S>>, FsError> {
    check_positions(positions, ctx.tokens.len())?;
    let dims = m.model_dims();
    let (d, du) = (dims.d_model, dims.readout_dim);
    let (per_pass, cols_per_pass) =
        readout_batching(d, m.bytes_per_row_per_block(), m.activation_budget());
    let mut out = Vec::with_capacity(positions.len());
    for chunk in positions.chunks(per_pass) {
        let mut a = vec![vec![S::zero(); du * d]; chunk.len()];
        for start in (0..d).step_by(cols_per_pass) {
            let cols = start..(start + cols_per_pass).min(d);
            let width = cols.len();
            let part = readout_jacobian_columns::<M, S>(m, ctx, chunk, cols).map_err(be)?;
            for (a, block) in a.iter_mut().zip(part) {
                for (row, src) in a.chunks_exact_mut(d).zip(block.chunks_exact(width)) {
                    row[start..start + width].copy_from_slice(src);
                }
            }
        }
        for a in a {
            out.push(Matrix::from_vec(du, d, a)?);
        }
    }
    Ok(out)
}

/// `SplitModel::readout_jvp`: the rows of `tangents` pushed forward through the upper half at
/// `position` ([`crate::jvp`]), in passes of at most the activation budget's rows.
pub(crate) fn readout_jvp<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    tangents: MatrixRef<'_, S>,
) -> Result<Matrix<S>, FsError> {
    check_position(position, ctx.tokens.len())?;
    let dims = m.model_dims();
    let (d, du) = (dims.d_model, dims.readout_dim);
    check_len("tangent length (d)", tangents.cols(), d)?;
    check_finite("tangents", tangents.as_slice())?;
    let (_, rows_per_pass) =
        readout_batching(d, m.bytes_per_row_per_block(), m.activation_budget());
    let mut out = Vec::with_capacity(tangents.rows() * du);
    for chunk in tangents.as_slice().chunks(rows_per_pass * d) {
        let r = chunk.len() / d;
        let part = (|| {
            let h = ctx.hidden.get(position)?.reshape((1, 1, d))?;
            let dx = Tensor::from_slice(chunk, (1, r, d), m.device())?;
            let u = m.upper_jvp(ctx, &[position], crate::jvp::Dual { x: h, dx })?;
            u.dx.flatten_all()?.to_vec1::<S>()
        })()
        .map_err(be)?;
        out.extend(part);
    }
    Matrix::from_vec(tangents.rows(), du, out)
}

/// `SplitModel::readout_vjp`: `R` replicas of the position's activation, one backward pass of
/// `Σ_i ⟨w_i, u_i⟩`.
pub(crate) fn readout_vjp<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    cotangents: MatrixRef<'_, S>,
) -> Result<Matrix<S>, FsError> {
    check_position(position, ctx.tokens.len())?;
    let dims = m.model_dims();
    check_len("cotangent length (d_u)", cotangents.cols(), dims.readout_dim)?;
    check_finite("cotangents", cotangents.as_slice())?;
    let r = cotangents.rows();
    if r == 0 {
        return Ok(Matrix::zeros(0, dims.d_model));
    }
    let data = (|| {
        let c = Tensor::from_slice(cotangents.as_slice(), (1, r, dims.readout_dim), m.device())?;
        vjp_rows(m, ctx, position, &c)
    })()
    .map_err(be)?;
    Matrix::from_vec(r, dims.d_model, data)
}

/// `Aᵀ c_i` for the cotangent rows `c` `(1, R, d_u)` at `position`: `R` replicas of the
/// activation, one backward pass of `Σ_i ⟨c_i, u_i⟩`; rows `(R × d)` flattened. The replicas'
/// forward is one row's worth of products ([`ReplicatedRows`](crate::ops::ReplicatedRows):
/// every linear layer multiplies one row and copies it; the cheap row-wise operations run on
/// all `R`), so the pass costs one weight stream forward plus the backward's `R`-row products.
/// The forward's one-row products are memoised per weight (`ops::ProductMemo`): a VJP at the
/// point of the previous one (same model, context, position and activation — the top-K
/// eigensolver's many VJPs) multiplies bitwise the same rows with the same weights, so it copies
/// those products instead of streaming the weights again, and its result is bitwise what
/// computing them would give.
fn vjp_rows<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    c: &Tensor,
) -> candle_core::Result<Vec<S>> {
    let r = c.dim(1)?;
    let h = Var::from_tensor(&replicated(m, ctx, &[position], r)?)?;
    let u = {
        let _replicas = crate::ops::ReplicatedRows::declare(r);
        m.upper(ctx, &[position], h.as_tensor())?
    };
    let grads = (u * c)?.sum_all()?.backward()?;
    let g = grads
        .get(h.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached the activation".into()))?;
    g.flatten_all()?.to_vec1::<S>()
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
pub(crate) fn attention_scores<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    head: AttentionHead,
    h: &[S],
) -> Result<Vec<S>, FsError> {
    let window = check_attention(m, ctx, position, head)?;
    let d = m.model_dims().d_model;
    check_len("h", h.len(), d)?;
    check_finite("h", h)?;
    let mut s = (|| {
        let h = Tensor::from_slice(h, (1, 1, d), m.device())?;
        m.upper_scores(ctx, position, &h, head)?.flatten_all()?.to_vec1::<S>()
    })()
    .map_err(be)?;
    check_len("attention scores", s.len(), position + 1)?;
    mask_invisible_scores(&mut s, position, window);
    Ok(s)
}

/// Keys per backward pass of [`attention_jacobian`].
const ATTENTION_ROWS_PER_PASS: usize = 256;

/// `SplitModel::attention_jacobian`: for the keys the query sees (only those: under a sliding
/// window the rest stay zero), `R` replicas of the activation through the upper half up to the
/// head's scores and one backward pass of `Σ_r s_{r, i_r}` per group of keys `i_r`.
pub(crate) fn attention_jacobian<M: CachedUpper, S: Float>(
    m: &M,
    ctx: &CachedContext,
    position: usize,
    head: AttentionHead,
) -> Result<Matrix<S>, FsError> {
    let window = check_attention(m, ctx, position, head)?;
    let (n, d) = (position + 1, m.model_dims().d_model);
    let mut out = vec![S::zero(); n * d];
    for keys in visible_keys(position, window).chunks(ATTENTION_ROWS_PER_PASS) {
        let r = keys.len();
        let rows = (|| {
            let h = Var::from_tensor(&replicated(m, ctx, &[position], r)?)?;
            let s = {
                let _replicas = crate::ops::ReplicatedRows::declare(r);
                m.upper_scores(ctx, position, h.as_tensor(), head)?
            };
            let mut pick = vec![S::zero(); r * n];
            for (row, &key) in keys.iter().enumerate() {
                pick[row * n + key] = S::round_from_f64(1.0);
            }
            let pick = Tensor::from_vec(pick, (r, n), m.device())?;
            let grads = (s * pick)?.sum_all()?.backward()?;
            let g = grads.get(h.as_tensor()).ok_or_else(|| {
                candle_core::Error::Msg("no gradient reached the activation".into())
            })?;
            g.flatten_all()?.to_vec1::<S>()
        })()
        .map_err(be)?;
        for (&key, row) in keys.iter().zip(rows.chunks_exact(d)) {
            out[key * d..(key + 1) * d].copy_from_slice(row);
        }
    }
    Matrix::from_vec(n, d, out)
}

/// Vocabulary rows per chunk of the device Gram ([`output_gram_on_device`]).
const DEVICE_VOCAB_CHUNK: usize = 8192;

/// The centered output Gram `G = Σ_y p_y (s_y w_y − m)(s_y w_y − m)ᵀ`, `m = Σ_y p_y s_y w_y`,
/// of one position's logits `z` `(V)` on the readout's device: `p`, the soft-cap slopes `s` and
/// `m` in f64; per vocabulary chunk the centered, scaled rows `√p_y (s_y w_y − m)` are rounded to
/// the model's dtype and multiplied there, and the chunk products are summed in f64 — the host
/// estimator's arithmetic (`fs_estimators::centered_output_gram_with_slopes`). `(d_u, d_u)`, f64.
fn output_gram_on_device(r: &Readout, z: &Tensor) -> candle_core::Result<Tensor> {
    let (v, du) = (r.dims.vocab_size, r.dims.readout_dim);
    let z = z.to_dtype(DType::F64)?.reshape((v, 1))?;
    let p = softmax_last_dim(&z.t()?)?.t()?;
    // The soft-cap slopes s_y = 1 − (z_y/c)², once for the whole vocabulary.
    let slope = match r.final_logit_softcap {
        None => None,
        Some(c) => {
            let t = (&z / c)?;
            Some((1.0 - (&t * &t)?)?.clamp(0.0, 1.0)?)
        }
    };
    let ps = match &slope {
        None => p.clone(),
        Some(s) => (&p * s)?,
    };
    let chunks = vocab_chunks(v);
    let mut m = Tensor::zeros((1, du), DType::F64, &r.device)?;
    for range in &chunks {
        let w = r.lm_head.chunk(range.clone(), &r.device, DType::F64)?;
        let ps = ps.narrow(0, range.start, range.len())?;
        m = (m + ps.t()?.matmul(&w)?)?;
    }
    let mut g = Tensor::zeros((du, du), DType::F64, &r.device)?;
    for range in &chunks {
        let mut w = r.lm_head.chunk(range.clone(), &r.device, DType::F64)?;
        if let Some(s) = &slope {
            w = w.broadcast_mul(&s.narrow(0, range.start, range.len())?)?;
        }
        let root_p = p.narrow(0, range.start, range.len())?.sqrt()?;
        let b = w.broadcast_sub(&m)?.broadcast_mul(&root_p)?.to_dtype(r.dtype)?;
        g = (g + b.t()?.matmul(&b)?.to_dtype(DType::F64)?)?;
    }
    Ok(g)
}

/// One position's output Gram on the readout's device ([`device_output_gram`]): `p`, `p ∘ s`,
/// the slopes and `m` uploaded once, in f64.
pub(crate) struct DeviceOutputGram<'a> {
    r: &'a Readout,
    /// `p`, `(V, 1)`.
    p: Tensor,
    /// `p ∘ s`, `(V, 1)`.
    ps: Tensor,
    /// The soft-cap slopes `s`, `(V, 1)`, if the model caps.
    slope: Option<Tensor>,
    /// `m = Σ_y p_y s_y w_y`, `(1, d_u)`.
    m: Tensor,
}

/// `SplitModel::device_output_gram`: with [`Readout::fisher_on_device`] (a GPU model), `G` as an
/// operator on the device, in f64 throughout (each vocabulary chunk of `W_U` widened to f64 as it
/// is used: on a GPU f64 products cost no more than the pass over `W_U` they ride on, and no row
/// needs the host's special care for dominant tokens). `None` otherwise.
pub(crate) fn device_output_gram<'a>(
    r: &'a Readout,
    p: &[f64],
    slopes: Option<&[f64]>,
) -> Result<Option<Box<dyn fs_traits::OutputGram + 'a>>, FsError> {
    if !r.fisher_on_device {
        return Ok(None);
    }
    let v = r.dims.vocab_size;
    check_len("p (V)", p.len(), v)?;
    check_finite("p", p)?;
    if let Some(s) = slopes {
        check_len("soft-cap slopes (V)", s.len(), v)?;
        check_finite("soft-cap slopes", s)?;
    }
    let gram = (|| -> candle_core::Result<DeviceOutputGram<'a>> {
        let column = |x: &[f64]| Tensor::from_slice(x, (v, 1), &r.device);
        let p_t = column(p)?;
        let slope = slopes.map(column).transpose()?;
        let ps = match &slope {
            None => p_t.clone(),
            Some(s) => (&p_t * s)?,
        };
        let mut m = Tensor::zeros((1, r.dims.readout_dim), DType::F64, &r.device)?;
        for range in vocab_chunks(v) {
            let w = r.lm_head.chunk(range.clone(), &r.device, DType::F64)?;
            m = (m + ps.narrow(0, range.start, range.len())?.t()?.matmul(&w)?)?;
        }
        Ok(DeviceOutputGram { r, p: p_t, ps, slope, m })
    })()
    .map_err(be)?;
    Ok(Some(Box::new(gram)))
}

/// The vocabulary in chunks of [`DEVICE_VOCAB_CHUNK`] rows.
fn vocab_chunks(v: usize) -> Vec<std::ops::Range<usize>> {
    (0..v).step_by(DEVICE_VOCAB_CHUNK).map(|a| a..(a + DEVICE_VOCAB_CHUNK).min(v)).collect()
}

impl fs_traits::OutputGram for DeviceOutputGram<'_> {
    fn apply(&self, u: &Matrix<f64>) -> Result<Matrix<f64>, FsError> {
        let du = self.r.dims.readout_dim;
        check_len("G input rows (d_u)", u.cols(), du)?;
        let b = u.rows();
        let data = (|| -> candle_core::Result<Vec<f64>> {
            let ut = Tensor::from_slice(u.as_slice(), (b, du), &self.r.device)?.t()?;
            let mu = self.m.matmul(&ut)?;
            let mut acc = Tensor::zeros((du, b), DType::F64, &self.r.device)?;
            let mut pq = Tensor::zeros((1, b), DType::F64, &self.r.device)?;
            for range in vocab_chunks(self.r.dims.vocab_size) {
                let (start, len) = (range.start, range.len());
                let w = self.r.lm_head.chunk(range, &self.r.device, DType::F64)?;
                let mut z = w.matmul(&ut)?;
                if let Some(s) = &self.slope {
                    z = z.broadcast_mul(&s.narrow(0, start, len)?)?;
                }
                // q_y = s_y w_yᵀu − mᵀu, (len, b).
                let q = z.broadcast_sub(&mu)?;
                pq = (pq + self.p.narrow(0, start, len)?.t()?.matmul(&q)?)?;
                let weighted = q.broadcast_mul(&self.ps.narrow(0, start, len)?)?;
                acc = (acc + w.t()?.matmul(&weighted)?)?;
            }
            // − m Σ_y p_y q_y (zero up to round-off).
            let acc = (acc - self.m.t()?.matmul(&pq)?)?;
            acc.t()?.contiguous()?.flatten_all()?.to_vec1::<f64>()
        })()
        .map_err(be)?;
        Matrix::from_vec(b, du, data)
    }

    fn mean_row(&self) -> Result<Vec<f64>, FsError> {
        self.m.flatten_all().and_then(|m| m.to_vec1::<f64>()).map_err(be)
    }
}

/// `SplitModel::device_exact_fisher`: with [`Readout::fisher_on_device`] (a GPU model), the
/// readout Jacobians by forward-mode passes kept on the device (`(P, d_u, d)`, widened to f64),
/// each position's Gram [`output_gram_on_device`], the sandwich `Aᵀ G A` in f64 there; only the
/// `d × d` matrices are copied back. `None` otherwise.
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
    let d = r.dims.d_model;
    let (per_pass, cols_per_pass) =
        readout_batching(d, m.bytes_per_row_per_block(), m.activation_budget());
    let mut out = Vec::with_capacity(positions.len());
    for chunk in positions.chunks(per_pass) {
        let data = (|| -> candle_core::Result<Vec<Vec<f64>>> {
            let idx: Vec<u32> = chunk.iter().map(|&t| t as u32).collect();
            let idx = Tensor::new(idx.as_slice(), m.device())?;
            let rows = ctx.hidden.index_select(&idx, 0)?;
            let mut parts = Vec::new();
            for start in (0..d).step_by(cols_per_pass) {
                let cols = start..(start + cols_per_pass).min(d);
                let seed = crate::jvp::seed(&rows, chunk.len(), cols)?;
                // u̇ is (P, R, d_u): (P, d_u, R) is A[:, cols] per position.
                parts.push(m.upper_jvp(ctx, chunk, seed)?.dx.transpose(1, 2)?);
            }
            let a = Tensor::cat(&parts, 2)?.to_dtype(DType::F64)?;
            let z = r.logits_of(&ctx.final_norm.index_select(&idx, 0)?)?;
            (0..chunk.len())
                .map(|i| {
                    let g = output_gram_on_device(r, &z.get(i)?)?;
                    let a = a.get(i)?;
                    let f = a.t()?.matmul(&g.matmul(&a)?)?;
                    ((&f + f.t()?)? * 0.5)?.flatten_all()?.to_vec1::<f64>()
                })
                .collect()
        })()
        .map_err(be)?;
        for f in data {
            out.push(Matrix::from_vec(d, d, f)?);
        }
    }
    Ok(Some(out))
}

/// `SplitModel::unembedding`: rows read from the model's `W_U` ([`Table`]) on demand — widened
/// when it is kept in its stored precision, copied from the device tensor otherwise (no second
/// f32 copy of `W_U` is kept for the estimators).
pub(crate) fn unembedding<M: CachedUpper, S: Float>(m: &M) -> Unembedding<'_, S> {
    Unembedding::Rows(m.readout())
}

/// Implement [`SplitModel`](fs_traits::SplitModel) for a [`CachedUpper`] model (crate-internal:
/// it calls the `pub(crate)` helpers above).
macro_rules! impl_split_model {
    ($t:ident) => {
        impl<S: $crate::Float> $t<S> {
            /// The device the model runs on.
            pub fn device(&self) -> &candle_core::Device {
                &self.readout.device
            }

            /// Set the bytes of tangents one readout-Jacobian forward-mode pass may keep alive
            /// (default 512 MiB). More positions (or more of one position's `d` directions) per
            /// pass give larger GEMMs; fewer keep the peak memory down.
            pub fn set_activation_budget(&mut self, bytes: usize) {
                self.readout.activation_budget = bytes.max(1);
            }

            /// Force `positions` positions per readout-Jacobian pass (all `d` directions each),
            /// whatever the activation budget.
            pub fn set_position_batch(&mut self, positions: usize) {
                let r = &mut self.readout;
                let per_position = r.bytes_per_row_per_block * r.dims.d_model;
                r.activation_budget = per_position.saturating_mul(positions.max(1));
            }

            /// Form the exact Fisher on the model's device (`SplitModel::device_exact_fisher`):
            /// on by default for a GPU model, off on the CPU, where the host estimators are
            /// faster; turning it on there runs the device code path on the CPU (tests).
            pub fn set_fisher_on_device(&mut self, on: bool) {
                self.readout.fisher_on_device = on;
            }
        }

        impl<S: $crate::Float> fs_traits::SplitModel for $t<S> {
            type Scalar = S;
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
            ) -> Result<Vec<S>, fs_traits::FsError> {
                $crate::cached::activation(ctx, position)
            }
            fn upper_logits(
                &self,
                ctx: &Self::Context,
                position: usize,
                h: &[S],
            ) -> Result<Vec<S>, fs_traits::FsError> {
                $crate::cached::upper_logits(self, ctx, position, h)
            }
            fn logits(
                &self,
                ctx: &Self::Context,
                positions: &[usize],
            ) -> Result<fs_traits::Matrix<S>, fs_traits::FsError> {
                $crate::cached::logits(self, ctx, positions)
            }
            fn with_activation(
                &self,
                ctx: &Self::Context,
                position: usize,
                h: &[S],
            ) -> Result<Self::Context, fs_traits::FsError> {
                $crate::cached::with_activation(self, ctx, position, h)
            }
            fn score_gradients(
                &self,
                ctx: &Self::Context,
                position: usize,
                tokens: &[u32],
            ) -> Result<fs_traits::Matrix<S>, fs_traits::FsError> {
                $crate::cached::score_gradients(self, ctx, position, tokens)
            }
            fn readout_jacobians(
                &self,
                ctx: &Self::Context,
                positions: &[usize],
            ) -> Result<Vec<fs_traits::Matrix<S>>, fs_traits::FsError> {
                $crate::cached::readout_jacobians(self, ctx, positions)
            }
            fn native_readout_jvp(&self) -> bool {
                true
            }
            fn readout_jvp(
                &self,
                ctx: &Self::Context,
                position: usize,
                tangents: fs_traits::MatrixRef<'_, S>,
            ) -> Result<fs_traits::Matrix<S>, fs_traits::FsError> {
                $crate::cached::readout_jvp(self, ctx, position, tangents)
            }
            fn readout_vjp(
                &self,
                ctx: &Self::Context,
                position: usize,
                cotangents: fs_traits::MatrixRef<'_, S>,
            ) -> Result<fs_traits::Matrix<S>, fs_traits::FsError> {
                $crate::cached::readout_vjp(self, ctx, position, cotangents)
            }
            fn unembedding(&self) -> fs_traits::Unembedding<'_, S> {
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
            fn device_output_gram(
                &self,
                p: &[f64],
                slopes: Option<&[f64]>,
            ) -> Result<Option<Box<dyn fs_traits::OutputGram + '_>>, fs_traits::FsError> {
                $crate::cached::device_output_gram(
                    $crate::cached::CachedUpper::readout(self),
                    p,
                    slopes,
                )
            }
            fn attention_heads(&self) -> usize {
                $crate::cached::CachedUpper::attention_layout(self, 0).0
            }
            fn attention_scores(
                &self,
                ctx: &Self::Context,
                position: usize,
                head: fs_traits::AttentionHead,
                h: &[S],
            ) -> Result<Vec<S>, fs_traits::FsError> {
                $crate::cached::attention_scores(self, ctx, position, head, h)
            }
            fn attention_jacobian(
                &self,
                ctx: &Self::Context,
                position: usize,
                head: fs_traits::AttentionHead,
            ) -> Result<fs_traits::Matrix<S>, fs_traits::FsError> {
                $crate::cached::attention_jacobian(self, ctx, position, head)
            }
        }
    };
}
pub(crate) use impl_split_model;
