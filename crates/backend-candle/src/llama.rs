//! The Llama family (Llama, Mistral, Qwen2, SmolLM; HF `LlamaForCausalLM` semantics) as a
//! [`SplitModel`](fs_traits::SplitModel) on candle: RMSNorm, RoPE with `rotate_half` (θ and
//! Llama-3 scaling from the config), grouped-query attention, SwiGLU, tied or untied `lm_head`,
//! optional q/k/v(/o) biases.
//!
//! Split layer `k`: `0` = token embedding, `i` = output of block `i − 1`, `n_layer` = last
//! block's output before the final RMSNorm. The context cache stores keys after RoPE, with the
//! key/value heads repeated to the query heads; a row analysed at position `t` is rotated by
//! angle `t` (never 0, unlike the original script's KV-cache extension).

use crate::cached::{attend_cached, causal_attention, context_mask, CachedContext, CachedUpper};
use crate::jvp::{attend_cached_jvp, Dual};
use crate::ops::linear;
use crate::Error;
use candle_core::{Device, Tensor, D};
use fs_checkpoint::{LlamaConfig, ModelFiles, WeightStore};
use fs_traits::{check_finite, ModelDims};

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

/// A Llama-family model on candle.
pub struct Llama {
    cfg: LlamaConfig,
    device: Device,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    lm_head_host: Vec<f32>,
    inv_freq: Vec<f64>,
    activation_budget: usize,
}

/// Host tensors of a checkpoint in HF layout (`[out, in]` matrices), by HF name.
pub(crate) type HostWeights<'a> = dyn FnMut(&str, &[usize]) -> Result<Option<Vec<f32>>, Error> + 'a;

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
    /// the config is named.
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
    /// `model.norm.weight`, optional `lm_head.weight`).
    pub(crate) fn from_hf_weights(
        cfg: LlamaConfig,
        get: &mut HostWeights<'_>,
        device: &Device,
        files: &[std::path::PathBuf],
    ) -> Result<Self, Error> {
        let (d, v, inner) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (q_out, kv_out) =
            (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
        let files = files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        // A required tensor, finite.
        let mut fetch = |name: &str, shape: &[usize]| -> Result<Vec<f32>, Error> {
            let data =
                get(name, shape)?.ok_or_else(|| fs_checkpoint::CheckpointError::MissingTensor {
                    name: name.to_string(),
                    files: files.clone(),
                })?;
            check_finite(&format!("weight {name}"), &data)?;
            Ok(data)
        };
        let embed_data = fetch("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            // HF stores linear weights [out, in]; keep them [in, out].
            let mut lw = |name: &str, out: usize, inp: usize| -> Result<Tensor, Error> {
                let w = fetch(name, &[out, inp])?;
                Ok(Tensor::from_vec(transpose(&w, out, inp), (inp, out), device)?)
            };
            let q_w = lw(&p("self_attn.q_proj.weight"), q_out, d)?;
            let k_w = lw(&p("self_attn.k_proj.weight"), kv_out, d)?;
            let v_w = lw(&p("self_attn.v_proj.weight"), kv_out, d)?;
            let o_w = lw(&p("self_attn.o_proj.weight"), d, q_out)?;
            let gate_w = lw(&p("mlp.gate_proj.weight"), inner, d)?;
            let up_w = lw(&p("mlp.up_proj.weight"), inner, d)?;
            let down_w = lw(&p("mlp.down_proj.weight"), d, inner)?;
            let mut vector =
                |name: String, n: usize, wanted: bool| -> Result<Option<Tensor>, Error> {
                    if !wanted {
                        return Ok(None);
                    }
                    Ok(Some(Tensor::from_vec(fetch(&name, &[n])?, n, device)?))
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
                up_w,
                down_w,
                gate_b: vector(p("mlp.gate_proj.bias"), inner, cfg.mlp_bias)?,
                up_b: vector(p("mlp.up_proj.bias"), inner, cfg.mlp_bias)?,
                down_b: vector(p("mlp.down_proj.bias"), d, cfg.mlp_bias)?,
            });
        }
        let norm_data = fetch("model.norm.weight", &[d])?;
        let untied =
            if cfg.tie_word_embeddings { None } else { Some(fetch("lm_head.weight", &[v, d])?) };
        let embed = Tensor::from_slice(&embed_data, (v, d), device)?;
        let (lm_head, lm_head_host) = match untied {
            Some(data) => (Tensor::from_slice(&data, (v, d), device)?, data),
            None => (embed.clone(), embed_data),
        };
        Ok(Llama {
            inv_freq: cfg.inv_freq(),
            norm: Tensor::from_vec(norm_data, d, device)?,
            cfg,
            device: device.clone(),
            embed,
            blocks,
            lm_head,
            lm_head_host,
            activation_budget: crate::cached::DEFAULT_ACTIVATION_BUDGET,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Bytes of tangents one readout-Jacobian forward-mode pass may keep alive.
    pub fn set_activation_budget(&mut self, bytes: usize) {
        self.activation_budget = bytes.max(1);
    }

    /// Force `positions` positions per readout-Jacobian pass (all `d` directions each).
    pub fn set_position_batch(&mut self, positions: usize) {
        let per_position = CachedUpper::bytes_per_row_per_block(self) * self.cfg.hidden_size;
        self.activation_budget = per_position.saturating_mul(positions.max(1));
    }

    /// Number of parameters (`lm_head` counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let mut n = self.embed.elem_count() + self.norm.elem_count();
        for b in &self.blocks {
            for t in [
                &b.attn_norm,
                &b.q_w,
                &b.k_w,
                &b.v_w,
                &b.o_w,
                &b.mlp_norm,
                &b.gate_w,
                &b.up_w,
                &b.down_w,
            ] {
                n += t.elem_count();
            }
            for t in [&b.q_b, &b.k_b, &b.v_b, &b.o_b, &b.gate_b, &b.up_b, &b.down_b]
                .into_iter()
                .flatten()
            {
                n += t.elem_count();
            }
        }
        if !self.cfg.tie_word_embeddings {
            n += self.lm_head.elem_count();
        }
        n
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
            Tensor::from_vec(cos, shape, &self.device)?,
            Tensor::from_vec(sin, shape, &self.device)?,
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
        let mut x = self.embed.index_select(&Tensor::new(tokens, &self.device)?, 0)?;
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
        let mask = context_mask(positions, &self.device)?;
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

    /// [`Llama::upper`] differentiated forward ([`crate::jvp`]): primal rows `(P, 1, d)` and
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
        let mask = context_mask(positions, &self.device)?;
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
    fn lm_head(&self) -> &Tensor {
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
    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<CachedContext>> {
        Llama::forward_sequence(self, tokens, layers)
    }
    fn upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: &Tensor,
    ) -> candle_core::Result<Tensor> {
        Llama::upper(self, ctx, positions, h)
    }
    fn upper_jvp(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: Dual,
    ) -> candle_core::Result<Dual> {
        Llama::upper_jvp(self, ctx, positions, h)
    }
}

crate::cached::impl_split_model!(Llama);
