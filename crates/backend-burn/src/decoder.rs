//! The RoPE decoder families (Llama, Mistral, Qwen2/3, Gemma-2/3, OLMo-2, Phi-3, GPT-NeoX; the
//! block as `fs_checkpoint::DecoderConfig` documents it) as a
//! [`SplitModel`](fs_traits::SplitModel) on burn (gradients by burn's reverse-mode autodiff).
//!
//! ```text
//!     a = attn_norm(x);   q, k = RoPE(qk_norm(a·W_q + b_q)), RoPE(qk_norm(a·W_k + b_k))
//!     o = post_attn_norm(softmax(cap(c·q kᵀ) + mask) v · W_o + b_o)
//!     x ← x + o + post_mlp_norm(mlp(mlp_norm(x)))      (parallel residual, GPT-NeoX)
//!     x ← x + o;  x ← x + post_mlp_norm(mlp(mlp_norm(x)))   (otherwise)
//! ```
//!
//! RoPE rotates the first `rotary_dim` entries of each head (`rotate_half`; per-layer θ), the
//! mask is causal and, on sliding layers, hides keys `j` with `i − j ≥ window`.
//!
//! Split layer `k`: `0` = token embedding (times `√d` for Gemma), `i` = output of block
//! `i − 1`, `n_layer` = last block's output before the final norm. The context cache stores
//! keys after the q/k norm and RoPE, with the key/value heads repeated to the query heads; a
//! row analysed at position `t` is rotated by angle `t`.

use crate::cached::{
    attend_cached, causal_attention, context_mask, head_scores, indices, tensor, Attention,
    CachedContext, CachedUpper, Readout, Upload,
};
use crate::ops::{activation, layer_norm, linear, rms_norm};
use crate::Error;
use burn::tensor::{Device, Tensor};
use fs_checkpoint::{
    DecoderConfig, DecoderWeights, HostMatrix, LayerAttention, Norm, NormKind, QkNorm,
    StoredLinear, StoredMatrix,
};
use fs_traits::AttentionHead;

/// A linear layer on the device: `[in, out]` weight and optional bias.
struct Lin {
    w: Tensor<2>,
    b: Option<Tensor<1>>,
}

impl Lin {
    fn apply<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, &self.w, self.b.as_ref())
    }
}

/// A norm on the device.
struct NormT {
    w: Tensor<1>,
    b: Option<Tensor<1>>,
}

struct Block {
    attn_norm: Option<NormT>,
    q: Lin,
    k: Lin,
    v: Lin,
    q_norm: Option<Tensor<1>>,
    k_norm: Option<Tensor<1>>,
    o: Lin,
    post_attn_norm: Option<NormT>,
    mlp_norm: Option<NormT>,
    gate: Option<Lin>,
    up: Lin,
    down: Lin,
    post_mlp_norm: Option<NormT>,
    attn: Attention,
    /// Index into [`Decoder::inv_freq`]: 0 global, 1 sliding.
    rope: usize,
}

/// A RoPE decoder model on burn.
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Tensor<2>,
    embed_multiplier: Option<f64>,
    blocks: Vec<Block>,
    norm: NormT,
    inv_freq: [Vec<f64>; 2],
    /// Plain device, dimensions, `W_U` (`embed` when tied), pass budget.
    readout: Readout,
}

impl Decoder {
    /// Upload typed host weights ([`DecoderWeights`], read by `fs-checkpoint` from safetensors,
    /// GGUF or random values; fused tensors split, Gemma's norm weights `w` as stored) to the plain
    /// (non-autodiff) view of `device`, every matrix widened to f32 (linear weights transposed to
    /// `[in, out]`): this engine holds the whole model in f32, unlike candle's CPU path. `W_U`
    /// stays on the host too, for the estimators' weighted Gram.
    pub fn new(weights: DecoderWeights, device: &Device) -> Result<Self, Error> {
        let DecoderWeights { config: cfg, embed, blocks, norm, lm_head } = weights;
        // Autodiff bytes per row per block: residual, norms, q/k/v/o, attention, the MLP's three.
        let q_width = cfg.num_attention_heads * cfg.head_dim;
        let bytes_per_row_per_block =
            4 * (12 * cfg.hidden_size + 4 * q_width + 5 * cfg.intermediate_size);
        let widen = |m: StoredMatrix| HostMatrix::new(m.rows(), m.cols(), m.to_f32());
        let (embed, mut readout) = Readout::with_embedding(
            device,
            cfg.dims(),
            widen(embed),
            lm_head.map(widen),
            bytes_per_row_per_block,
        );
        readout.final_logit_softcap = cfg.final_logit_softcap;
        let up = Upload(&readout.device);
        let lin = |l: StoredLinear| {
            let (w, b) = up.linear(l.to_linear());
            Lin { w, b }
        };
        // Norm weights with Gemma's `1 + w` formed on the device, in f32.
        let offset = cfg.norm_offset();
        let scale = |w: Vec<f32>| up.vector(w).add_scalar(offset);
        let norm_t = |n: Norm| NormT { w: scale(n.weight), b: n.bias.map(|b| up.vector(b)) };
        let blocks = blocks
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let sliding = cfg.layer_types[i] == LayerAttention::Sliding;
                Block {
                    attn_norm: b.attn_norm.map(norm_t),
                    q: lin(b.q),
                    k: lin(b.k),
                    v: lin(b.v),
                    q_norm: b.q_norm.map(scale),
                    k_norm: b.k_norm.map(scale),
                    o: lin(b.o),
                    post_attn_norm: b.post_attn_norm.map(norm_t),
                    mlp_norm: b.mlp_norm.map(norm_t),
                    gate: b.gate.map(lin),
                    up: lin(b.up),
                    down: lin(b.down),
                    post_mlp_norm: b.post_mlp_norm.map(norm_t),
                    attn: Attention {
                        scale: cfg.attention_scale(),
                        softcap: cfg.attn_logit_softcap,
                        window: cfg.layer_window(i),
                    },
                    rope: usize::from(sliding && cfg.sliding_rope.is_some()),
                }
            })
            .collect();
        let norm = norm_t(norm);
        readout.sync()?;
        let inv_freq = [
            cfg.rope.inv_freq(cfg.rotary_dim),
            cfg.sliding_rope.unwrap_or(cfg.rope).inv_freq(cfg.rotary_dim),
        ];
        Ok(Decoder {
            embed_multiplier: cfg.embedding_multiplier().map(f64::from),
            inv_freq,
            norm,
            cfg,
            embed,
            blocks,
            readout,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    fn norm<const D: usize>(&self, x: Tensor<D>, n: &NormT) -> Tensor<D> {
        match (self.cfg.norm, &n.b) {
            (NormKind::Layer, Some(b)) => layer_norm(x, &n.w, b, self.cfg.norm_eps),
            _ => rms_norm(x, &n.w, self.cfg.norm_eps),
        }
    }

    fn maybe_norm<const D: usize>(&self, x: Tensor<D>, n: &Option<NormT>) -> Tensor<D> {
        match n {
            None => x,
            Some(n) => self.norm(x, n),
        }
    }

    /// `cos` and `sin` of the rotary angles for `positions`, each `(len, rotary_dim)` (the
    /// `rotary_dim/2` frequencies of table `which` repeated twice, for `rotate_half`),
    /// computed in `f64`.
    fn rope_tables(&self, positions: &[usize], which: usize) -> (Tensor<2>, Tensor<2>) {
        let inv_freq = &self.inv_freq[which];
        let rd = 2 * inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * rd);
        let mut sin = Vec::with_capacity(positions.len() * rd);
        for &t in positions {
            for _ in 0..2 {
                for f in inv_freq {
                    let a = t as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let shape = [positions.len(), rd];
        (tensor(cos, shape, &self.readout.device), tensor(sin, shape, &self.readout.device))
    }

    /// The rotary tables of `positions` for each RoPE the layers use, indexed by
    /// `Block::rope`: full-attention layers, then sliding ones when their θ differs.
    fn rope_sets(&self, positions: &[usize]) -> Vec<(Tensor<2>, Tensor<2>)> {
        let sets = if self.cfg.sliding_rope.is_some() { 2 } else { 1 };
        (0..sets).map(|which| self.rope_tables(positions, which)).collect()
    }

    /// The cached-context masks of `positions`, built once per pass: index 0 for full layers,
    /// 1 for sliding-window layers (every sliding layer has the config's one window).
    fn context_masks(&self, positions: &[usize]) -> [Option<(Tensor<4>, usize)>; 2] {
        let device = &self.readout.device;
        let sliding =
            self.cfg.sliding_window.and_then(|w| context_mask(positions, Some(w), device));
        [context_mask(positions, None, device), sliding]
    }

    /// `x·cos + rotate_half(x)·sin` on the first `rotary_dim` entries of the last dimension,
    /// `rotate_half(x) = [−x₂, x₁]`, the rest passed through (`cos`/`sin` broadcastable).
    fn rope<const D: usize>(x: Tensor<D>, cos: &Tensor<D>, sin: &Tensor<D>) -> Tensor<D> {
        let dh = x.dims()[D - 1];
        let rd = cos.dims()[D - 1];
        let rot = x.clone().narrow(D - 1, 0, rd);
        let x1 = rot.clone().narrow(D - 1, 0, rd / 2);
        let x2 = rot.clone().narrow(D - 1, rd / 2, rd / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], D - 1);
        let out = rot.mul(cos.clone()).add(rotated.mul(sin.clone()));
        if rd == dh {
            out
        } else {
            Tensor::cat(vec![out, x.narrow(D - 1, rd, dh - rd)], D - 1)
        }
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

    /// The q/k RMSNorm (per head: the last axis of `(…, n, head_dim)`; over the projection:
    /// before the split into heads).
    fn qk_norm<const D: usize>(
        &self,
        x: Tensor<D>,
        w: &Option<Tensor<1>>,
        per_head: bool,
    ) -> Tensor<D> {
        match w {
            Some(w) if (self.cfg.qk_norm == Some(QkNorm::PerHead)) == per_head => {
                rms_norm(x, w, self.cfg.norm_eps)
            }
            _ => x,
        }
    }

    /// One projection `l(a)` split into `n` heads: the q/k norm over the projection, `split`
    /// into the heads-first layout, the per-head q/k norm, then RoPE when `rope` is given.
    fn heads<const D: usize, const E: usize>(
        &self,
        a: &Tensor<D>,
        l: &Lin,
        norm: &Option<Tensor<1>>,
        n: usize,
        split: impl Fn(Tensor<D>, usize) -> Tensor<E>,
        rope: Option<(&Tensor<E>, &Tensor<E>)>,
    ) -> Tensor<E> {
        let y = self.qk_norm(l.apply(a.clone()), norm, false);
        let y = self.qk_norm(split(y, n), norm, true);
        match rope {
            Some((cos, sin)) => Self::rope(y, cos, sin),
            None => y,
        }
    }

    /// `down(act(gate a) ⊙ up a)` or `down(act(up a))`.
    fn mlp<const D: usize>(&self, a: Tensor<D>, b: &Block) -> Tensor<D> {
        let up = b.up.apply(a.clone());
        let inner = match &b.gate {
            Some(g) => activation(g.apply(a), self.cfg.activation).mul(up),
            None => activation(up, self.cfg.activation),
        };
        b.down.apply(inner)
    }

    /// The residual update of block `b` around its attention output `o` (through `W_o`).
    fn residual<const D: usize>(&self, x: Tensor<D>, o: Tensor<D>, b: &Block) -> Tensor<D> {
        let o = self.maybe_norm(o, &b.post_attn_norm);
        if self.cfg.parallel_residual {
            let m = self.mlp(self.maybe_norm(x.clone(), &b.mlp_norm), b);
            return x.add(o).add(self.maybe_norm(m, &b.post_mlp_norm));
        }
        let x = x.add(o);
        let m = self.mlp(self.maybe_norm(x.clone(), &b.mlp_norm), b);
        x.add(self.maybe_norm(m, &b.post_mlp_norm))
    }

    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<CachedContext> {
        let t_len = tokens.len();
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let positions: Vec<usize> = (0..t_len).collect();
        let tables = self.rope_sets(&positions);
        let ids = indices(tokens.iter().map(|&t| t as usize), &self.readout.device);
        let mut x = self.embed.clone().select(0, ids);
        if let Some(m) = self.embed_multiplier {
            x = x.mul_scalar(m);
        }
        let mut hidden = vec![x.clone()];
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for b in &self.blocks {
            let (cos, sin): (Tensor<3>, Tensor<3>) =
                (tables[b.rope].0.clone().unsqueeze(), tables[b.rope].1.clone().unsqueeze());
            let a = self.maybe_norm(x.clone(), &b.attn_norm);
            // (T, n·dh) → (n, T, dh).
            let split =
                |y: Tensor<2>, n| -> Tensor<3> { y.reshape([t_len, n, dh]).swap_dims(0, 1) };
            let q = self.heads(&a, &b.q, &b.q_norm, h, split, Some((&cos, &sin)));
            let k = self.heads(&a, &b.k, &b.k_norm, kv, split, Some((&cos, &sin)));
            let v = self.heads(&a, &b.v, &None, kv, split, None);
            let (k, v) = (self.repeat_kv::<3, 4>(k, 0), self.repeat_kv::<3, 4>(v, 0));
            let out = causal_attention(q, k.clone(), v.clone(), &b.attn)
                .swap_dims(0, 1)
                .reshape([t_len, h * dh]);
            x = self.residual(x, b.o.apply(out), b);
            keys.push(k);
            values.push(v);
            hidden.push(x.clone());
        }
        let final_norm = self.norm(x, &self.norm);
        CachedContext::for_layers(tokens, layers, &hidden, &keys, &values, &final_norm)
    }

    /// The upper half on rows `(P, R, d)`: `u = norm(x_L)`, or, with `stop`, the scores of that
    /// head inside its block ([`head_scores`], `(1, R, t + 1)`, `P = 1`).
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        hrows: Tensor<3>,
        stop: Option<AttentionHead>,
    ) -> Tensor<3> {
        let [p_n, r_n, _] = hrows.dims();
        let (h, kv, dh) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let rd = self.cfg.rotary_dim;
        let tables = self.rope_sets(positions);
        let masks = self.context_masks(positions);
        let mut x = hrows;
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let mask = &masks[usize::from(b.attn.window.is_some())];
            let (cos, sin): (Tensor<4>, Tensor<4>) = (
                tables[b.rope].0.clone().reshape([p_n, 1, 1, rd]),
                tables[b.rope].1.clone().reshape([p_n, 1, 1, rd]),
            );
            let a = self.maybe_norm(x.clone(), &b.attn_norm);
            // (P, R, n·dh) → (P, n, R, dh).
            let split =
                |y: Tensor<3>, n| -> Tensor<4> { y.reshape([p_n, r_n, n, dh]).swap_dims(1, 2) };
            let q = self.heads(&a, &b.q, &b.q_norm, h, split, Some((&cos, &sin)));
            let k = self.heads(&a, &b.k, &b.k_norm, kv, split, Some((&cos, &sin)));
            let v = self.heads(&a, &b.v, &None, kv, split, None);
            let (k, v) = (self.repeat_kv::<4, 5>(k, 1), self.repeat_kv::<4, 5>(v, 1));
            if let Some(stop) = stop.filter(|s| s.layer == ctx.layer + idx) {
                return head_scores(q, k, &ctx.keys[idx], positions[0], stop.head, &b.attn);
            }
            let out =
                attend_cached(q, k, v, &ctx.keys[idx], &ctx.values[idx], mask.as_ref(), &b.attn);
            let out = out.swap_dims(1, 2).reshape([p_n, r_n, h * dh]);
            x = self.residual(x, b.o.apply(out), b);
        }
        self.norm(x, &self.norm)
    }
}

impl CachedUpper for Decoder {
    fn readout(&self) -> &Readout {
        &self.readout
    }
    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<CachedContext> {
        Decoder::forward_sequence(self, tokens, layers)
    }
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: Tensor<3>,
        stop: Option<AttentionHead>,
    ) -> Tensor<3> {
        Decoder::run_upper(self, ctx, positions, h, stop)
    }
    fn attention_layout(&self, layer: usize) -> (usize, Option<usize>) {
        let window = self.blocks.get(layer).and_then(|b| b.attn.window);
        (self.cfg.num_attention_heads, window)
    }
}

crate::cached::impl_split_model!(Decoder);
