//! The RoPE decoder families — Llama, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3, OLMo-2, Phi-3,
//! GPT-NeoX (Pythia) — as one parameterised architecture: its configuration
//! ([`DecoderConfig`], parsed from each family's `config.json` in `decoder_json` and from GGUF
//! metadata in `decoder_gguf`), each family's tensor layout (HF names, fused tensors split
//! here), and the typed host weights every engine uploads ([`DecoderWeights`]).
//!
//! One block, for a residual `x` (every `norm` optional per family; RMSNorm or LayerNorm):
//!
//! ```text
//!     a   = attn_norm(x)
//!     o   = post_attn_norm( W_o · attention(a) )
//!     parallel residual (GPT-NeoX):  x ← x + o + post_mlp_norm(mlp(mlp_norm(x)))
//!     otherwise:                     x ← x + o;  x ← x + post_mlp_norm(mlp(mlp_norm(x)))
//! ```
//!
//! with `attention`: `q = W_q a (+b)` → optional q-norm (over the whole projection for OLMo-2,
//! per head for Qwen3 / Gemma-3) → RoPE on the first `rotary_dim` dimensions of each head
//! (`rotate_half` convention, per-layer θ) → scores `c · q·k` (`c = query_pre_attn_scalar^(−½)`
//! or `head_dim^(−½)`) → optional soft-cap `s ← cap·tanh(s/cap)` → causal mask, and for
//! sliding-window layers query `i` sees keys `j` with `i − j < window` only → softmax → `Σ a_j v_j`
//! with key/value heads shared by `heads / kv_heads` query heads. The MLP is gated
//! (`down(act(gate a) ⊙ up a)`) or plain (`down(act(up a))`), `act` ∈ SiLU, tanh-GELU, erf-GELU.
//! The readout is `u = final_norm(x_L)`, logits `z = W_U u`, soft-capped `z ← cap·tanh(z/cap)`
//! for Gemma-2. Gemma's RMSNorm `x·(1 + w)` keeps `w` as stored ([`DecoderConfig::norm_offset`]):
//! the engines add the 1 in their compute precision, as transformers does (folding it into f32
//! weights here would round `1 + w` to f32 even for a model computing in f64).

use crate::arch::{
    optional_f32, required_f32, required_tensor, Architecture, GgufTensorName, StoredLinear,
    WeightSource,
};
use crate::error::{CheckpointError, Result};
use crate::StoredMatrix;
use std::path::Path;

/// The `model_type`s read as RoPE decoder models.
pub const DECODER_MODEL_TYPES: &[&str] =
    &["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3", "gpt_neox"];

/// Llama-3-style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor of the low frequencies.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided by
    /// `factor`.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was trained with.
    pub original_max_position_embeddings: f64,
}

/// A RoPE frequency scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "llama3"`: low frequencies divided, a smooth band in between.
    Llama3(Llama3RopeScaling),
    /// `rope_type: "linear"`: every frequency divided by `factor` (positions interpolated).
    Linear {
        /// The divisor.
        factor: f64,
    },
}

/// The rotary embedding of one kind of layer: base θ and optional scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Base θ: frequency `i` is `θ^(−2i/rotary_dim)`.
    pub theta: f64,
    /// Frequency scaling, if any.
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// The inverse frequencies `θ^(−2i/rotary_dim)`, `i < rotary_dim/2`, in `f64`, scaled as
    /// transformers' `_compute_llama3_parameters` / `_compute_linear_scaling_rope_parameters`.
    pub fn inv_freq(&self, rotary_dim: usize) -> Vec<f64> {
        let dim = rotary_dim as f64;
        let base: Vec<f64> =
            (0..rotary_dim / 2).map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / dim)).collect();
        match self.scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.into_iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3(s)) => {
                let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / s.factor } else { f };
                        // Wavelengths are finite and positive: "not < and not >" is a closed
                        // interval.
                        if (high_wavelen..=low_wavelen).contains(&wavelen) {
                            let smooth = (s.original_max_position_embeddings / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * scaled / s.factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The normalisation layers' kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm `w ∘ x / √(mean x² + ε)` (no bias).
    Rms,
    /// LayerNorm `w ∘ (x − μ)/√(var x + ε) + b` (biased variance; GPT-NeoX).
    Layer,
}

/// The MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (`silu`).
    Silu,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))` (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// `½x(1 + erf(x/√2))` (`gelu`).
    GeluErf,
}

impl Activation {
    /// The HF name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::GeluErf => "gelu",
        }
    }
}

/// Where the q/k RMSNorm acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    /// On each head's `head_dim` values, one weight shared by the heads (Qwen3, Gemma-3).
    PerHead,
    /// On the whole projection (`heads·head_dim` values for q; OLMo-2).
    Projection,
}

/// What one attention layer sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttention {
    /// Every earlier position.
    Full,
    /// Positions `j` with `i − j < sliding_window` only.
    Sliding,
}

/// A RoPE decoder configuration: the sizes, and every switch by which the families differ.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    /// The family (`model_type`).
    pub architecture: Architecture,
    /// `V`.
    pub vocab_size: usize,
    /// `d`.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Per-head width (default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm or LayerNorm.
    pub norm: NormKind,
    /// The norms' ε.
    pub norm_eps: f64,
    /// The checkpoint's norm weights `w` act as `1 + w` (Gemma); the engines add the offset
    /// ([`DecoderConfig::norm_offset`]).
    pub norm_unit_offset: bool,
    /// `x + attn(ln₁ x) + mlp(ln₂ x)` (GPT-NeoX `use_parallel_residual`).
    pub parallel_residual: bool,
    /// q/k RMSNorm, if any.
    pub qk_norm: Option<QkNorm>,
    /// Rotated dimensions of each head (even, ≤ `head_dim`; GPT-NeoX `rotary_pct`, Phi-3
    /// `partial_rotary_factor`).
    pub rotary_dim: usize,
    /// RoPE of full-attention layers (and of every layer unless `sliding_rope` is set).
    pub rope: Rope,
    /// RoPE of sliding-window layers when it differs (Gemma-3's local θ).
    pub sliding_rope: Option<Rope>,
    /// The window of sliding layers.
    pub sliding_window: Option<usize>,
    /// Each layer's attention kind (length `num_hidden_layers`).
    pub layer_types: Vec<LayerAttention>,
    /// `query_pre_attn_scalar`: scores are scaled by its `−½` power instead of `head_dim`'s.
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention-score soft-cap `s ← c·tanh(s/c)` (Gemma-2).
    pub attn_logit_softcap: Option<f64>,
    /// Final-logit soft-cap `z ← c·tanh(z/c)` (Gemma-2).
    pub final_logit_softcap: Option<f64>,
    /// The embedding output is multiplied by `√hidden_size` (Gemma).
    pub scale_embeddings: bool,
    /// The MLP's activation.
    pub activation: Activation,
    /// Gated MLP `down(act(gate a) ⊙ up a)`; otherwise `down(act(up a))` (GPT-NeoX).
    pub gated_mlp: bool,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` is the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
}

impl DecoderConfig {
    /// A plain Llama-style configuration of `architecture` (RMSNorm, SiLU-gated MLP, full
    /// rotary, full attention everywhere, no soft-caps, no biases): the base every family's
    /// parser starts from.
    #[allow(clippy::too_many_arguments)]
    pub fn llama_like(
        architecture: Architecture,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        head_dim: usize,
    ) -> Self {
        DecoderConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            norm: NormKind::Rms,
            norm_eps: 1e-6,
            norm_unit_offset: false,
            parallel_residual: false,
            qk_norm: None,
            rotary_dim: head_dim,
            rope: Rope { theta: 10_000.0, scaling: None },
            sliding_rope: None,
            sliding_window: None,
            layer_types: vec![LayerAttention::Full; num_hidden_layers],
            query_pre_attn_scalar: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            scale_embeddings: false,
            activation: Activation::Silu,
            gated_mlp: true,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
        }
    }

    /// The HF `model_type`.
    pub fn model_type(&self) -> &'static str {
        self.architecture.model_type()
    }

    /// Check the sizes every backend allocates from before it compares a tensor with the
    /// checkpoint: each width at most [`MAX_CONFIG_WIDTH`](crate::MAX_CONFIG_WIDTH), layers at
    /// most [`MAX_CONFIG_LAYERS`](crate::MAX_CONFIG_LAYERS), the products `heads × head_dim`,
    /// `vocab × hidden`, `intermediate × hidden` representable, and the switches consistent
    /// (GQA divides, `rotary_dim` even and `≤ head_dim`, one layer type per layer, a window
    /// for sliding layers, positive caps and scalars). The parsers run it; a loader that builds
    /// the config from other metadata must run it too. `path` names the file in the error.
    pub fn check_sizes(&self, path: &Path) -> Result<()> {
        use crate::arch::{check_size_limits, MAX_CONFIG_LAYERS as LAYERS, MAX_CONFIG_WIDTH as W};
        check_size_limits(
            path,
            &[
                ("vocab_size", self.vocab_size, W),
                ("hidden_size", self.hidden_size, W),
                ("intermediate_size", self.intermediate_size, W),
                ("num_hidden_layers", self.num_hidden_layers, LAYERS),
                ("num_attention_heads", self.num_attention_heads, W),
                ("num_key_value_heads", self.num_key_value_heads, W),
                ("head_dim", self.head_dim, W),
            ],
        )?;
        let limit = isize::MAX as usize / 8;
        for (field, a, b) in [
            ("num_attention_heads", self.num_attention_heads, self.head_dim),
            ("num_key_value_heads", self.num_key_value_heads, self.head_dim),
            ("vocab_size", self.vocab_size, self.hidden_size),
            ("intermediate_size", self.intermediate_size, 2 * self.hidden_size),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > limit) {
                return Err(CheckpointError::config(
                    path,
                    field,
                    format!("is {a}, far too large for the model's other sizes"),
                ));
            }
        }
        let bad = |field: &str, msg: String| Err(CheckpointError::config(path, field, msg));
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(field, "is 0, expected a positive integer".into());
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(
                "num_key_value_heads",
                format!(
                    "is {}, which does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return bad(
                "head_dim",
                format!(
                    "is {} with {} rotary dimensions; RoPE needs an even number of rotary dimensions, at most head_dim",
                    self.head_dim, self.rotary_dim
                ),
            );
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return bad(
                "layer_types",
                format!(
                    "has {} entries for {} layers",
                    self.layer_types.len(),
                    self.num_hidden_layers
                ),
            );
        }
        if self.layer_types.contains(&LayerAttention::Sliding)
            && self.sliding_window.is_none_or(|w| w == 0)
        {
            return bad("sliding_window", "must be a positive integer for sliding layers".into());
        }
        for (field, v) in [
            ("norm_eps", Some(self.norm_eps)),
            ("rope_theta", Some(self.rope.theta)),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcap),
            ("final_logit_softcapping", self.final_logit_softcap),
        ] {
            if v.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                return bad(field, format!("is {}, expected a positive number", v.unwrap()));
            }
        }
        if self.architecture == Architecture::GptNeoX
            && self.num_key_value_heads != self.num_attention_heads
        {
            return bad(
                "num_key_value_heads",
                "must equal num_attention_heads for GPT-NeoX".into(),
            );
        }
        Ok(())
    }

    /// The split model's sizes: `d = d_u = hidden_size`, `V`, `num_hidden_layers` blocks,
    /// `max_position_embeddings`.
    pub fn dims(&self) -> fs_traits::ModelDims {
        fs_traits::ModelDims {
            d_model: self.hidden_size,
            readout_dim: self.hidden_size,
            vocab_size: self.vocab_size,
            n_layers: self.num_hidden_layers,
            max_seq_len: Some(self.max_position_embeddings),
        }
    }

    /// The RoPE of layer `layer` (`sliding_rope` for sliding layers when set).
    pub fn layer_rope(&self, layer: usize) -> Rope {
        match (self.layer_types.get(layer), self.sliding_rope) {
            (Some(LayerAttention::Sliding), Some(r)) => r,
            _ => self.rope,
        }
    }

    /// The RoPE inverse frequencies of full-attention layers ([`Rope::inv_freq`] over
    /// `rotary_dim`).
    pub fn inv_freq(&self) -> Vec<f64> {
        self.rope.inv_freq(self.rotary_dim)
    }

    /// The window of layer `layer`: `Some(w)` for a sliding layer.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerAttention::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// The attention-score scale `query_pre_attn_scalar^(−½)`, or `head_dim^(−½)`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).sqrt()
    }

    /// What every norm weight (the q/k norms' too) is offset by before it scales: `1` for Gemma's
    /// `x·(1 + w)` RMSNorm, `0` otherwise. The weights ([`Norm`], [`DecoderBlock::q_norm`]) are
    /// `w` as stored.
    pub fn norm_offset(&self) -> f64 {
        if self.norm_unit_offset {
            1.0
        } else {
            0.0
        }
    }

    /// The embedding multiplier `√hidden_size` rounded to f32 (as transformers' Gemma applies
    /// it to f32 embeddings), when the family scales its embeddings.
    pub fn embedding_multiplier(&self) -> Option<f32> {
        self.scale_embeddings.then(|| (self.hidden_size as f64).sqrt() as f32)
    }

    /// The layout of block `i`'s tensors in this family's HF checkpoints.
    pub(crate) fn block_names(&self, i: usize) -> BlockNames {
        use Architecture as A;
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let some = |s: &str| Some(p(s));
        let separate =
            || Qkv::Separate([p("self_attn.q_proj"), p("self_attn.k_proj"), p("self_attn.v_proj")]);
        let gated = || Mlp::Gated { gate: p("mlp.gate_proj"), up: p("mlp.up_proj") };
        match self.architecture {
            A::GptNeoX => {
                let p = |s: &str| format!("gpt_neox.layers.{i}.{s}");
                BlockNames {
                    attn_norm: Some(p("input_layernorm")),
                    post_attn_norm: None,
                    mlp_norm: Some(p("post_attention_layernorm")),
                    post_mlp_norm: None,
                    qkv: Qkv::NeoxInterleaved(p("attention.query_key_value")),
                    o: p("attention.dense"),
                    q_norm: None,
                    k_norm: None,
                    mlp: Mlp::Plain { up: p("mlp.dense_h_to_4h") },
                    down: p("mlp.dense_4h_to_h"),
                }
            }
            A::Gemma2 | A::Gemma3 => BlockNames {
                attn_norm: some("input_layernorm"),
                post_attn_norm: some("post_attention_layernorm"),
                mlp_norm: some("pre_feedforward_layernorm"),
                post_mlp_norm: some("post_feedforward_layernorm"),
                qkv: separate(),
                o: p("self_attn.o_proj"),
                q_norm: self.qk_norm.map(|_| p("self_attn.q_norm")),
                k_norm: self.qk_norm.map(|_| p("self_attn.k_norm")),
                mlp: gated(),
                down: p("mlp.down_proj"),
            },
            A::Olmo2 => BlockNames {
                attn_norm: None,
                post_attn_norm: some("post_attention_layernorm"),
                mlp_norm: None,
                post_mlp_norm: some("post_feedforward_layernorm"),
                qkv: separate(),
                o: p("self_attn.o_proj"),
                q_norm: self.qk_norm.map(|_| p("self_attn.q_norm")),
                k_norm: self.qk_norm.map(|_| p("self_attn.k_norm")),
                mlp: gated(),
                down: p("mlp.down_proj"),
            },
            A::Phi3 => BlockNames {
                attn_norm: some("input_layernorm"),
                post_attn_norm: None,
                mlp_norm: some("post_attention_layernorm"),
                post_mlp_norm: None,
                qkv: Qkv::Concat(p("self_attn.qkv_proj")),
                o: p("self_attn.o_proj"),
                q_norm: None,
                k_norm: None,
                mlp: Mlp::GateUpConcat(p("mlp.gate_up_proj")),
                down: p("mlp.down_proj"),
            },
            // Llama, Mistral, Qwen2, Qwen3 (q/k norms when configured).
            _ => BlockNames {
                attn_norm: some("input_layernorm"),
                post_attn_norm: None,
                mlp_norm: some("post_attention_layernorm"),
                post_mlp_norm: None,
                qkv: separate(),
                o: p("self_attn.o_proj"),
                q_norm: self.qk_norm.map(|_| p("self_attn.q_norm")),
                k_norm: self.qk_norm.map(|_| p("self_attn.k_norm")),
                mlp: gated(),
                down: p("mlp.down_proj"),
            },
        }
    }

    /// HF names of the token embedding, the final norm and the untied unembedding.
    pub(crate) fn top_names(&self) -> [&'static str; 3] {
        match self.architecture {
            Architecture::GptNeoX => {
                ["gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", "embed_out.weight"]
            }
            _ => ["model.embed_tokens.weight", "model.norm", "lm_head.weight"],
        }
    }

    /// Widths of the q/k norm weights: `(q, k)`.
    fn qk_norm_widths(&self) -> (usize, usize) {
        match self.qk_norm {
            Some(QkNorm::Projection) => {
                (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim)
            }
            _ => (self.head_dim, self.head_dim),
        }
    }

    /// HF tensor names and shapes of a checkpoint of this configuration (linear weights
    /// `[out, in]`, fused tensors as the family stores them), in load order, including the
    /// optional biases and the untied unembedding this config asks for.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        let (d, v, inner) = (self.hidden_size, self.vocab_size, self.intermediate_size);
        let (q, kv) =
            (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let [embed, final_norm, lm_head] = self.top_names();
        let mut specs = vec![(embed.to_string(), vec![v, d])];
        let norm = |specs: &mut Vec<(String, Vec<usize>)>, name: &Option<String>| {
            if let Some(n) = name {
                specs.push((format!("{n}.weight"), vec![d]));
                if self.norm == NormKind::Layer {
                    specs.push((format!("{n}.bias"), vec![d]));
                }
            }
        };
        let linear = |specs: &mut Vec<(String, Vec<usize>)>, n: &str, out, inp, bias: bool| {
            specs.push((format!("{n}.weight"), vec![out, inp]));
            if bias {
                specs.push((format!("{n}.bias"), vec![out]));
            }
        };
        let (qn, kn) = self.qk_norm_widths();
        for i in 0..self.num_hidden_layers {
            let b = self.block_names(i);
            norm(&mut specs, &b.attn_norm);
            match &b.qkv {
                Qkv::Separate([qp, kp, vp]) => {
                    linear(&mut specs, qp, q, d, self.qkv_bias);
                    linear(&mut specs, kp, kv, d, self.qkv_bias);
                    linear(&mut specs, vp, kv, d, self.qkv_bias);
                }
                Qkv::Concat(n) | Qkv::NeoxInterleaved(n) => {
                    linear(&mut specs, n, q + 2 * kv, d, self.qkv_bias)
                }
            }
            if let (Some(qname), Some(kname)) = (&b.q_norm, &b.k_norm) {
                specs.push((format!("{qname}.weight"), vec![qn]));
                specs.push((format!("{kname}.weight"), vec![kn]));
            }
            linear(&mut specs, &b.o, d, q, self.o_bias);
            norm(&mut specs, &b.post_attn_norm);
            norm(&mut specs, &b.mlp_norm);
            match &b.mlp {
                Mlp::Gated { gate, up } => {
                    linear(&mut specs, gate, inner, d, self.mlp_bias);
                    linear(&mut specs, up, inner, d, self.mlp_bias);
                }
                Mlp::GateUpConcat(n) => linear(&mut specs, n, 2 * inner, d, self.mlp_bias),
                Mlp::Plain { up } => linear(&mut specs, up, inner, d, self.mlp_bias),
            }
            linear(&mut specs, &b.down, d, inner, self.mlp_bias);
            norm(&mut specs, &b.post_mlp_norm);
        }
        norm(&mut specs, &Some(final_norm.to_string()));
        if !self.tie_word_embeddings {
            specs.push((lm_head.into(), vec![v, d]));
        }
        specs
    }
}

/// How a family stores q, k and v.
pub(crate) enum Qkv {
    /// Three tensors.
    Separate([String; 3]),
    /// One tensor, rows `[q | k | v]` (Phi-3 `qkv_proj`).
    Concat(String),
    /// One tensor, rows `[head][q | k | v][head_dim]` (GPT-NeoX `query_key_value`).
    NeoxInterleaved(String),
}

/// How a family stores its MLP's input projections.
pub(crate) enum Mlp {
    /// `gate_proj` and `up_proj`.
    Gated { gate: String, up: String },
    /// One tensor, rows `[gate | up]` (Phi-3 `gate_up_proj`).
    GateUpConcat(String),
    /// Only `up` (GPT-NeoX `dense_h_to_4h`).
    Plain { up: String },
}

/// The HF names (without `.weight`/`.bias`) of one block's tensors.
pub(crate) struct BlockNames {
    pub(crate) attn_norm: Option<String>,
    pub(crate) post_attn_norm: Option<String>,
    pub(crate) mlp_norm: Option<String>,
    pub(crate) post_mlp_norm: Option<String>,
    pub(crate) qkv: Qkv,
    pub(crate) o: String,
    pub(crate) q_norm: Option<String>,
    pub(crate) k_norm: Option<String>,
    pub(crate) mlp: Mlp,
    pub(crate) down: String,
}

/// A normalisation layer's weights (as stored: Gemma's act as `1 + w`,
/// [`DecoderConfig::norm_offset`]) and, for LayerNorm, its bias.
#[derive(Clone, Debug, PartialEq)]
pub struct Norm {
    /// The scale, length `d`.
    pub weight: Vec<f32>,
    /// The shift (LayerNorm only).
    pub bias: Option<Vec<f32>>,
}

impl Norm {
    fn parameter_count(&self) -> usize {
        self.weight.len() + self.bias.as_ref().map_or(0, Vec::len)
    }
}

/// One decoder block (see the module docs for how the parts compose), linear weights as stored
/// (`[out, in]`, in the checkpoint's precision), fused tensors split by row selection.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderBlock {
    /// Norm before attention (`input_layernorm`; none for OLMo-2).
    pub attn_norm: Option<Norm>,
    /// `q_proj`: `d → heads·head_dim`.
    pub q: StoredLinear,
    /// `k_proj`: `d → kv_heads·head_dim`.
    pub k: StoredLinear,
    /// `v_proj`: `d → kv_heads·head_dim`.
    pub v: StoredLinear,
    /// RMSNorm weight on q (per head: `head_dim`; OLMo-2: `heads·head_dim`).
    pub q_norm: Option<Vec<f32>>,
    /// RMSNorm weight on k.
    pub k_norm: Option<Vec<f32>>,
    /// `o_proj`: `heads·head_dim → d`.
    pub o: StoredLinear,
    /// Norm on the attention output before the residual add (Gemma, OLMo-2).
    pub post_attn_norm: Option<Norm>,
    /// Norm before the MLP.
    pub mlp_norm: Option<Norm>,
    /// `gate_proj` (gated MLPs).
    pub gate: Option<StoredLinear>,
    /// `up_proj`: `d → intermediate`.
    pub up: StoredLinear,
    /// `down_proj`: `intermediate → d`.
    pub down: StoredLinear,
    /// Norm on the MLP output before the residual add (Gemma, OLMo-2).
    pub post_mlp_norm: Option<Norm>,
}

/// The host weights of a decoder model, shape-checked against its config and finite; matrices in
/// the precision the checkpoint stores them in ([`StoredMatrix`]), vectors in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderWeights {
    /// The configuration they were read for.
    pub config: DecoderConfig,
    /// Token embedding, `V × d`.
    pub embed: StoredMatrix,
    /// The blocks, in order.
    pub blocks: Vec<DecoderBlock>,
    /// The final norm.
    pub norm: Norm,
    /// An untied unembedding, `V × d`; `None` when tied to `embed`.
    pub lm_head: Option<StoredMatrix>,
}

/// Rows `rows` of a row-major `[out, inp]` matrix (or a vector when `inp == 1`).
pub(crate) fn take_rows(data: &[f32], rows: impl Iterator<Item = usize>, inp: usize) -> Vec<f32> {
    rows.flat_map(|r| data[r * inp..(r + 1) * inp].iter().copied()).collect()
}

impl DecoderWeights {
    /// Read every tensor of `config` from `source` by HF name, each checked against the shape
    /// the config implies and for NaN/±∞; matrices stay in the source's precision, fused tensors
    /// are split by selecting rows (Phi-3 `[q|k|v]`, GPT-NeoX's per-head `[q|k|v]`, Phi-3
    /// `[gate|up]`); norm weights stay as stored (Gemma's `1 + w` is the engines' to add,
    /// [`DecoderConfig::norm_offset`]).
    pub fn read(config: DecoderConfig, source: &mut dyn WeightSource) -> Result<Self> {
        config.check_sizes(Path::new("<config>"))?;
        let (d, v, inner) = (config.hidden_size, config.vocab_size, config.intermediate_size);
        let dh = config.head_dim;
        let (q_out, kv_out) = (config.num_attention_heads * dh, config.num_key_value_heads * dh);
        let [embed_name, final_norm, lm_head_name] = config.top_names();
        let embed = required_tensor(source, embed_name, &[v, d])?;
        let read_norm = |source: &mut dyn WeightSource, name: &str| -> Result<Norm> {
            let weight = required_f32(source, &format!("{name}.weight"), &[d])?;
            let bias = optional_f32(
                source,
                &format!("{name}.bias"),
                &[d],
                config.norm == NormKind::Layer,
            )?;
            Ok(Norm { weight, bias })
        };
        // A linear layer from HF `[out, inp]` weight rows (and bias entries) `rows`.
        let linear_of = |w: &StoredMatrix, b: Option<&Vec<f32>>, rows: &[usize]| StoredLinear {
            weight: w.select_rows(rows),
            bias: b.map(|b| take_rows(b, rows.iter().copied(), 1)),
        };
        let read_linear =
            |source: &mut dyn WeightSource, name: &str, out: usize, inp: usize, bias: bool| {
                let w = required_tensor(source, &format!("{name}.weight"), &[out, inp])?;
                let b = optional_f32(source, &format!("{name}.bias"), &[out], bias)?;
                Ok::<_, CheckpointError>((w, b))
            };
        let (qn, kn) = config.qk_norm_widths();
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let names = config.block_names(i);
            let attn_norm = names.attn_norm.as_deref().map(|n| read_norm(source, n)).transpose()?;
            let all = |n: usize| (0..n).collect::<Vec<_>>();
            let (q, k, vv) = match &names.qkv {
                Qkv::Separate([qp, kp, vp]) => {
                    let (qw, qb) = read_linear(source, qp, q_out, d, config.qkv_bias)?;
                    let (kw, kb) = read_linear(source, kp, kv_out, d, config.qkv_bias)?;
                    let (vw, vb) = read_linear(source, vp, kv_out, d, config.qkv_bias)?;
                    (
                        linear_of(&qw, qb.as_ref(), &all(q_out)),
                        linear_of(&kw, kb.as_ref(), &all(kv_out)),
                        linear_of(&vw, vb.as_ref(), &all(kv_out)),
                    )
                }
                Qkv::Concat(n) => {
                    let (w, b) = read_linear(source, n, q_out + 2 * kv_out, d, config.qkv_bias)?;
                    let rows = |from: usize, len: usize| (from..from + len).collect::<Vec<_>>();
                    (
                        linear_of(&w, b.as_ref(), &rows(0, q_out)),
                        linear_of(&w, b.as_ref(), &rows(q_out, kv_out)),
                        linear_of(&w, b.as_ref(), &rows(q_out + kv_out, kv_out)),
                    )
                }
                Qkv::NeoxInterleaved(n) => {
                    let (w, b) = read_linear(source, n, 3 * q_out, d, config.qkv_bias)?;
                    // Row (head h, part p, i) of the fused tensor is h·3·dh + p·dh + i.
                    let part = |p: usize| {
                        (0..config.num_attention_heads)
                            .flat_map(|h| (0..dh).map(move |i| h * 3 * dh + p * dh + i))
                            .collect::<Vec<_>>()
                    };
                    (
                        linear_of(&w, b.as_ref(), &part(0)),
                        linear_of(&w, b.as_ref(), &part(1)),
                        linear_of(&w, b.as_ref(), &part(2)),
                    )
                }
            };
            let mut qk_norm = |name: &Option<String>, width: usize| {
                name.as_ref()
                    .map(|n| required_f32(source, &format!("{n}.weight"), &[width]))
                    .transpose()
            };
            let q_norm = qk_norm(&names.q_norm, qn)?;
            let k_norm = qk_norm(&names.k_norm, kn)?;
            let (ow, ob) = read_linear(source, &names.o, d, q_out, config.o_bias)?;
            let o = linear_of(&ow, ob.as_ref(), &all(d));
            let post_attn_norm =
                names.post_attn_norm.as_deref().map(|n| read_norm(source, n)).transpose()?;
            let mlp_norm = names.mlp_norm.as_deref().map(|n| read_norm(source, n)).transpose()?;
            let (gate, up) = match &names.mlp {
                Mlp::Gated { gate, up } => {
                    let (gw, gb) = read_linear(source, gate, inner, d, config.mlp_bias)?;
                    let (uw, ub) = read_linear(source, up, inner, d, config.mlp_bias)?;
                    (
                        Some(linear_of(&gw, gb.as_ref(), &all(inner))),
                        linear_of(&uw, ub.as_ref(), &all(inner)),
                    )
                }
                Mlp::GateUpConcat(n) => {
                    let (w, b) = read_linear(source, n, 2 * inner, d, config.mlp_bias)?;
                    (
                        Some(linear_of(&w, b.as_ref(), &all(inner))),
                        linear_of(&w, b.as_ref(), &(inner..2 * inner).collect::<Vec<_>>()),
                    )
                }
                Mlp::Plain { up } => {
                    let (uw, ub) = read_linear(source, up, inner, d, config.mlp_bias)?;
                    (None, linear_of(&uw, ub.as_ref(), &all(inner)))
                }
            };
            let (dw, db) = read_linear(source, &names.down, d, inner, config.mlp_bias)?;
            let down = linear_of(&dw, db.as_ref(), &all(d));
            let post_mlp_norm =
                names.post_mlp_norm.as_deref().map(|n| read_norm(source, n)).transpose()?;
            blocks.push(DecoderBlock {
                attn_norm,
                q,
                k,
                v: vv,
                q_norm,
                k_norm,
                o,
                post_attn_norm,
                mlp_norm,
                gate,
                up,
                down,
                post_mlp_norm,
            });
        }
        let norm = read_norm(source, final_norm)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(required_tensor(source, lm_head_name, &[v, d])?)
        };
        Ok(DecoderWeights { config, embed, blocks, norm, lm_head })
    }

    /// Read a decoder checkpoint directory's `config.json` and safetensors.
    pub fn load(files: &crate::ModelFiles) -> Result<Self> {
        let config = DecoderConfig::from_file(&files.config)?;
        Self::read(config, &mut crate::WeightStore::open(&files.weights)?)
    }

    /// The deterministic random weights of `(config, std, seed)` ([`crate::RandomSource`]):
    /// the same model on every engine.
    pub fn random(config: DecoderConfig, std: f64, seed: u64) -> Result<Self> {
        let source =
            &mut crate::RandomSource::new(&crate::ModelConfig::Decoder(config.clone()), std, seed);
        Self::read(config, source)
    }

    /// The same weights with every matrix held in f32 (widened now): what an eager f32 load
    /// gives, for engines and checks that want no stored-precision matrices.
    pub fn to_f32(&self) -> DecoderWeights {
        let lin = |l: &StoredLinear| StoredLinear {
            weight: l.weight.to_f32_matrix(),
            bias: l.bias.clone(),
        };
        DecoderWeights {
            config: self.config.clone(),
            embed: self.embed.to_f32_matrix(),
            blocks: self
                .blocks
                .iter()
                .map(|b| DecoderBlock {
                    q: lin(&b.q),
                    k: lin(&b.k),
                    v: lin(&b.v),
                    o: lin(&b.o),
                    gate: b.gate.as_ref().map(lin),
                    up: lin(&b.up),
                    down: lin(&b.down),
                    ..b.clone()
                })
                .collect(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.as_ref().map(StoredMatrix::to_f32_matrix),
        }
    }

    /// The unembedding `W_U` (`V × d`): `lm_head` when untied, else `embed`.
    pub fn unembedding(&self) -> &StoredMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Number of parameters (`W_U` counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let norms = |ns: [&Option<Norm>; 4]| -> usize {
            ns.iter().map(|n| n.as_ref().map_or(0, Norm::parameter_count)).sum()
        };
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                norms([&b.attn_norm, &b.post_attn_norm, &b.mlp_norm, &b.post_mlp_norm])
                    + b.q_norm.as_ref().map_or(0, Vec::len)
                    + b.k_norm.as_ref().map_or(0, Vec::len)
                    + [&b.q, &b.k, &b.v, &b.o, &b.up, &b.down]
                        .iter()
                        .map(|l| l.parameter_count())
                        .sum::<usize>()
                    + b.gate.as_ref().map_or(0, StoredLinear::parameter_count)
            })
            .sum();
        let elements = |m: &StoredMatrix| m.rows() * m.cols();
        elements(&self.embed)
            + blocks
            + self.norm.parameter_count()
            + self.lm_head.as_ref().map_or(0, elements)
    }
}

impl DecoderConfig {
    /// Where the HF tensor `hf` lives in a llama.cpp GGUF file of this configuration (see
    /// `decoder_gguf`).
    pub fn gguf_tensor_name(&self, hf: &str) -> Option<GgufTensorName> {
        crate::arch::decoder_gguf::gguf_tensor_name(self, hf)
    }
}
