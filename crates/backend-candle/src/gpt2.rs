//! GPT-2 (HF `GPT2LMHeadModel` semantics) as a [`SplitModel`] on candle.
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

use crate::cached::{attend_cached, causal_attention, context_mask, CachedContext, CachedUpper};
use crate::jvp::{attend_cached_jvp, Dual};
use crate::ops::{gelu_new, layer_norm, linear};
use crate::Error;
use candle_core::{Device, Tensor};
use fs_checkpoint::{Gpt2Config, ModelFiles, WeightStore};
use fs_traits::{check_finite, ModelDims};

/// A LayerNorm's parameters.
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

/// One transformer block's parameters (Conv1D weights `[in, out]`).
struct Block {
    ln_1: Norm,
    attn_w: Tensor,
    attn_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    ln_2: Norm,
    fc_w: Tensor,
    fc_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
}

/// GPT-2 on candle.
pub struct Gpt2 {
    cfg: Gpt2Config,
    device: Device,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    /// `W_U` (`V × d`) on the device: `wte` when tied.
    lm_head: Tensor,
    /// `W_U` on the host, for the estimators' weighted Gram.
    lm_head_host: Vec<f32>,
    /// Whether `lm_head` is `wte`.
    tied: bool,
    /// Bytes of activations a readout-Jacobian backward pass may keep alive.
    activation_budget: usize,
}

/// The result of [`Gpt2`]'s lower pass.
pub type Gpt2Context = CachedContext;

/// Produces the `f32` data of a weight from its canonical name and expected shape.
type WeightSource<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<f32>, Error> + 'a;

/// Canonical (unprefixed) tensor names and shapes of the GPT-2 body, in load order (an untied
/// `lm_head` is read separately).
fn tensor_specs(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    cfg.tensor_specs().into_iter().filter(|(name, _)| name != "lm_head.weight").collect()
}

impl Gpt2 {
    /// Load from resolved checkpoint files (`config.json` + safetensors; see
    /// [`fs_checkpoint::resolve_model`]). Accepts `transformer.`-prefixed and unprefixed key
    /// names, ignores `attn.bias` / `attn.masked_bias` buffers, converts f16/bf16/f64 to f32, and
    /// names the tensor and file on a missing tensor or a shape that does not match the config.
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self, Error> {
        let cfg = Gpt2Config::from_file(&files.config)?;
        let store = WeightStore::open(&files.weights)?;
        let mut get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, Error> {
            let prefixed = format!("transformer.{name}");
            let key = store.find(&[&prefixed, name]).ok_or_else(|| {
                fs_checkpoint::CheckpointError::MissingTensor {
                    name: prefixed.clone(),
                    files: files
                        .weights
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?;
            Ok(store.read_f32_shaped(&key, shape)?.data)
        };
        let untied = if cfg.tie_word_embeddings {
            None
        } else {
            match store.find(&["lm_head.weight"]) {
                Some(key) => Some(store.read_f32_shaped(&key, &[cfg.vocab_size, cfg.n_embd])?.data),
                None => None,
            }
        };
        Self::from_weights(cfg, &mut get, untied, device)
    }

    /// A model with the deterministic random weights of [`fs_checkpoint::random_gpt2_weights`]
    /// (for benchmarks and property tests): the same model every backend builds from the same
    /// `(cfg, std, seed)`.
    pub fn random(cfg: Gpt2Config, std: f64, seed: u64, device: &Device) -> Result<Self, Error> {
        cfg.validate(std::path::Path::new("<random config>"))?;
        let mut weights: std::collections::HashMap<String, Vec<f32>> =
            fs_checkpoint::random_gpt2_weights(&cfg, std, seed)
                .into_iter()
                .map(|(name, _, data)| (name, data))
                .collect();
        let untied = weights.remove("lm_head.weight");
        let mut get = |name: &str, _: &[usize]| -> Result<Vec<f32>, Error> {
            Ok(weights.remove(name).expect("random weights cover every spec"))
        };
        Self::from_weights(cfg, &mut get, untied, device)
    }

    fn from_weights(
        cfg: Gpt2Config,
        get: &mut WeightSource<'_>,
        untied_lm_head: Option<Vec<f32>>,
        device: &Device,
    ) -> Result<Self, Error> {
        let mut load = |name: &str, shape: &[usize]| -> Result<(Vec<f32>, Tensor), Error> {
            let data = get(name, shape)?;
            check_finite(&format!("weight {name}"), &data)?;
            let t = Tensor::from_slice(&data, shape, device)?;
            Ok((data, t))
        };
        let specs = tensor_specs(&cfg);
        let mut tensors = std::collections::HashMap::new();
        let mut wte_host = Vec::new();
        for (name, shape) in &specs {
            let (data, t) = load(name, shape)?;
            if name == "wte.weight" {
                wte_host = data;
            }
            tensors.insert(name.clone(), t);
        }
        let mut take = |name: String| tensors.remove(&name).expect("every spec was loaded");
        let norm = |take: &mut dyn FnMut(String) -> Tensor, p: &str| Norm {
            weight: take(format!("{p}.weight")),
            bias: take(format!("{p}.bias")),
        };
        let wte = take("wte.weight".into());
        let wpe = take("wpe.weight".into());
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("h.{i}.{s}");
            blocks.push(Block {
                ln_1: norm(&mut take, &p("ln_1")),
                attn_w: take(p("attn.c_attn.weight")),
                attn_b: take(p("attn.c_attn.bias")),
                proj_w: take(p("attn.c_proj.weight")),
                proj_b: take(p("attn.c_proj.bias")),
                ln_2: norm(&mut take, &p("ln_2")),
                fc_w: take(p("mlp.c_fc.weight")),
                fc_b: take(p("mlp.c_fc.bias")),
                out_w: take(p("mlp.c_proj.weight")),
                out_b: take(p("mlp.c_proj.bias")),
            });
        }
        let ln_f = norm(&mut take, "ln_f");
        let tied = untied_lm_head.is_none();
        let (lm_head, lm_head_host) = match untied_lm_head {
            Some(data) => {
                check_finite("weight lm_head.weight", &data)?;
                (Tensor::from_slice(&data, (cfg.vocab_size, cfg.n_embd), device)?, data)
            }
            None => (wte.clone(), wte_host),
        };
        Ok(Gpt2 {
            activation_budget: crate::cached::DEFAULT_ACTIVATION_BUDGET,
            cfg,
            device: device.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            lm_head_host,
            tied,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Set the bytes of tangents one readout-Jacobian forward-mode pass may keep alive (default
    /// 512 MiB). More positions (or more of one position's `d` directions) per pass give larger
    /// GEMMs; fewer keep the peak memory down.
    pub fn set_activation_budget(&mut self, bytes: usize) {
        self.activation_budget = bytes.max(1);
    }

    /// Force `positions` positions per readout-Jacobian pass (all `d` directions each),
    /// whatever the activation budget.
    pub fn set_position_batch(&mut self, positions: usize) {
        let per_position = bytes_per_row_per_block(&self.cfg) * self.cfg.n_embd;
        self.activation_budget = per_position.saturating_mul(positions.max(1));
    }

    /// Number of parameters (`lm_head` counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let mut n = self.wte.elem_count() + self.wpe.elem_count();
        n += self.ln_f.weight.elem_count() + self.ln_f.bias.elem_count();
        for b in &self.blocks {
            for t in [
                &b.ln_1.weight,
                &b.ln_1.bias,
                &b.attn_w,
                &b.attn_b,
                &b.proj_w,
                &b.proj_b,
                &b.ln_2.weight,
                &b.ln_2.bias,
                &b.fc_w,
                &b.fc_b,
                &b.out_w,
                &b.out_b,
            ] {
                n += t.elem_count();
            }
        }
        if !self.tied {
            n += self.lm_head.elem_count();
        }
        n
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
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.wte.index_select(&ids, 0)?.add(&self.wpe.narrow(0, 0, t_len)?)?;
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
            let out = causal_attention(&q, &k, &v, scale)?;
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
    /// itself. Returns `u = ln_f(x_L)`, `(P, R, d)`.
    fn upper(
        &self,
        ctx: &Gpt2Context,
        positions: &[usize],
        h: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (p_n, r_n, d) = h.dims3()?;
        let (heads, dh) = self.heads();
        let scale = 1.0 / (dh as f64).sqrt();
        let mask = context_mask(positions, &self.device)?;
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
            let out = attend_cached(
                &q,
                &k_self,
                &v_self,
                &ctx.keys[idx],
                &ctx.values[idx],
                mask.as_ref(),
                scale,
            )?;
            let out = out.transpose(1, 2)?.reshape((p_n, r_n, d))?;
            x = (x + linear(&out, &b.proj_w, Some(&b.proj_b))?)?;
            x = (&x + self.mlp(&x, b)?)?;
        }
        self.norm(&x, &self.ln_f)
    }

    /// [`Gpt2::upper`] differentiated forward ([`crate::jvp`]): `h` holds the primal rows
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
        let mask = context_mask(positions, &self.device)?;
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
                scale,
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

impl CachedUpper for Gpt2 {
    fn device(&self) -> &Device {
        &self.device
    }
    fn model_dims(&self) -> ModelDims {
        ModelDims {
            d_model: self.cfg.n_embd,
            readout_dim: self.cfg.n_embd,
            vocab_size: self.cfg.vocab_size,
            n_layers: self.cfg.n_layer,
            max_seq_len: Some(self.cfg.n_positions),
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
        bytes_per_row_per_block(&self.cfg)
    }
    fn forward_sequence(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> candle_core::Result<Vec<CachedContext>> {
        Gpt2::forward_sequence(self, tokens, layers)
    }
    fn upper(
        &self,
        ctx: &CachedContext,
        positions: &[usize],
        h: &Tensor,
    ) -> candle_core::Result<Tensor> {
        Gpt2::upper(self, ctx, positions, h)
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
