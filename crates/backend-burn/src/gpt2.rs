//! GPT-2 (HF `GPT2LMHeadModel` semantics) as a [`SplitModel`](fs_traits::SplitModel) on burn.
//!
//! * Conv1D weights are stored `[in, out]` and applied as `x · W + b`;
//! * `gelu_new` (tanh approximation) built from elementary ops ([`crate::ops::gelu_new`]);
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
    attend_cached, causal_attention, context_mask, head_scores, indices, Attention, CachedContext,
    CachedUpper, Readout, Upload,
};
use crate::ops::{gelu_new, layer_norm, linear};
use crate::Error;
use burn::tensor::{Device, Tensor};
use fs_checkpoint::{Gpt2Config, Gpt2Weights, LayerNorm, Linear};
use fs_traits::AttentionHead;

/// A LayerNorm's parameters.
struct Norm {
    weight: Tensor<1>,
    bias: Tensor<1>,
}

/// One transformer block's parameters (Conv1D weights `[in, out]`).
struct Block {
    ln_1: Norm,
    attn_w: Tensor<2>,
    attn_b: Tensor<1>,
    proj_w: Tensor<2>,
    proj_b: Tensor<1>,
    ln_2: Norm,
    fc_w: Tensor<2>,
    fc_b: Tensor<1>,
    out_w: Tensor<2>,
    out_b: Tensor<1>,
}

/// GPT-2 on burn.
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor<2>,
    wpe: Tensor<2>,
    blocks: Vec<Block>,
    ln_f: Norm,
    /// Plain device, dimensions, `W_U` (`wte` when tied), pass budget.
    readout: Readout,
}

/// The result of [`Gpt2`]'s lower pass.
pub type Gpt2Context = CachedContext;

impl Gpt2 {
    /// Upload typed host weights ([`Gpt2Weights`], read by `fs-checkpoint` from safetensors,
    /// GGUF or random values) to the plain (non-autodiff) view of `device`. `W_U` stays on the
    /// host too, for the estimators' weighted Gram.
    pub fn new(weights: Gpt2Weights, device: &Device) -> Result<Self, Error> {
        let Gpt2Weights { config: cfg, wte, wpe, blocks, ln_f, lm_head } = weights;
        let (wte, readout) = Readout::with_embedding(
            device,
            cfg.dims(),
            wte,
            lm_head,
            bytes_per_row_per_block(&cfg),
        );
        let up = Upload(&readout.device);
        let norm = |n: LayerNorm| Norm { weight: up.vector(n.weight), bias: up.vector(n.bias) };
        let linear = |l: Linear| (up.matrix(l.weight), up.vector(l.bias.unwrap_or_default()));
        let blocks = blocks
            .into_iter()
            .map(|b| {
                let (attn_w, attn_b) = linear(b.attn_qkv);
                let (proj_w, proj_b) = linear(b.attn_out);
                let (fc_w, fc_b) = linear(b.mlp_in);
                let (out_w, out_b) = linear(b.mlp_out);
                Block {
                    ln_1: norm(b.ln_1),
                    attn_w,
                    attn_b,
                    proj_w,
                    proj_b,
                    ln_2: norm(b.ln_2),
                    fc_w,
                    fc_b,
                    out_w,
                    out_b,
                }
            })
            .collect();
        let (wpe, ln_f) = (up.matrix(wpe), norm(ln_f));
        readout.sync()?;
        Ok(Gpt2 { cfg, wte, wpe, blocks, ln_f, readout })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    fn heads(&self) -> (usize, usize) {
        (self.cfg.n_head, self.cfg.n_embd / self.cfg.n_head)
    }

    fn norm<const D: usize>(&self, x: Tensor<D>, n: &Norm) -> Tensor<D> {
        layer_norm(x, &n.weight, &n.bias, self.cfg.layer_norm_epsilon)
    }

    /// `c_proj(gelu_new(c_fc(ln_2(x))))`.
    fn mlp<const D: usize>(&self, x: Tensor<D>, b: &Block) -> Tensor<D> {
        let a = self.norm(x, &b.ln_2);
        let hidden = gelu_new(linear(a, &b.fc_w, Some(&b.fc_b)));
        linear(hidden, &b.out_w, Some(&b.out_b))
    }

    /// The full causal forward pass over a sequence, keeping what the upper half needs at each
    /// of `layers` (one context per layer, in the order given; they share the cached tensors).
    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<Gpt2Context> {
        let t_len = tokens.len();
        let (heads, dh) = self.heads();
        let d = self.cfg.n_embd;
        let ids = indices(tokens.iter().map(|&t| t as usize), &self.readout.device);
        let mut x = self.wte.clone().select(0, ids).add(self.wpe.clone().narrow(0, 0, t_len));
        // hidden[k] for every k; keys/values of every block.
        let mut hidden = vec![x.clone()];
        let scale = 1.0 / (dh as f64).sqrt();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for b in &self.blocks {
            let a = self.norm(x.clone(), &b.ln_1);
            let qkv = linear(a, &b.attn_w, Some(&b.attn_b));
            let split = |j: usize| -> Tensor<3> {
                qkv.clone().narrow(1, j * d, d).reshape([t_len, heads, dh]).swap_dims(0, 1)
            };
            let (q, k, v) = (split(0), split(1), split(2));
            let out = causal_attention(q, k.clone(), v.clone(), &Attention::plain(scale));
            let out = out.swap_dims(0, 1).reshape([t_len, d]);
            x = x.add(linear(out, &b.proj_w, Some(&b.proj_b)));
            x = x.clone().add(self.mlp(x, b));
            keys.push(k);
            values.push(v);
            hidden.push(x.clone());
        }
        let final_norm = self.norm(x, &self.ln_f);
        CachedContext::for_layers(tokens, layers, &hidden, &keys, &values, &final_norm)
    }

    /// The upper half on a batch of rows: `h` is `(P, R, d)`, row `(p, r)` sits at position
    /// `positions[p]` and attends to the cached keys/values of positions `< positions[p]` and to
    /// itself. Returns `u = ln_f(x_L)`, `(P, R, d)` — or, with `stop`, the scores of that head
    /// inside its block ([`head_scores`], `(1, R, t + 1)`, `P = 1`).
    fn run_upper(
        &self,
        ctx: &Gpt2Context,
        positions: &[usize],
        h: Tensor<3>,
        stop: Option<AttentionHead>,
    ) -> Tensor<3> {
        let [p_n, r_n, d] = h.dims();
        let (heads, dh) = self.heads();
        let scale = 1.0 / (dh as f64).sqrt();
        let mask = context_mask(positions, None, &self.readout.device);
        let mut x = h;
        for (idx, b) in self.blocks[ctx.layer..].iter().enumerate() {
            let a = self.norm(x.clone(), &b.ln_1);
            let qkv = linear(a, &b.attn_w, Some(&b.attn_b));
            let split = |j: usize| -> Tensor<4> {
                qkv.clone().narrow(2, j * d, d).reshape([p_n, r_n, heads, dh]).swap_dims(1, 2)
            };
            let (q, k_self, v_self) = (split(0), split(1), split(2));
            if let Some(stop) = stop.filter(|s| s.layer == ctx.layer + idx) {
                let attn = Attention::plain(scale);
                return head_scores(q, k_self, &ctx.keys[idx], positions[0], stop.head, &attn);
            }
            let out = attend_cached(
                q,
                k_self,
                v_self,
                &ctx.keys[idx],
                &ctx.values[idx],
                mask.as_ref(),
                &Attention::plain(scale),
            );
            let out = out.swap_dims(1, 2).reshape([p_n, r_n, d]);
            x = x.add(linear(out, &b.proj_w, Some(&b.proj_b)));
            x = x.clone().add(self.mlp(x, b));
        }
        self.norm(x, &self.ln_f)
    }
}

/// Approximate bytes the autodiff graph keeps per replicated row per block (f32): LayerNorm
/// intermediates, q/k/v, attention and MLP activations.
fn bytes_per_row_per_block(cfg: &Gpt2Config) -> usize {
    4 * (16 * cfg.n_embd + 3 * cfg.inner_dim())
}

impl CachedUpper for Gpt2 {
    fn readout(&self) -> &Readout {
        &self.readout
    }
    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<CachedContext> {
        Gpt2::forward_sequence(self, tokens, layers)
    }
    fn run_upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: Tensor<3>,
        stop: Option<AttentionHead>,
    ) -> Tensor<3> {
        Gpt2::run_upper(self, ctx, positions, h, stop)
    }
    fn attention_layout(&self, _layer: usize) -> (usize, Option<usize>) {
        (self.heads().0, None)
    }
}

crate::cached::impl_split_model!(Gpt2);
