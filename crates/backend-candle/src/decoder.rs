//! The RoPE decoder families (Llama, Mistral, Qwen2/3, Gemma-2/3, OLMo-2, Phi-3, GPT-NeoX; the
//! block as `fs_checkpoint::DecoderConfig` documents it) as a
//! [`SplitModel`](fs_traits::SplitModel) on candle.
//!
//! Split layer `k`: `0` = token embedding (times `√d` for Gemma), `i` = output of block
//! `i − 1`, `n_layer` = last block's output before the final norm. The context cache stores
//! keys after the q/k norm and RoPE, with the key/value heads repeated to the query heads; a
//! row analysed at position `t` is rotated by angle `t` and sees, on sliding-window layers,
//! only the cached keys `j` with `t − j < window`.

use crate::cached::{
    attend_cached, causal_attention, context_mask, head_scores, Attention, CachedContext,
    CachedUpper, Readout, Table, Upload,
};
use crate::jvp::{attend_cached_jvp, Dual};
use crate::ops::{activation, layer_norm, linear, rms_norm, Weight};
use crate::{Error, Float};
use candle_core::{Device, Tensor, D};
use fs_checkpoint::{
    Activation, DecoderConfig, DecoderWeights, LayerAttention, Norm, NormKind, QkNorm, StoredLinear,
};
use fs_traits::AttentionHead;
use std::marker::PhantomData;

/// A linear layer: its weight ([`Weight`]: f32 on the device, or as stored and widened per
/// product) and optional bias.
struct Lin {
    w: Weight,
    b: Option<Tensor>,
}

impl Lin {
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }
    fn apply_dual(&self, x: &Dual) -> candle_core::Result<Dual> {
        x.linear(&self.w, self.b.as_ref())
    }
}

/// A norm on the device.
struct NormT {
    w: Tensor,
    b: Option<Tensor>,
}

struct Block {
    attn_norm: Option<NormT>,
    q: Lin,
    k: Lin,
    v: Lin,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o: Lin,
    post_attn_norm: Option<NormT>,
    mlp_norm: Option<NormT>,
    gate: Option<Lin>,
    up: Lin,
    down: Lin,
    post_mlp_norm: Option<NormT>,
    /// Scores, cap and window of this layer.
    attn: Attention,
    /// Index into [`Decoder::inv_freq`]: 0 global, 1 sliding.
    rope: usize,
}

/// A RoPE decoder model on candle, computing in `S` (f32; f64 as a reference, [`Float`]).
pub struct Decoder<S: Float = f32> {
    cfg: DecoderConfig,
    embed: Table,
    embed_multiplier: Option<f64>,
    blocks: Vec<Block>,
    norm: NormT,
    /// RoPE inverse frequencies of full-attention layers, then of sliding ones.
    inv_freq: [Vec<f64>; 2],
    /// Device, dimensions, `W_U` (`embed` when tied), pass budget, dtype.
    readout: Readout,
    scalar: PhantomData<S>,
}

impl Decoder {
    /// Build the model from typed host weights ([`DecoderWeights`], read by `fs-checkpoint` from
    /// safetensors, GGUF or random values; fused tensors split, Gemma's norm weights `w` as stored).
    /// On the CPU, matrices stored narrower than f32 (bf16, f16, GGUF quantised blocks) stay so
    /// and are widened one product at a time ([`Weight`]; the embedding and `W_U` alike); f32 matrices, and every
    /// matrix on other devices, are uploaded as f32 once.
    pub fn new(weights: DecoderWeights, device: &Device) -> Result<Self, Error> {
        Self::with_scalar(weights, device)
    }
}

impl<S: Float> Decoder<S> {
    /// [`Decoder::new`] computing in `S` (`Decoder::<f64>::with_scalar`: the f64 reference
    /// model; every matrix dense in f64).
    pub fn with_scalar(weights: DecoderWeights, device: &Device) -> Result<Self, Error> {
        let DecoderWeights { config: cfg, embed, blocks, norm, lm_head } = weights;
        let up = Upload(device, S::DTYPE);
        let lin = |l: StoredLinear| -> candle_core::Result<Lin> {
            let (w, b) = up.stored_linear(l)?;
            Ok(Lin { w, b })
        };
        // Norm weights in the compute dtype, Gemma's `1 + w` formed there.
        let offset = cfg.norm_offset();
        let scale = |w: Vec<f32>| -> candle_core::Result<Tensor> { up.vector(w)? + offset };
        let norm_t = |n: Norm| -> candle_core::Result<NormT> {
            Ok(NormT { w: scale(n.weight)?, b: n.bias.map(|b| up.vector(b)).transpose()? })
        };
        let opt_norm = |n: Option<Norm>| n.map(norm_t).transpose();
        // Tangent bytes per row per block: residual, norms, q/k/v/o, attention, the MLP's three.
        let q_width = cfg.num_attention_heads * cfg.head_dim;
        let bytes_per_row_per_block =
            4 * (12 * cfg.hidden_size + 4 * q_width + 5 * cfg.intermediate_size);
        let (embed, mut readout) =
            Readout::with_embedding(&up, cfg.dims(), embed, lm_head, bytes_per_row_per_block)?;
        readout.final_logit_softcap = cfg.final_logit_softcap;
        let blocks = blocks
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let sliding = cfg.layer_types[i] == LayerAttention::Sliding;
                Ok(Block {
                    attn_norm: opt_norm(b.attn_norm)?,
                    q: lin(b.q)?,
                    k: lin(b.k)?,
                    v: lin(b.v)?,
                    q_norm: b.q_norm.map(scale).transpose()?,
                    k_norm: b.k_norm.map(scale).transpose()?,
                    o: lin(b.o)?,
                    post_attn_norm: opt_norm(b.post_attn_norm)?,
                    mlp_norm: opt_norm(b.mlp_norm)?,
                    gate: b.gate.map(lin).transpose()?,
                    up: lin(b.up)?,
                    down: lin(b.down)?,
                    post_mlp_norm: opt_norm(b.post_mlp_norm)?,
                    attn: Attention {
                        scale: cfg.attention_scale(),
                        softcap: cfg.attn_logit_softcap,
                        window: cfg.layer_window(i),
                    },
                    rope: usize::from(sliding && cfg.sliding_rope.is_some()),
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inv_freq = [
            cfg.rope.inv_freq(cfg.rotary_dim),
            cfg.sliding_rope.unwrap_or(cfg.rope).inv_freq(cfg.rotary_dim),
        ];
        Ok(Decoder {
            // √d rounded to the compute type, as transformers rounds it to the activations'.
            embed_multiplier: cfg
                .embedding_multiplier()
                .map(|_| S::round_from_f64((cfg.hidden_size as f64).sqrt()).as_f64()),
            norm: norm_t(norm)?,
            inv_freq,
            cfg,
            embed,
            blocks,
            readout,
            scalar: PhantomData,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    fn norm(&self, x: &Tensor, n: &NormT) -> candle_core::Result<Tensor> {
        match (self.cfg.norm, &n.b) {
            (NormKind::Layer, Some(b)) => layer_norm(x, &n.w, b, self.cfg.norm_eps),
            _ => rms_norm(x, &n.w, self.cfg.norm_eps),
        }
    }

    fn norm_dual(&self, x: &Dual, n: &NormT) -> candle_core::Result<Dual> {
        match (self.cfg.norm, &n.b) {
            (NormKind::Layer, Some(b)) => x.layer_norm(&n.w, b, self.cfg.norm_eps),
            _ => x.rms_norm(&n.w, self.cfg.norm_eps),
        }
    }

    fn maybe_norm(&self, x: Tensor, n: &Option<NormT>) -> candle_core::Result<Tensor> {
        n.as_ref().map_or(Ok(x.clone()), |n| self.norm(&x, n))
    }

    fn maybe_norm_dual(&self, x: Dual, n: &Option<NormT>) -> candle_core::Result<Dual> {
        match n {
            None => Ok(x),
            Some(n) => self.norm_dual(&x, n),
        }
    }

    /// `cos` and `sin` of the rotary angles for `positions`, each `(len, rotary_dim)` (the
    /// `rotary_dim/2` frequencies of table `which` repeated twice, for `rotate_half`).
    fn rope_tables(
        &self,
        positions: &[usize],
        which: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let inv_freq = &self.inv_freq[which];
        let rd = 2 * inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * rd);
        let mut sin = Vec::with_capacity(positions.len() * rd);
        for &t in positions {
            for _ in 0..2 {
                for f in inv_freq {
                    let a = t as f64 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let shape = (positions.len(), rd);
        let (device, dtype) = (&self.readout.device, self.readout.dtype);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// The rotary tables of `positions` for each RoPE the layers use, indexed by
    /// `Block::rope`: full-attention layers, then sliding ones when their θ differs.
    fn rope_sets(&self, positions: &[usize]) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
        let sets = if self.cfg.sliding_rope.is_some() { 2 } else { 1 };
        (0..sets).map(|which| self.rope_tables(positions, which)).collect()
    }

    /// The cached-context masks of `positions`, built once per pass: index 0 for full layers,
    /// 1 for sliding-window layers (every sliding layer has the config's one window).
    fn context_masks(
        &self,
        positions: &[usize],
    ) -> candle_core::Result<[Option<(Tensor, usize)>; 2]> {
        let sliding = match self.cfg.sliding_window {
            Some(w) => context_mask(positions, Some(w), &self.readout)?,
            None => None,
        };
        Ok([context_mask(positions, None, &self.readout)?, sliding])
    }

    /// `x·cos + rotate_half(x)·sin` on the first `rotary_dim` entries of the last dimension,
    /// the rest passed through (`cos`/`sin` broadcastable to that part).
    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let dh = x.dim(D::Minus1)?;
        let rd = cos.dim(D::Minus1)?;
        let (rot, pass) = if rd == dh {
            (x.clone(), None)
        } else {
            (x.narrow(D::Minus1, 0, rd)?, Some(x.narrow(D::Minus1, rd, dh - rd)?))
        };
        let x1 = rot.narrow(D::Minus1, 0, rd / 2)?;
        let x2 = rot.narrow(D::Minus1, rd / 2, rd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let out = (rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
        match pass {
            None => Ok(out),
            Some(p) => Tensor::cat(&[&out, &p], D::Minus1)?.contiguous(),
        }
    }

    /// Repeat key/value heads to the query heads along `head_axis` (`(…, KV, …)` → `(…, H, …)`,
    /// query head `j` ↔ key/value head `j / (H/KV)`).
    fn repeat_kv(&self, x: &Tensor, head_axis: usize) -> candle_core::Result<Tensor> {
        let rep = self.cfg.num_attention_heads / self.cfg.num_key_value_heads;
        if rep == 1 {
            return Ok(x.clone());
        }
        let mut dims = x.dims().to_vec();
        let expanded = x.unsqueeze(head_axis + 1)?;
        let mut target = expanded.dims().to_vec();
        target[head_axis + 1] = rep;
        dims[head_axis] *= rep;
        expanded.broadcast_as(target)?.contiguous()?.reshape(dims)
    }

    /// The q/k RMSNorm (per head: the last axis of `(…, n, head_dim)`; over the projection:
    /// before the split into heads).
    fn qk_norm(
        &self,
        x: Tensor,
        w: &Option<Tensor>,
        per_head: bool,
    ) -> candle_core::Result<Tensor> {
        match w {
            Some(w) if (self.cfg.qk_norm == Some(QkNorm::PerHead)) == per_head => {
                rms_norm(&x, w, self.cfg.norm_eps)
            }
            _ => Ok(x),
        }
    }

    fn qk_norm_dual(
        &self,
        x: Dual,
        w: &Option<Tensor>,
        per_head: bool,
    ) -> candle_core::Result<Dual> {
        match w {
            Some(w) if (self.cfg.qk_norm == Some(QkNorm::PerHead)) == per_head => {
                x.rms_norm(w, self.cfg.norm_eps)
            }
            _ => Ok(x),
        }
    }

    /// One projection `l(a)` split into `n` heads: the q/k norm over the projection, `split`
    /// into the heads-first layout, the per-head q/k norm, then RoPE when `rope` is given.
    fn heads(
        &self,
        a: &Tensor,
        l: &Lin,
        norm: &Option<Tensor>,
        n: usize,
        split: impl Fn(Tensor, usize) -> candle_core::Result<Tensor>,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let y = self.qk_norm(l.apply(a)?, norm, false)?;
        let y = self.qk_norm(split(y, n)?, norm, true)?;
        match rope {
            Some((cos, sin)) => Self::rope(&y, cos, sin),
            None => Ok(y),
        }
    }

    /// `down(act(gate a) ⊙ up a)` or `down(act(up a))`.
    fn mlp(&self, a: &Tensor, b: &Block) -> candle_core::Result<Tensor> {
        let up = b.up.apply(a)?;
        let inner = match &b.gate {
            Some(g) => (activation(&g.apply(a)?, self.cfg.activation)? * up)?,
            None => activation(&up, self.cfg.activation)?,
        };
        b.down.apply(&inner)
    }

    fn mlp_dual(&self, a: &Dual, b: &Block) -> candle_core::Result<Dual> {
        let up = b.up.apply_dual(a)?;
        let inner = match (&b.gate, self.cfg.activation) {
            (Some(g), Activation::Silu) => g.apply_dual(a)?.silu_times(&up)?,
            (Some(g), act) => g.apply_dual(a)?.activation(act)?.mul(&up)?,
            (None, act) => up.activation(act)?,
        };
        b.down.apply_dual(&inner)
    }

    /// The residual update of block `b` around its attention output `o` (already through
    /// `W_o`): sequential or parallel, with the post-norms.
    fn residual(&self, x: Tensor, o: Tensor, b: &Block) -> candle_core::Result<Tensor> {
        let o = self.maybe_norm(o, &b.post_attn_norm)?;
        if self.cfg.parallel_residual {
            let m = self.mlp(&self.maybe_norm(x.clone(), &b.mlp_norm)?, b)?;
            return (x + o)? + self.maybe_norm(m, &b.post_mlp_norm)?;
        }
        let x = (x + o)?;
        let m = self.mlp(&self.maybe_norm(x.clone(), &b.mlp_norm)?, b)?;
        x + self.maybe_norm(m, &b.post_mlp_norm)?
    }

    fn residual_dual(&self, x: Dual, o: Dual, b: &Block) -> candle_core::Result<Dual> {
        let o = self.maybe_norm_dual(o, &b.post_attn_norm)?;
        if self.cfg.parallel_residual {
            let a = self.maybe_norm_dual(Dual { x: x.x.clone(), dx: x.dx.clone() }, &b.mlp_norm)?;
            let m = self.maybe_norm_dual(self.mlp_dual(&a, b)?, &b.post_mlp_norm)?;
            return x.add(&o)?.add(&m);
        }
        let x = x.add(&o)?;
        let a = self.maybe_norm_dual(Dual { x: x.x.clone(), dx: x.dx.clone() }, &b.mlp_norm)?;
        let m = self.maybe_norm_dual(self.mlp_dual(&a, b)?, &b.post_mlp_norm)?;
        x.add(&m)
    }

    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<CachedContext>> {
        let t_len = tokens.len();
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let positions: Vec<usize> = (0..t_len).collect();
        let tables = self.rope_sets(&positions)?;
        let mut x = self.embed.rows(tokens, &self.readout.device)?;
        if let Some(m) = self.embed_multiplier {
            x = (x * m)?;
        }
        let mut hidden = vec![x.clone()];
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for b in &self.blocks {
            let a = self.maybe_norm(x.clone(), &b.attn_norm)?;
            let (cos, sin) = (&tables[b.rope].0.unsqueeze(0)?, &tables[b.rope].1.unsqueeze(0)?);
            // (T, n·dh) → (n, T, dh).
            let split = |y: Tensor, n| y.reshape((t_len, n, dh))?.transpose(0, 1)?.contiguous();
            let q = self.heads(&a, &b.q, &b.q_norm, h, split, Some((cos, sin)))?;
            let k = self.heads(&a, &b.k, &b.k_norm, kv, split, Some((cos, sin)))?;
            let v = self.heads(&a, &b.v, &None, kv, split, None)?;
            let (k, v) = (self.repeat_kv(&k, 0)?, self.repeat_kv(&v, 0)?);
            let out =
                causal_attention(&q, &k, &v, &b.attn)?.transpose(0, 1)?.reshape((t_len, h * dh))?;
            x = self.residual(x, b.o.apply(&out)?, b)?;
            keys.push(k);
            values.push(v);
            hidden.push(x.clone());
        }
        let final_norm = self.norm(&x, &self.norm)?;
        Ok(CachedContext::for_layers(tokens, layers, &hidden, &keys, &values, &final_norm))
    }

    /// The upper half on rows `(P, R, d)`: `u = norm(x_L)`, or, with `stop`, the scores of that
    /// head inside its block ([`head_scores`], `P = 1`).
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        hrows: &Tensor,
        stop: Option<AttentionHead>,
    ) -> candle_core::Result<Tensor> {
        let (p_n, r_n, _) = hrows.dims3()?;
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let rd = self.cfg.rotary_dim;
        let tables = self.rope_sets(positions)?;
        let masks = self.context_masks(positions)?;
        let mut x = hrows.clone();
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let mask = &masks[usize::from(b.attn.window.is_some())];
            let (cos, sin) = (
                &tables[b.rope].0.reshape((p_n, 1, 1, rd))?,
                &tables[b.rope].1.reshape((p_n, 1, 1, rd))?,
            );
            let a = self.maybe_norm(x.clone(), &b.attn_norm)?;
            // (P, R, n·dh) → (P, n, R, dh).
            let split = |y: Tensor, n| y.reshape((p_n, r_n, n, dh))?.transpose(1, 2)?.contiguous();
            let q = self.heads(&a, &b.q, &b.q_norm, h, split, Some((cos, sin)))?;
            let k = self.heads(&a, &b.k, &b.k_norm, kv, split, Some((cos, sin)))?;
            let v = self.heads(&a, &b.v, &None, kv, split, None)?;
            let (k, v) = (self.repeat_kv(&k, 1)?, self.repeat_kv(&v, 1)?);
            if let Some(stop) = stop.filter(|s| s.layer == ctx.layer + idx) {
                return head_scores(&q, &k, &ctx.keys[idx], positions[0], stop.head, &b.attn);
            }
            let out = attend_cached(
                &q,
                &k,
                &v,
                &ctx.keys[idx],
                &ctx.values[idx],
                mask.as_ref(),
                &b.attn,
            )?;
            let out = out.transpose(1, 2)?.reshape((p_n, r_n, h * dh))?;
            x = self.residual(x, b.o.apply(&out)?, b)?;
        }
        self.norm(&x, &self.norm)
    }

    /// [`Decoder::run_upper`] differentiated forward ([`crate::jvp`]): primal rows `(P, 1, d)` and
    /// tangents `(P, R, d)` in, `u = norm(x_L)` and `u̇` out. RoPE and the key/value head
    /// repetition are linear, so they act on the tangents as on the primal.
    fn upper_jvp(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        hrows: Dual,
    ) -> candle_core::Result<Dual> {
        let p_n = positions.len();
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let rd = self.cfg.rotary_dim;
        let tables = self.rope_sets(positions)?;
        let masks = self.context_masks(positions)?;
        let mut x = hrows;
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let mask = &masks[usize::from(b.attn.window.is_some())];
            let (cos, sin) = (
                &tables[b.rope].0.reshape((p_n, 1, 1, rd))?,
                &tables[b.rope].1.reshape((p_n, 1, 1, rd))?,
            );
            let a =
                self.maybe_norm_dual(Dual { x: x.x.clone(), dx: x.dx.clone() }, &b.attn_norm)?;
            let heads = |l: &Lin, norm: &Option<Tensor>, n: usize, rotate: bool| {
                let y = self.qk_norm_dual(l.apply_dual(&a)?, norm, false)?;
                let y = y.map(|t, r| t.reshape((p_n, r, n, dh))?.transpose(1, 2)?.contiguous())?;
                let y = self.qk_norm_dual(y, norm, true)?;
                if rotate {
                    y.map(|t, _| Self::rope(t, cos, sin))
                } else {
                    Ok(y)
                }
            };
            let q = heads(&b.q, &b.q_norm, h, true)?;
            let k = heads(&b.k, &b.k_norm, kv, true)?.map(|t, _| self.repeat_kv(t, 1))?;
            let v = heads(&b.v, &None, kv, false)?.map(|t, _| self.repeat_kv(t, 1))?;
            let out = attend_cached_jvp(
                &q,
                &k,
                &v,
                &ctx.keys[idx],
                &ctx.values[idx],
                mask.as_ref(),
                &b.attn,
            )?;
            let out = out.map(|t, r| t.transpose(1, 2)?.reshape((p_n, r, h * dh)))?;
            x = self.residual_dual(x, b.o.apply_dual(&out)?, b)?;
        }
        self.norm_dual(&x, &self.norm)
    }
}

impl<S: Float> CachedUpper for Decoder<S> {
    fn readout(&self) -> &Readout {
        &self.readout
    }
    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<CachedContext>> {
        Decoder::forward_sequence(self, tokens, layers)
    }
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: &Tensor,
        stop: Option<AttentionHead>,
    ) -> candle_core::Result<Tensor> {
        Decoder::run_upper(self, ctx, positions, h, stop)
    }
    fn attention_layout(&self, layer: usize) -> (usize, Option<usize>) {
        let window = self.blocks.get(layer).and_then(|b| b.attn.window);
        (self.cfg.num_attention_heads, window)
    }
    fn upper_jvp(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: Dual,
    ) -> candle_core::Result<Dual> {
        Decoder::upper_jvp(self, ctx, positions, h)
    }
}

crate::cached::impl_split_model!(Decoder);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{clear_product_memo, memo_hits, replicated_products};
    use fs_checkpoint::{Architecture, GgmlType, ModelConfig, RandomSource};
    use fs_traits::{Matrix, SplitModel};

    /// Two `readout_vjp`s at one position with different cotangents, also different in number
    /// (the top-K solver's pattern): the second takes every forward product of the upper half
    /// from the product memo and gives bitwise the result of a fresh computation (memo
    /// emptied), with bf16 weights (stored) and f32 ones (dense).
    #[test]
    fn repeated_readout_vjps_reuse_the_forward_products() {
        let cfg = DecoderConfig::llama_like(Architecture::Llama, 40, 16, 24, 3, 4, 2, 4);
        let (layer, position) = (1, 4);
        for dtype in [GgmlType::BF16, GgmlType::F32] {
            let source = &mut RandomSource::new(&ModelConfig::Decoder(cfg.clone()), 0.3, 11)
                .with_dtype(dtype)
                .unwrap();
            let weights = DecoderWeights::read(cfg.clone(), source).unwrap();
            let model = Decoder::new(weights, &Device::Cpu).unwrap();
            assert_eq!(model.blocks[layer].q.w.is_stored(), dtype == GgmlType::BF16);
            let ctx = model.lower(&[3, 1, 4, 1, 5, 9], layer).unwrap();
            let du = model.dims().readout_dim;
            let cotangents = |r: usize, seed: f32| {
                Matrix::from_fn(r, du, |i, k| ((i * du + k) as f32 * 0.7 + seed).sin())
            };
            let (c1, c2) = (cotangents(3, 0.0), cotangents(5, 1.0));
            let vjp = |c: &Matrix<f32>| {
                let (hits, products) = (memo_hits(), replicated_products());
                let g = model.readout_vjp(&ctx, position, c.view()).unwrap();
                let bits: Vec<u32> = g.as_slice().iter().map(|x| x.to_bits()).collect();
                (bits, memo_hits() - hits, replicated_products() - products)
            };
            clear_product_memo();
            let (g1, hits, products) = vjp(&c1);
            // q, k, v, o, gate, up, down of each upper block, each one row per group.
            assert_eq!((hits, products), (0, 7 * (cfg.num_hidden_layers - layer)));
            let (g2, hits, _) = vjp(&c2);
            assert_eq!(hits, products, "the second VJP's forward products are all memo hits");
            assert_ne!(g1[..16], g2[..16]);
            clear_product_memo();
            let (fresh2, hits, _) = vjp(&c2);
            assert_eq!((fresh2, hits), (g2, 0), "a fresh computation gives the same bits");
            clear_product_memo();
            assert_eq!(vjp(&c1).0, g1);
        }
    }
}
