//! GPT-2 (HF `GPT2LMHeadModel` semantics) as a [`SplitModel`](fs_traits::SplitModel) on candle.
//!
//! * Conv1D weights are stored `[in, out]` and applied as `x · W + b`;
//! * `gelu_new` (tanh approximation) built from elementary ops;
//! * LayerNorm with `layer_norm_epsilon` from the config;
//! * learned absolute positions; `lm_head` tied to `wte` (an untied `lm_head.weight` is used when
//!   the config says `tie_word_embeddings: false` and the checkpoint carries one);
//! * attention scale `1/√d_head`, causal.
//!
//! Split layer `k ∈ 0..=n_layer`: `k = 0` is the embedding output `wte[x] + wpe[t]`, `k = i` the
//! output of block `i − 1`, `k = n_layer` the last block's output before `ln_f`.
//!
//! The lower pass runs the whole sequence once and keeps, for every block `≥ k`, the keys and
//! values of every position. The upper half at position `t` then runs on single rows `h`: each
//! row attends to the cached keys/values of positions `< t` and to its own key/value (computed
//! from `h`), so a batch of `R` copies of `h` costs `R` single-token passes, not `R` full
//! sequences. The readout Jacobian `A = ∂u/∂h` (`u = ln_f` output) takes `d` copies and one
//! backward pass of `Σ_i ⟨e_i, u_i⟩`; score gradients take `S` copies and one backward pass of
//! `Σ_s ⟨w_{y_s} − m, u_s⟩`, `m = W_Uᵀp` (the gradient of `log p_y` with respect to `u`).

use crate::cached::{
    attend_cached, causal_attention, context_mask, head_scores, Attention, CachedContext,
    CachedUpper, Readout, Table, Upload,
};
use crate::jvp::{attend_cached_jvp, Dual};
use crate::ops::{gelu_new, layer_norm, linear, Weight};
use crate::{Error, Float};
use candle_core::{Device, Tensor};
use fs_checkpoint::{Gpt2Config, Gpt2Weights, HostMatrix, LayerNorm, Linear, StoredMatrix};
use fs_traits::AttentionHead;
use std::marker::PhantomData;

/// A LayerNorm's parameters.
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

/// One transformer block's parameters (Conv1D weights `[in, out]`).
struct Block {
    ln_1: Norm,
    attn_w: Weight,
    attn_b: Tensor,
    proj_w: Weight,
    proj_b: Tensor,
    ln_2: Norm,
    fc_w: Weight,
    fc_b: Tensor,
    out_w: Weight,
    out_b: Tensor,
}

/// GPT-2 on candle, computing in `S` (f32; f64 as a reference, [`Float`]).
pub struct Gpt2<S: Float = f32> {
    cfg: Gpt2Config,
    wte: Table,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    /// Device, dimensions, `W_U` (`wte` when tied), pass budget, dtype.
    readout: Readout,
    scalar: PhantomData<S>,
}

/// The result of [`Gpt2`]'s lower pass.
pub type Gpt2Context = CachedContext;

impl Gpt2 {
    /// Upload typed host weights ([`Gpt2Weights`], f32, read by `fs-checkpoint` from safetensors
    /// or random values) to `device`, computing in f32.
    pub fn new(weights: Gpt2Weights, device: &Device) -> Result<Self, Error> {
        Self::with_scalar(weights, device)
    }
}

impl<S: Float> Gpt2<S> {
    /// [`Gpt2::new`] computing in `S` (`Gpt2::<f64>::with_scalar`: the f64 reference model).
    pub fn with_scalar(weights: Gpt2Weights, device: &Device) -> Result<Self, Error> {
        let Gpt2Weights { config: cfg, wte, wpe, blocks, ln_f, lm_head } = weights;
        let up = Upload(device, S::DTYPE);
        let norm = |n: LayerNorm| -> candle_core::Result<Norm> {
            Ok(Norm { weight: up.vector(n.weight)?, bias: up.vector(n.bias)? })
        };
        let linear = |l: Linear| -> candle_core::Result<(Weight, Tensor)> {
            Ok((Weight::Dense(up.matrix(l.weight)?), up.vector(l.bias.unwrap_or_default())?))
        };
        let stored = |m: HostMatrix| StoredMatrix::from_f32(m.rows, m.cols, m.data);
        let (wte, readout) = Readout::with_embedding(
            &up,
            cfg.dims(),
            stored(wte),
            lm_head.map(stored),
            bytes_per_row_per_block(&cfg),
        )?;
        let blocks = blocks
            .into_iter()
            .map(|b| {
                let (attn_w, attn_b) = linear(b.attn_qkv)?;
                let (proj_w, proj_b) = linear(b.attn_out)?;
                let (fc_w, fc_b) = linear(b.mlp_in)?;
                let (out_w, out_b) = linear(b.mlp_out)?;
                Ok(Block {
                    ln_1: norm(b.ln_1)?,
                    attn_w,
                    attn_b,
                    proj_w,
                    proj_b,
                    ln_2: norm(b.ln_2)?,
                    fc_w,
                    fc_b,
                    out_w,
                    out_b,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Gpt2 {
            wte,
            wpe: up.matrix(wpe)?,
            blocks,
            ln_f: norm(ln_f)?,
            readout,
            cfg,
            scalar: PhantomData,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    fn heads(&self) -> (usize, usize) {
        (self.cfg.n_head, self.cfg.n_embd / self.cfg.n_head)
    }

    fn norm(&self, x: &Tensor, n: &Norm) -> candle_core::Result<Tensor> {
        layer_norm(x, &n.weight, &n.bias, self.cfg.layer_norm_epsilon)
    }

    fn mlp(&self, x: &Tensor, b: &Block) -> candle_core::Result<Tensor> {
        let a = self.norm(x, &b.ln_2)?;
        let hidden = gelu_new(&linear(&a, &b.fc_w, Some(&b.fc_b))?)?;
        linear(&hidden, &b.out_w, Some(&b.out_b))
    }

    /// The full causal forward pass over a sequence, keeping what the upper half needs at each
    /// of `layers` (one context per layer, in the order given; they share the cached tensors).
    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<Gpt2Context>> {
        let t_len = tokens.len();
        let (heads, dh) = self.heads();
        let d = self.cfg.n_embd;
        let mut x =
            self.wte.rows(tokens, &self.readout.device)?.add(&self.wpe.narrow(0, 0, t_len)?)?;
        // hidden[k] for every k; keys/values of every block.
        let mut hidden = vec![x.clone()];
        let scale = 1.0 / (dh as f64).sqrt();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for b in &self.blocks {
            let a = self.norm(&x, &b.ln_1)?;
            let qkv = linear(&a, &b.attn_w, Some(&b.attn_b))?;
            let split = |j: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(1, j * d, d)?.reshape((t_len, heads, dh))?.transpose(0, 1)?.contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let out = causal_attention(&q, &k, &v, &Attention::plain(scale))?;
            let out = out.transpose(0, 1)?.reshape((t_len, d))?;
            x = (x + linear(&out, &b.proj_w, Some(&b.proj_b))?)?;
            x = (&x + self.mlp(&x, b)?)?;
            keys.push(k);
            values.push(v);
            hidden.push(x.clone());
        }
        let final_norm = self.norm(&x, &self.ln_f)?;
        Ok(CachedContext::for_layers(tokens, layers, &hidden, &keys, &values, &final_norm))
    }

    /// The upper half on a batch of rows: `h` is `(P, R, d)`, row `(p, r)` sits at position
    /// `positions[p]` and attends to the cached keys/values of positions `< positions[p]` and to
    /// itself. Returns `u = ln_f(x_L)`, `(P, R, d)` — or, with `stop`, the scores of that head
    /// inside its block ([`head_scores`], `P = 1`).
    fn run_upper(
        &self,
        ctx: &Gpt2Context,
        positions: &[usize],
        h: &Tensor,
        stop: Option<AttentionHead>,
    ) -> candle_core::Result<Tensor> {
        let (p_n, r_n, d) = h.dims3()?;
        let (heads, dh) = self.heads();
        let scale = 1.0 / (dh as f64).sqrt();
        let mask = context_mask(positions, None, &self.readout)?;
        let mut x = h.clone();
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let a = self.norm(&x, &b.ln_1)?;
            let qkv = linear(&a, &b.attn_w, Some(&b.attn_b))?;
            let split = |j: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, j * d, d)?
                    .reshape((p_n, r_n, heads, dh))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k_self, v_self) = (split(0)?, split(1)?, split(2)?);
            if let Some(stop) = stop.filter(|s| s.layer == ctx.layer + idx) {
                let attn = Attention::plain(scale);
                return head_scores(&q, &k_self, &ctx.keys[idx], positions[0], stop.head, &attn);
            }
            let out = attend_cached(
                &q,
                &k_self,
                &v_self,
                &ctx.keys[idx],
                &ctx.values[idx],
                mask.as_ref(),
                &Attention::plain(scale),
            )?;
            let out = out.transpose(1, 2)?.reshape((p_n, r_n, d))?;
            x = (x + linear(&out, &b.proj_w, Some(&b.proj_b))?)?;
            x = (&x + self.mlp(&x, b)?)?;
        }
        self.norm(&x, &self.ln_f)
    }

    /// [`Gpt2::run_upper`] differentiated forward ([`crate::jvp`]): `h` holds the primal rows
    /// `(P, 1, d)` and tangents `(P, R, d)`; returns `u = ln_f(x_L)` and `u̇`.
    fn upper_jvp(
        &self,
        ctx: &Gpt2Context,
        positions: &[usize],
        h: Dual,
    ) -> candle_core::Result<Dual> {
        let (heads, dh) = self.heads();
        let (p_n, d) = (positions.len(), self.cfg.n_embd);
        let scale = 1.0 / (dh as f64).sqrt();
        let mask = context_mask(positions, None, &self.readout)?;
        let eps = self.cfg.layer_norm_epsilon;
        let mut x = h;
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let qkv = x
                .layer_norm(&b.ln_1.weight, &b.ln_1.bias, eps)?
                .linear(&b.attn_w, Some(&b.attn_b))?;
            let split = |j: usize| {
                qkv.map(|t, r| {
                    t.narrow(2, j * d, d)?
                        .reshape((p_n, r, heads, dh))?
                        .transpose(1, 2)?
                        .contiguous()
                })
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let out = attend_cached_jvp(
                &q,
                &k,
                &v,
                &ctx.keys[idx],
                &ctx.values[idx],
                mask.as_ref(),
                &Attention::plain(scale),
            )?;
            let out = out.map(|t, r| t.transpose(1, 2)?.reshape((p_n, r, d)))?;
            x = x.add(&out.linear(&b.proj_w, Some(&b.proj_b))?)?;
            let mlp = x
                .layer_norm(&b.ln_2.weight, &b.ln_2.bias, eps)?
                .linear(&b.fc_w, Some(&b.fc_b))?
                .gelu_new()?
                .linear(&b.out_w, Some(&b.out_b))?;
            x = x.add(&mlp)?;
        }
        x.layer_norm(&self.ln_f.weight, &self.ln_f.bias, eps)
    }
}

/// Approximate bytes a forward-mode pass keeps alive per tangent row (f32): the residual, norm,
/// q/k/v and attention tangents and the two MLP-wide tangents of one block.
fn bytes_per_row_per_block(cfg: &Gpt2Config) -> usize {
    4 * (3 * cfg.inner_dim() + 12 * cfg.n_embd)
}

impl<S: Float> CachedUpper for Gpt2<S> {
    fn readout(&self) -> &Readout {
        &self.readout
    }
    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<CachedContext>> {
        Gpt2::forward_sequence(self, tokens, layers)
    }
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: &Tensor,
        stop: Option<AttentionHead>,
    ) -> candle_core::Result<Tensor> {
        Gpt2::run_upper(self, ctx, positions, h, stop)
    }
    fn attention_layout(&self, _layer: usize) -> (usize, Option<usize>) {
        (self.heads().0, None)
    }
    fn upper_jvp(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: Dual,
    ) -> candle_core::Result<Dual> {
        Gpt2::upper_jvp(self, ctx, positions, h)
    }
}

crate::cached::impl_split_model!(Gpt2);
