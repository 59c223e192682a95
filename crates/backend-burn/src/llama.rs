//! The Llama family (Llama, Mistral, Qwen2, SmolLM; HF `LlamaForCausalLM` semantics) as a
//! [`SplitModel`](fs_traits::SplitModel) on burn: RMSNorm, RoPE with `rotate_half` (θ and
//! Llama-3 scaling from the config, [`LlamaConfig::inv_freq`]), grouped-query attention, SwiGLU,
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
};
use crate::ops::{linear, rms_norm, silu};
use crate::Error;
use burn::tensor::{Device, Tensor};
use fs_checkpoint::{LlamaConfig, ModelFiles, WeightStore};
use fs_traits::{check_finite, ModelDims};

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

/// A Llama-family model on burn.
pub struct Llama {
    cfg: LlamaConfig,
    /// The plain (non-autodiff) device holding the weights.
    device: Device,
    embed: Tensor<2>,
    blocks: Vec<Block>,
    norm: Tensor<1>,
    lm_head: Tensor<2>,
    lm_head_host: Vec<f32>,
    inv_freq: Vec<f64>,
    activation_budget: usize,
    parameters: usize,
}

/// Host tensors of a checkpoint in HF layout (`[out, in]` matrices), by HF name: `None` when
/// the source does not hold the tensor.
type HostWeights<'a> = dyn FnMut(&str, &[usize]) -> Result<Option<Vec<f32>>, Error> + 'a;

/// Transpose a row-major `rows × cols` buffer.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

impl Llama {
    /// Load from a resolved HF checkpoint (`config.json` + safetensors). Matrices are stored
    /// `[out, in]` and transposed once on load; a missing tensor or a shape that does not match
    /// the config is named, and weights with NaN or ±∞ are rejected ([`Error::Model`]).
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self, Error> {
        let cfg = LlamaConfig::from_file(&files.config)?;
        let store = WeightStore::open(&files.weights)?;
        let mut get = |name: &str, shape: &[usize]| -> Result<Option<Vec<f32>>, Error> {
            if !store.contains(name) {
                return Ok(None);
            }
            Ok(Some(store.read_f32_shaped(name, shape)?.data))
        };
        Self::from_hf_weights(cfg, &mut get, device, &files.weights)
    }

    /// A model with the deterministic random weights of [`fs_checkpoint::random_llama_weights`]
    /// (for benchmarks and property tests): the same model every backend builds from the same
    /// `(cfg, std, seed)`.
    pub fn random(cfg: LlamaConfig, std: f64, seed: u64, device: &Device) -> Result<Self, Error> {
        let mut weights: std::collections::HashMap<String, Vec<f32>> =
            fs_checkpoint::random_llama_weights(&cfg, std, seed)
                .into_iter()
                .map(|(name, _, data)| (name, data))
                .collect();
        let mut get = |name: &str, _: &[usize]| -> Result<Option<Vec<f32>>, Error> {
            Ok(weights.remove(name))
        };
        Self::from_hf_weights(cfg, &mut get, device, &[])
    }

    /// Build from HF-named host tensors (`model.embed_tokens.weight`, `model.layers.{i}.…`,
    /// `model.norm.weight`, optional `lm_head.weight`); `get` returns `None` for a tensor the
    /// source does not hold, which is named together with `files` in the error.
    fn from_hf_weights(
        cfg: LlamaConfig,
        get: &mut HostWeights<'_>,
        device: &Device,
        files: &[std::path::PathBuf],
    ) -> Result<Self, Error> {
        let file_list =
            files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        let device = device.clone().without_autodiff();
        let (d, v, inner) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (q_out, kv_out) =
            (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
        let mut parameters = 0;
        // A required tensor, finite.
        let mut fetch = |name: &str, shape: &[usize]| -> Result<Vec<f32>, Error> {
            let data =
                get(name, shape)?.ok_or_else(|| fs_checkpoint::CheckpointError::MissingTensor {
                    name: name.to_string(),
                    files: file_list.clone(),
                })?;
            check_finite(&format!("weight {name}"), &data)?;
            parameters += data.len();
            Ok(data)
        };
        let embed_data = fetch("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            // HF stores linear weights [out, in]; keep them [in, out].
            let mut lw = |name: &str, out: usize, inp: usize| -> Result<Tensor<2>, Error> {
                let w = fetch(name, &[out, inp])?;
                Ok(tensor(transpose(&w, out, inp), [inp, out], &device))
            };
            let q_w = lw(&p("self_attn.q_proj.weight"), q_out, d)?;
            let k_w = lw(&p("self_attn.k_proj.weight"), kv_out, d)?;
            let v_w = lw(&p("self_attn.v_proj.weight"), kv_out, d)?;
            let o_w = lw(&p("self_attn.o_proj.weight"), d, q_out)?;
            let gate_w = lw(&p("mlp.gate_proj.weight"), inner, d)?;
            let up_w = lw(&p("mlp.up_proj.weight"), inner, d)?;
            let down_w = lw(&p("mlp.down_proj.weight"), d, inner)?;
            let mut vector =
                |name: String, n: usize, wanted: bool| -> Result<Option<Tensor<1>>, Error> {
                    if !wanted {
                        return Ok(None);
                    }
                    Ok(Some(tensor(fetch(&name, &[n])?, [n], &device)))
                };
            blocks.push(Block {
                attn_norm: vector(p("input_layernorm.weight"), d, true)?.expect("wanted"),
                q_w,
                q_b: vector(p("self_attn.q_proj.bias"), q_out, cfg.qkv_bias)?,
                k_w,
                k_b: vector(p("self_attn.k_proj.bias"), kv_out, cfg.qkv_bias)?,
                v_w,
                v_b: vector(p("self_attn.v_proj.bias"), kv_out, cfg.qkv_bias)?,
                o_w,
                o_b: vector(p("self_attn.o_proj.bias"), d, cfg.o_bias)?,
                mlp_norm: vector(p("post_attention_layernorm.weight"), d, true)?.expect("wanted"),
                gate_w,
                gate_b: vector(p("mlp.gate_proj.bias"), inner, cfg.mlp_bias)?,
                up_w,
                up_b: vector(p("mlp.up_proj.bias"), inner, cfg.mlp_bias)?,
                down_w,
                down_b: vector(p("mlp.down_proj.bias"), d, cfg.mlp_bias)?,
            });
        }
        let norm_data = fetch("model.norm.weight", &[d])?;
        let untied =
            if cfg.tie_word_embeddings { None } else { Some(fetch("lm_head.weight", &[v, d])?) };
        let embed = tensor(embed_data.clone(), [v, d], &device);
        let (lm_head, lm_head_host) = match untied {
            Some(data) => (tensor(data.clone(), [v, d], &device), data),
            None => (embed.clone(), embed_data),
        };
        device.sync().map_err(|e| Error::Burn(crate::one_line(&e)))?;
        Ok(Llama {
            inv_freq: cfg.inv_freq(),
            norm: tensor(norm_data, [d], &device),
            cfg,
            device,
            embed,
            blocks,
            lm_head,
            lm_head_host,
            activation_budget: crate::cached::DEFAULT_ACTIVATION_BUDGET,
            parameters,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device the model runs on (without autodiff; the gradient passes use its autodiff
    /// view).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of activations one readout-Jacobian backward pass may keep alive (default 512 MiB).
    pub fn set_activation_budget(&mut self, bytes: usize) {
        self.activation_budget = bytes.max(1);
    }

    /// Force `positions` positions per readout-Jacobian backward pass (all `d` rows each).
    pub fn set_position_batch(&mut self, positions: usize) {
        let per_position = CachedUpper::bytes_per_row_per_block(self)
            * self.cfg.num_hidden_layers.max(1)
            * self.cfg.hidden_size;
        self.activation_budget = per_position.saturating_mul(positions.max(1));
    }

    /// Number of parameters (`lm_head` counted once when tied).
    pub fn parameter_count(&self) -> usize {
        self.parameters
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
        (tensor(cos, shape, &self.device), tensor(sin, shape, &self.device))
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
        let ids = indices(tokens.iter().map(|&t| t as usize), &self.device);
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
        let mask = context_mask(positions, &self.device);
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

impl CachedUpper for Llama {
    fn device(&self) -> &Device {
        &self.device
    }
    fn model_dims(&self) -> ModelDims {
        ModelDims {
            d_model: self.cfg.hidden_size,
            readout_dim: self.cfg.hidden_size,
            vocab_size: self.cfg.vocab_size,
            n_layers: self.cfg.num_hidden_layers,
            max_seq_len: Some(self.cfg.max_position_embeddings),
        }
    }
    fn lm_head(&self) -> &Tensor<2> {
        &self.lm_head
    }
    fn lm_head_host(&self) -> &[f32] {
        &self.lm_head_host
    }
    fn activation_budget(&self) -> usize {
        self.activation_budget
    }
    fn bytes_per_row_per_block(&self) -> usize {
        4 * (16 * self.cfg.hidden_size + 5 * self.cfg.intermediate_size)
    }
    fn forward_sequence(&self, tokens: &[u32], layers: &[usize]) -> Vec<CachedContext> {
        Llama::forward_sequence(self, tokens, layers)
    }
    fn upper(&self, ctx: &CachedContext, positions: &[usize], h: Tensor<3>) -> Tensor<3> {
        Llama::upper(self, ctx, positions, h)
    }
}

crate::cached::impl_split_model!(Llama);
