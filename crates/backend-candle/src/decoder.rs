//! The Decoder family (Decoder, Mistral, Qwen2, SmolLM; HF `LlamaForCausalLM` semantics) as a
//! [`SplitModel`](fs_traits::SplitModel) on candle: RMSNorm, RoPE with `rotate_half` (θ and
//! Decoder-3 scaling from the config), grouped-query attention, SwiGLU, tied or untied `lm_head`,
//! optional q/k/v(/o) biases.
//!
//! Split layer `k`: `0` = token embedding, `i` = output of block `i − 1`, `n_layer` = last
//! block's output before the final RMSNorm. The context cache stores keys after RoPE, with the
//! key/value heads repeated to the query heads; a row analysed at position `t` is rotated by
//! angle `t` (never 0, unlike the original script's KV-cache extension).

use crate::cached::{
    attend_cached, causal_attention, context_mask, CachedContext, CachedUpper, Readout, Upload,
};
use crate::jvp::{attend_cached_jvp, Dual};
use crate::ops::linear;
use crate::Error;
use candle_core::{Device, Tensor, D};
use fs_checkpoint::{DecoderConfig, DecoderWeights};

struct Block {
    attn_norm: Tensor,
    q_w: Tensor,
    q_b: Option<Tensor>,
    k_w: Tensor,
    k_b: Option<Tensor>,
    v_w: Tensor,
    v_b: Option<Tensor>,
    o_w: Tensor,
    o_b: Option<Tensor>,
    mlp_norm: Tensor,
    gate_w: Tensor,
    up_w: Tensor,
    down_w: Tensor,
    gate_b: Option<Tensor>,
    up_b: Option<Tensor>,
    down_b: Option<Tensor>,
}

/// A Decoder-family model on candle.
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    inv_freq: Vec<f64>,
    /// Device, dimensions, `W_U` (`embed` when tied), pass budget.
    readout: Readout,
}

impl Decoder {
    /// Upload typed host weights ([`DecoderWeights`], read by `fs-checkpoint` from safetensors,
    /// GGUF or random values; linear weights already `[in, out]`) to `device`. `W_U` stays on
    /// the host too, for the estimators' weighted Gram.
    pub fn new(weights: DecoderWeights, device: &Device) -> Result<Self, Error> {
        let DecoderWeights { config: cfg, embed, blocks, norm, lm_head } = weights;
        let up = Upload(device);
        let linear = |l| up.linear(l);
        let vector = |v| up.vector(v);
        // Tangent bytes per row per block: residual, norms, q/k/v/o, attention, the MLP's three.
        let bytes_per_row_per_block = 4 * (16 * cfg.hidden_size + 5 * cfg.intermediate_size);
        let (embed, readout) =
            Readout::with_embedding(device, cfg.dims(), embed, lm_head, bytes_per_row_per_block)?;
        let blocks = blocks
            .into_iter()
            .map(|b| {
                let (q_w, q_b) = linear(b.q)?;
                let (k_w, k_b) = linear(b.k)?;
                let (v_w, v_b) = linear(b.v)?;
                let (o_w, o_b) = linear(b.o)?;
                let (gate_w, gate_b) = linear(b.gate)?;
                let (up_w, up_b) = linear(b.up)?;
                let (down_w, down_b) = linear(b.down)?;
                Ok(Block {
                    attn_norm: vector(b.attn_norm)?,
                    q_w,
                    q_b,
                    k_w,
                    k_b,
                    v_w,
                    v_b,
                    o_w,
                    o_b,
                    mlp_norm: vector(b.mlp_norm)?,
                    gate_w,
                    up_w,
                    down_w,
                    gate_b,
                    up_b,
                    down_b,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Decoder { inv_freq: cfg.inv_freq(), norm: vector(norm)?, cfg, embed, blocks, readout })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.cfg.rms_norm_eps)?.sqrt()?)?.broadcast_mul(w)
    }

    /// `cos` and `sin` of the rotary angles for `positions`, each `(len, head_dim)` (the
    /// `head_dim/2` frequencies repeated twice, for `rotate_half`).
    fn rope_tables(&self, positions: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * 2 * half);
        let mut sin = Vec::with_capacity(positions.len() * 2 * half);
        for &t in positions {
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let a = t as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let shape = (positions.len(), 2 * half);
        Ok((
            Tensor::from_vec(cos, shape, &self.readout.device)?,
            Tensor::from_vec(sin, shape, &self.readout.device)?,
        ))
    }

    /// `x·cos + rotate_half(x)·sin` on the last dimension (`cos`/`sin` broadcastable to `x`).
    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let dh = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, dh / 2)?;
        let x2 = x.narrow(D::Minus1, dh / 2, dh / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
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

    fn mlp(&self, x: &Tensor, b: &Block) -> candle_core::Result<Tensor> {
        let a = self.rms_norm(x, &b.mlp_norm)?;
        let gate = linear(&a, &b.gate_w, b.gate_b.as_ref())?.silu()?;
        let up = linear(&a, &b.up_w, b.up_b.as_ref())?;
        linear(&(gate * up)?, &b.down_w, b.down_b.as_ref())
    }

    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<CachedContext>> {
        let t_len = tokens.len();
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let scale = 1.0 / (dh as f64).sqrt();
        let positions: Vec<usize> = (0..t_len).collect();
        let (cos, sin) = self.rope_tables(&positions)?;
        let (cos, sin) = (cos.unsqueeze(0)?, sin.unsqueeze(0)?);
        let mut x = self.embed.index_select(&Tensor::new(tokens, &self.readout.device)?, 0)?;
        let mut hidden = vec![x.clone()];
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for b in &self.blocks {
            let a = self.rms_norm(&x, &b.attn_norm)?;
            let heads =
                |w: &Tensor, bias: Option<&Tensor>, n: usize| -> candle_core::Result<Tensor> {
                    linear(&a, w, bias)?.reshape((t_len, n, dh))?.transpose(0, 1)?.contiguous()
                };
            let q = Self::rope(&heads(&b.q_w, b.q_b.as_ref(), h)?, &cos, &sin)?;
            let k = Self::rope(&heads(&b.k_w, b.k_b.as_ref(), kv)?, &cos, &sin)?;
            let v = heads(&b.v_w, b.v_b.as_ref(), kv)?;
            let (k, v) = (self.repeat_kv(&k, 0)?, self.repeat_kv(&v, 0)?);
            let out =
                causal_attention(&q, &k, &v, scale)?.transpose(0, 1)?.reshape((t_len, h * dh))?;
            x = (x + linear(&out, &b.o_w, b.o_b.as_ref())?)?;
            x = (&x + self.mlp(&x, b)?)?;
            keys.push(k);
            values.push(v);
            hidden.push(x.clone());
        }
        let final_norm = self.rms_norm(&x, &self.norm)?;
        Ok(CachedContext::for_layers(tokens, layers, &hidden, &keys, &values, &final_norm))
    }

    fn upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        hrows: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (p_n, r_n, _) = hrows.dims3()?;
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let scale = 1.0 / (dh as f64).sqrt();
        let mask = context_mask(positions, &self.readout.device)?;
        let (cos, sin) = self.rope_tables(positions)?;
        let (cos, sin) = (cos.reshape((p_n, 1, 1, dh))?, sin.reshape((p_n, 1, 1, dh))?);
        let mut x = hrows.clone();
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let a = self.rms_norm(&x, &b.attn_norm)?;
            let heads =
                |w: &Tensor, bias: Option<&Tensor>, n: usize| -> candle_core::Result<Tensor> {
                    linear(&a, w, bias)?.reshape((p_n, r_n, n, dh))?.transpose(1, 2)?.contiguous()
                };
            let q = Self::rope(&heads(&b.q_w, b.q_b.as_ref(), h)?, &cos, &sin)?;
            let k = Self::rope(&heads(&b.k_w, b.k_b.as_ref(), kv)?, &cos, &sin)?;
            let v = heads(&b.v_w, b.v_b.as_ref(), kv)?;
            let (k, v) = (self.repeat_kv(&k, 1)?, self.repeat_kv(&v, 1)?);
            let out =
                attend_cached(&q, &k, &v, &ctx.keys[idx], &ctx.values[idx], mask.as_ref(), scale)?;
            let out = out.transpose(1, 2)?.reshape((p_n, r_n, h * dh))?;
            x = (x + linear(&out, &b.o_w, b.o_b.as_ref())?)?;
            x = (&x + self.mlp(&x, b)?)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    /// [`Decoder::upper`] differentiated forward ([`crate::jvp`]): primal rows `(P, 1, d)` and
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
        let scale = 1.0 / (dh as f64).sqrt();
        let eps = self.cfg.rms_norm_eps;
        let mask = context_mask(positions, &self.readout.device)?;
        let (cos, sin) = self.rope_tables(positions)?;
        let (cos, sin) = (cos.reshape((p_n, 1, 1, dh))?, sin.reshape((p_n, 1, 1, dh))?);
        let mut x = hrows;
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let a = x.rms_norm(&b.attn_norm, eps)?;
            let heads = |w: &Tensor, bias: Option<&Tensor>, n: usize| {
                a.linear(w, bias)?
                    .map(|t, r| t.reshape((p_n, r, n, dh))?.transpose(1, 2)?.contiguous())
            };
            let q = heads(&b.q_w, b.q_b.as_ref(), h)?.map(|t, _| Self::rope(t, &cos, &sin))?;
            let k = heads(&b.k_w, b.k_b.as_ref(), kv)?
                .map(|t, _| self.repeat_kv(&Self::rope(t, &cos, &sin)?, 1))?;
            let v = heads(&b.v_w, b.v_b.as_ref(), kv)?.map(|t, _| self.repeat_kv(t, 1))?;
            let out = attend_cached_jvp(
                &q,
                &k,
                &v,
                &ctx.keys[idx],
                &ctx.values[idx],
                mask.as_ref(),
                scale,
            )?;
            let out = out.map(|t, r| t.transpose(1, 2)?.reshape((p_n, r, h * dh)))?;
            x = x.add(&out.linear(&b.o_w, b.o_b.as_ref())?)?;
            let a = x.rms_norm(&b.mlp_norm, eps)?;
            let gate = a.linear(&b.gate_w, b.gate_b.as_ref())?;
            let up = a.linear(&b.up_w, b.up_b.as_ref())?;
            x = x.add(&gate.silu_times(&up)?.linear(&b.down_w, b.down_b.as_ref())?)?;
        }
        x.rms_norm(&self.norm, eps)
    }
}

impl CachedUpper for Decoder {
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
    fn upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: &Tensor,
    ) -> candle_core::Result<Tensor> {
        Decoder::upper(self, ctx, positions, h)
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
