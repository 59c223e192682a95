//! The Decoder family (Decoder, Mistral, Qwen2, SmolLM; HF `LlamaForCausalLM` semantics) as a
//! [`SplitModel`](fs_traits::SplitModel) on burn: RMSNorm, RoPE with `rotate_half` (θ and
//! Decoder-3 scaling from the config, [`DecoderConfig::inv_freq`]), grouped-query attention, SwiGLU,
//! tied or untied `lm_head`, optional q/k/v/o and MLP biases.
//!
//! ```text
//!     a = RMSNorm(x) = x / √(mean(x²) + ε) · w
//!     q, k = RoPE(a·W_q + b_q), RoPE(a·W_k + b_k);   RoPE(x)_t = x·cos(tθ) + rotate_half(x)·sin(tθ)
//!     x ← x + softmax(q kᵀ / √d_head + causal) v · W_o (+ b_o)
//!     x ← x + (silu(a·W_gate) ⊙ (a·W_up)) · W_down,   a = RMSNorm(x)
//! ```
//!
//! Split layer `k`: `0` = token embedding, `i` = output of block `i − 1`, `n_layer` = last
//! block's output before the final RMSNorm. The context cache stores keys after RoPE, with the
//! key/value heads repeated to the query heads; a row analysed at position `t` is rotated by
//! angle `t` (never 0, unlike the original script's KV-cache extension).

use crate::cached::{
    attend_cached, causal_attention, context_mask, indices, tensor, CachedContext, CachedUpper,
    Readout, Upload,
};
use crate::ops::{linear, rms_norm, silu};
use crate::Error;
use burn::tensor::{Device, Tensor};
use fs_checkpoint::{DecoderConfig, DecoderWeights};

/// One block's parameters; matrices stored `[in, out]` (transposed once from HF's `[out, in]`).
struct Block {
    attn_norm: Tensor<1>,
    q_w: Tensor<2>,
    q_b: Option<Tensor<1>>,
    k_w: Tensor<2>,
    k_b: Option<Tensor<1>>,
    v_w: Tensor<2>,
    v_b: Option<Tensor<1>>,
    o_w: Tensor<2>,
    o_b: Option<Tensor<1>>,
    mlp_norm: Tensor<1>,
    gate_w: Tensor<2>,
    gate_b: Option<Tensor<1>>,
    up_w: Tensor<2>,
    up_b: Option<Tensor<1>>,
    down_w: Tensor<2>,
    down_b: Option<Tensor<1>>,
}

/// A Decoder-family model on burn.
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Tensor<2>,
    blocks: Vec<Block>,
    norm: Tensor<1>,
    inv_freq: Vec<f64>,
    /// Plain device, dimensions, `W_U` (`embed` when tied), pass budget.
    readout: Readout,
}

impl Decoder {
    /// Upload typed host weights ([`DecoderWeights`], read by `fs-checkpoint` from safetensors,
    /// GGUF or random values; linear weights already `[in, out]`) to the plain (non-autodiff)
    /// view of `device`. `W_U` stays on the host too, for the estimators' weighted Gram.
    pub fn new(weights: DecoderWeights, device: &Device) -> Result<Self, Error> {
        let DecoderWeights { config: cfg, embed, blocks, norm, lm_head } = weights;
        // Autodiff bytes per row per block: residual, norms, q/k/v/o, attention, the MLP's three.
        let bytes_per_row_per_block = 4 * (16 * cfg.hidden_size + 5 * cfg.intermediate_size);
        let (embed, readout) =
            Readout::with_embedding(device, cfg.dims(), embed, lm_head, bytes_per_row_per_block);
        let up = Upload(&readout.device);
        let linear = |l| up.linear(l);
        let vector = |v| up.vector(v);
        let blocks = blocks
            .into_iter()
            .map(|b| {
                let (q_w, q_b) = linear(b.q);
                let (k_w, k_b) = linear(b.k);
                let (v_w, v_b) = linear(b.v);
                let (o_w, o_b) = linear(b.o);
                let (gate_w, gate_b) = linear(b.gate);
                let (up_w, up_b) = linear(b.up);
                let (down_w, down_b) = linear(b.down);
                Block {
                    attn_norm: vector(b.attn_norm),
                    q_w,
                    q_b,
                    k_w,
                    k_b,
                    v_w,
                    v_b,
                    o_w,
                    o_b,
                    mlp_norm: vector(b.mlp_norm),
                    gate_w,
                    gate_b,
                    up_w,
                    up_b,
                    down_w,
                    down_b,
                }
            })
            .collect();
        let norm = vector(norm);
        readout.sync()?;
        Ok(Decoder { inv_freq: cfg.inv_freq(), norm, cfg, embed, blocks, readout })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// `cos` and `sin` of the rotary angles `t·θ_i` for `positions`, each `(len, head_dim)` (the
    /// `head_dim/2` frequencies repeated twice, for `rotate_half`), computed in `f64`.
    fn rope_tables(&self, positions: &[usize]) -> (Tensor<2>, Tensor<2>) {
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
        let shape = [positions.len(), 2 * half];
        (tensor(cos, shape, &self.readout.device), tensor(sin, shape, &self.readout.device))
    }

    /// `x·cos + rotate_half(x)·sin` on the last dimension, `rotate_half(x) = [−x₂, x₁]`
    /// (`cos`/`sin` broadcastable to `x`).
    fn rope<const D: usize>(x: Tensor<D>, cos: &Tensor<D>, sin: &Tensor<D>) -> Tensor<D> {
        let dh = x.dims()[D - 1];
        let x1 = x.clone().narrow(D - 1, 0, dh / 2);
        let x2 = x.clone().narrow(D - 1, dh / 2, dh / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], D - 1);
        x.mul(cos.clone()).add(rotated.mul(sin.clone()))
    }

    /// Repeat key/value heads to the query heads along `head_axis` of a rank-`D` tensor
    /// (`(…, KV, …)` → `(…, H, …)`, query head `j` ↔ key/value head `j / (H/KV)`).
    fn repeat_kv<const D: usize, const D1: usize>(
        &self,
        x: Tensor<D>,
        head_axis: usize,
    ) -> Tensor<D> {
        let rep = self.cfg.num_attention_heads / self.cfg.num_key_value_heads;
        if rep == 1 {
            return x;
        }
        let dims = x.dims();
        let mut expanded = [0usize; D1];
        expanded[..=head_axis].copy_from_slice(&dims[..=head_axis]);
        expanded[head_axis + 1] = 1;
        expanded[head_axis + 2..].copy_from_slice(&dims[head_axis + 1..]);
        let x: Tensor<D1> = x.reshape(expanded);
        expanded[head_axis + 1] = rep;
        let mut out = dims;
        out[head_axis] *= rep;
        x.expand(expanded).reshape(out)
    }

    /// `(silu(a·W_gate) ⊙ (a·W_up)) · W_down`, `a = RMSNorm(x)`.
    fn mlp<const D: usize>(&self, x: Tensor<D>, b: &Block) -> Tensor<D> {
        let a = rms_norm(x, &b.mlp_norm, self.cfg.rms_norm_eps);
        let gate = silu(linear(a.clone(), &b.gate_w, b.gate_b.as_ref()));
        let up = linear(a, &b.up_w, b.up_b.as_ref());
        linear(gate.mul(up), &b.down_w, b.down_b.as_ref())
    }

    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<CachedContext> {
        let t_len = tokens.len();
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let scale = 1.0 / (dh as f64).sqrt();
        let positions: Vec<usize> = (0..t_len).collect();
        let (cos, sin) = self.rope_tables(&positions);
        let (cos, sin): (Tensor<3>, Tensor<3>) = (cos.unsqueeze(), sin.unsqueeze());
        let ids = indices(tokens.iter().map(|&t| t as usize), &self.readout.device);
        let mut x = self.embed.clone().select(0, ids);
        let mut hidden = vec![x.clone()];
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for b in &self.blocks {
            let a = rms_norm(x.clone(), &b.attn_norm, self.cfg.rms_norm_eps);
            let heads = |w: &Tensor<2>, bias: Option<&Tensor<1>>, n: usize| -> Tensor<3> {
                linear(a.clone(), w, bias).reshape([t_len, n, dh]).swap_dims(0, 1)
            };
            let q = Self::rope(heads(&b.q_w, b.q_b.as_ref(), h), &cos, &sin);
            let k = Self::rope(heads(&b.k_w, b.k_b.as_ref(), kv), &cos, &sin);
            let v = heads(&b.v_w, b.v_b.as_ref(), kv);
            let (k, v) = (self.repeat_kv::<3, 4>(k, 0), self.repeat_kv::<3, 4>(v, 0));
            let out = causal_attention(q, k.clone(), v.clone(), scale)
                .swap_dims(0, 1)
                .reshape([t_len, h * dh]);
            x = x.add(linear(out, &b.o_w, b.o_b.as_ref()));
            x = x.clone().add(self.mlp(x, b));
            keys.push(k);
            values.push(v);
            hidden.push(x.clone());
        }
        let final_norm = rms_norm(x, &self.norm, self.cfg.rms_norm_eps);
        CachedContext::for_layers(tokens, layers, &hidden, &keys, &values, &final_norm)
    }

    fn upper(&self, ctx: &CachedContext, positions: &[usize], hrows: Tensor<3>) -> Tensor<3> {
        let [p_n, r_n, _] = hrows.dims();
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let scale = 1.0 / (dh as f64).sqrt();
        let mask = context_mask(positions, &self.readout.device);
        let (cos, sin) = self.rope_tables(positions);
        let (cos, sin): (Tensor<4>, Tensor<4>) =
            (cos.reshape([p_n, 1, 1, dh]), sin.reshape([p_n, 1, 1, dh]));
        let mut x = hrows;
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let a = rms_norm(x.clone(), &b.attn_norm, self.cfg.rms_norm_eps);
            let heads = |w: &Tensor<2>, bias: Option<&Tensor<1>>, n: usize| -> Tensor<4> {
                linear(a.clone(), w, bias).reshape([p_n, r_n, n, dh]).swap_dims(1, 2)
            };
            let q = Self::rope(heads(&b.q_w, b.q_b.as_ref(), h), &cos, &sin);
            let k = Self::rope(heads(&b.k_w, b.k_b.as_ref(), kv), &cos, &sin);
            let v = heads(&b.v_w, b.v_b.as_ref(), kv);
            let (k, v) = (self.repeat_kv::<4, 5>(k, 1), self.repeat_kv::<4, 5>(v, 1));
            let out =
                attend_cached(q, k, v, &ctx.keys[idx], &ctx.values[idx], mask.as_ref(), scale);
            let out = out.swap_dims(1, 2).reshape([p_n, r_n, h * dh]);
            x = x.add(linear(out, &b.o_w, b.o_b.as_ref()));
            x = x.clone().add(self.mlp(x, b));
        }
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps)
    }
}

impl CachedUpper for Decoder {
    fn readout(&self) -> &Readout {
        &self.readout
    }
    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<CachedContext> {
        Decoder::forward_sequence(self, tokens, layers)
    }
    fn upper(&self, ctx: &CachedContext, positions: &[usize], h: Tensor<3>) -> Tensor<3> {
        Decoder::upper(self, ctx, positions, h)
    }
}

crate::cached::impl_split_model!(Decoder);
