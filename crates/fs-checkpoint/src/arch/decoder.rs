//! The Llama family (Llama, Mistral, Qwen2, SmolLM; HF `LlamaForCausalLM`): RMSNorm, RoPE,
//! grouped-query attention, SwiGLU. The `config.json` and the GGUF metadata, the tensor layout
//! (HF and llama.cpp names), and the typed host weights every engine uploads ([`DecoderWeights`]).

use crate::arch::{
    optional_tensor, present, required_tensor, GgufTensorName, HostMatrix, Linear, WeightSource,
};
use crate::error::{CheckpointError, Result};
use crate::gguf::{GgufFile, GgufValue};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The `model_type`s read as Llama-family models.
pub const DECODER_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

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

/// A Llama-family configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// `V`.
    pub vocab_size: usize,
    /// `d`.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Per-head width (default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Llama-3 frequency scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` is the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (`attention_bias`, or always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on o (`attention_bias` for Llama; never for Qwen2).
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
}

fn usize_field(obj: &Map<String, Value>, field: &str, path: &Path) -> Result<Option<usize>> {
    match present(obj, field) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .map(Some)
            .ok_or_else(|| {
                CheckpointError::config(path, field, format!("is {v}, expected a positive integer"))
            }),
    }
}

fn required(obj: &Map<String, Value>, field: &str, path: &Path) -> Result<usize> {
    usize_field(obj, field, path)?.ok_or_else(|| {
        CheckpointError::config(path, field, "is missing: a Llama-family config.json must set it")
    })
}

fn f64_field(obj: &Map<String, Value>, field: &str, path: &Path) -> Result<Option<f64>> {
    match present(obj, field) {
        None => Ok(None),
        Some(v) => v.as_f64().filter(|x| x.is_finite() && *x > 0.0).map(Some).ok_or_else(|| {
            CheckpointError::config(path, field, format!("is {v}, expected a positive number"))
        }),
    }
}

fn bool_field(obj: &Map<String, Value>, field: &str, default: bool) -> bool {
    present(obj, field).and_then(Value::as_bool).unwrap_or(default)
}

impl DecoderConfig {
    /// Read, parse and validate a Llama-family `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&crate::arch::read_config_text(path)?, path)
    }

    /// Parse a Llama-family `config.json` (`path` only names the file in messages). RoPE
    /// settings are read from transformers 5.x `rope_parameters` or from the older top-level
    /// `rope_theta` + `rope_scaling`; only the default and `llama3` rope types are supported.
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        let obj = &crate::arch::parse_config_object(json, path)?;
        let model_type =
            present(obj, "model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
        if !DECODER_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(CheckpointError::Unsupported {
                what: format!("model_type {model_type:?} in {}", path.display()),
                supported: DECODER_MODEL_TYPES.join(", "),
            });
        }
        if let Some(act) = present(obj, "hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(CheckpointError::Unsupported {
                    what: format!("hidden_act {act:?} in {}", path.display()),
                    supported: "silu (SwiGLU)".into(),
                });
            }
        }
        let hidden_size = required(obj, "hidden_size", path)?;
        let heads = required(obj, "num_attention_heads", path)?;
        let kv = usize_field(obj, "num_key_value_heads", path)?.unwrap_or(heads);
        if heads % kv != 0 {
            return Err(CheckpointError::config(
                path,
                "num_key_value_heads",
                format!("is {kv}, which does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match usize_field(obj, "head_dim", path)? {
            Some(h) => h,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(CheckpointError::config(
                    path,
                    "num_attention_heads",
                    format!("is {heads}, which does not divide hidden_size = {hidden_size} (and head_dim is not set)"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(CheckpointError::config(
                path,
                "head_dim",
                format!("is {head_dim}; RoPE needs an even head_dim"),
            ));
        }
        // RoPE: transformers 5.x `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`.
        let rope_obj = present(obj, "rope_parameters")
            .or_else(|| present(obj, "rope_scaling"))
            .and_then(Value::as_object);
        let rope_theta = rope_obj
            .and_then(|r| f64_field(r, "rope_theta", path).transpose())
            .transpose()?
            .or(f64_field(obj, "rope_theta", path)?)
            .unwrap_or(10_000.0);
        let rope_type = rope_obj
            .and_then(|r| present(r, "rope_type").or_else(|| present(r, "type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => None,
            "llama3" => {
                let r = rope_obj.expect("a rope type came from this object");
                let get = |f: &str| -> Result<f64> {
                    f64_field(r, f, path)?.ok_or_else(|| {
                        CheckpointError::config(
                            path,
                            f,
                            "is missing from the llama3 rope parameters",
                        )
                    })
                };
                Some(Llama3RopeScaling {
                    factor: get("factor")?,
                    low_freq_factor: get("low_freq_factor")?,
                    high_freq_factor: get("high_freq_factor")?,
                    original_max_position_embeddings: get("original_max_position_embeddings")?,
                })
            }
            other => {
                return Err(CheckpointError::Unsupported {
                    what: format!("rope type {other:?} in {}", path.display()),
                    supported: "default, llama3".into(),
                })
            }
        };
        let qwen = model_type == "qwen2";
        let attention_bias = bool_field(obj, "attention_bias", false);
        let cfg = DecoderConfig {
            vocab_size: required(obj, "vocab_size", path)?,
            hidden_size,
            intermediate_size: required(obj, "intermediate_size", path)?,
            num_hidden_layers: required(obj, "num_hidden_layers", path)?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: f64_field(obj, "rms_norm_eps", path)?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_field(obj, "max_position_embeddings", path)?
                .unwrap_or(2048),
            tie_word_embeddings: bool_field(obj, "tie_word_embeddings", false),
            qkv_bias: qwen || attention_bias,
            o_bias: !qwen && attention_bias,
            mlp_bias: bool_field(obj, "mlp_bias", false),
            model_type,
        };
        cfg.check_sizes(path)?;
        Ok(cfg)
    }

    /// Check the sizes every backend allocates from before it compares a tensor with the
    /// checkpoint: each width at most [`MAX_CONFIG_WIDTH`](crate::MAX_CONFIG_WIDTH), layers at
    /// most [`MAX_CONFIG_LAYERS`](crate::MAX_CONFIG_LAYERS), and the products `heads × head_dim`,
    /// `vocab × hidden`, `intermediate × hidden` representable. [`DecoderConfig::from_json`] runs
    /// it; a loader that builds the config from other metadata (GGUF) must run it too. `path`
    /// names the file in the one-line error.
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
        // The weight shapes the backends build from these sizes must be representable (a
        // hostile config must not overflow `heads × head_dim` and the like before any tensor is
        // compared with the checkpoint).
        let limit = isize::MAX as usize / 8;
        for (field, a, b) in [
            ("num_attention_heads", self.num_attention_heads, self.head_dim),
            ("num_key_value_heads", self.num_key_value_heads, self.head_dim),
            ("vocab_size", self.vocab_size, self.hidden_size),
            ("intermediate_size", self.intermediate_size, self.hidden_size),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > limit) {
                return Err(CheckpointError::config(
                    path,
                    field,
                    format!("is {a}, far too large for the model's other sizes"),
                ));
            }
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

    /// The RoPE inverse frequencies `θ^(−2i/head_dim)`, `i < head_dim/2`, in `f64`, with the
    /// Llama-3 scaling applied when configured (as transformers' `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f64> {
        let dh = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / dh))
            .collect();
        let Some(s) = self.rope_scaling else { return base };
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let scaled = if wavelen > low_wavelen { f / s.factor } else { f };
                // Wavelengths are finite and positive, so "not < and not >" is a closed interval.
                let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                if medium {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * scaled / s.factor + smooth * scaled
                } else {
                    scaled
                }
            })
            .collect()
    }
}

impl DecoderConfig {
    /// HF tensor names and shapes of a Llama-family checkpoint (linear weights `[out, in]`), in
    /// load order, including the optional biases and `lm_head.weight` this config asks for.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        let (d, v, inner) = (self.hidden_size, self.vocab_size, self.intermediate_size);
        let (q, kv) =
            (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        for i in 0..self.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            specs.push((p("input_layernorm.weight"), vec![d]));
            for (name, out, inp, bias) in [
                ("self_attn.q_proj", q, d, self.qkv_bias),
                ("self_attn.k_proj", kv, d, self.qkv_bias),
                ("self_attn.v_proj", kv, d, self.qkv_bias),
                ("self_attn.o_proj", d, q, self.o_bias),
            ] {
                specs.push((p(&format!("{name}.weight")), vec![out, inp]));
                if bias {
                    specs.push((p(&format!("{name}.bias")), vec![out]));
                }
            }
            specs.push((p("post_attention_layernorm.weight"), vec![d]));
            for (name, out, inp) in [
                ("mlp.gate_proj", inner, d),
                ("mlp.up_proj", inner, d),
                ("mlp.down_proj", d, inner),
            ] {
                specs.push((p(&format!("{name}.weight")), vec![out, inp]));
                if self.mlp_bias {
                    specs.push((p(&format!("{name}.bias")), vec![out]));
                }
            }
        }
        specs.push(("model.norm.weight".into(), vec![d]));
        if !self.tie_word_embeddings {
            specs.push(("lm_head.weight".into(), vec![v, d]));
        }
        specs
    }

    /// The HF `config.json` of this configuration (transformers 4.x style top-level
    /// `rope_theta` + `rope_scaling`, which [`DecoderConfig::from_json`] also reads).
    pub fn to_json(&self) -> Value {
        let rope_scaling = self.rope_scaling.map(|s| {
            json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            })
        });
        let mut cfg = json!({
            "model_type": self.model_type,
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
        });
        // Qwen2 always has q/k/v biases and never an o bias; Llama/Mistral use one switch.
        if self.model_type != "qwen2" {
            cfg["attention_bias"] = json!(self.qkv_bias || self.o_bias);
        }
        cfg
    }
}

/// One Llama-family block: `x ← x + attn(RMSNorm(x))`, `x ← x + mlp(RMSNorm(x))`, linear
/// weights transposed once from HF's `[out, in]` to `[in, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderBlock {
    /// RMSNorm weight before attention (`input_layernorm`).
    pub attn_norm: Vec<f32>,
    /// `q_proj`: `d → heads·head_dim` (bias when `qkv_bias`).
    pub q: Linear,
    /// `k_proj`: `d → kv_heads·head_dim`.
    pub k: Linear,
    /// `v_proj`: `d → kv_heads·head_dim`.
    pub v: Linear,
    /// `o_proj`: `heads·head_dim → d` (bias when `o_bias`).
    pub o: Linear,
    /// RMSNorm weight before the MLP (`post_attention_layernorm`).
    pub mlp_norm: Vec<f32>,
    /// `gate_proj`: `d → intermediate` (SwiGLU gate, through SiLU).
    pub gate: Linear,
    /// `up_proj`: `d → intermediate`.
    pub up: Linear,
    /// `down_proj`: `intermediate → d`.
    pub down: Linear,
}

/// The host weights of a Llama-family model, shape-checked against its config and finite.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderWeights {
    /// The configuration they were read for.
    pub config: DecoderConfig,
    /// Token embedding `embed_tokens`, `V × d`.
    pub embed: HostMatrix,
    /// The blocks, in order.
    pub blocks: Vec<DecoderBlock>,
    /// The final RMSNorm weight.
    pub norm: Vec<f32>,
    /// An untied unembedding `lm_head`, `V × d`; `None` when tied to `embed`.
    pub lm_head: Option<HostMatrix>,
}

impl DecoderWeights {
    /// Read every tensor of `config` from `source` by HF name (`model.embed_tokens.weight`,
    /// `model.layers.{i}.…`, `model.norm.weight`, `lm_head.weight` when untied, the biases the
    /// config asks for), each checked against the shape the config implies and for NaN/±∞.
    pub fn read(config: DecoderConfig, source: &mut dyn WeightSource) -> Result<Self> {
        config.check_sizes(Path::new("<config>"))?;
        let (d, v, inner) = (config.hidden_size, config.vocab_size, config.intermediate_size);
        let (q_out, kv_out) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let embed =
            HostMatrix::new(v, d, required_tensor(source, "model.embed_tokens.weight", &[v, d])?);
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let w = required_tensor(source, &p(&format!("{name}.weight")), &[out, inp])?;
                Ok(Linear {
                    weight: HostMatrix::transposed(out, inp, &w),
                    bias: optional_tensor(source, &p(&format!("{name}.bias")), &[out], bias)?,
                })
            };
            let q = linear("self_attn.q_proj", q_out, d, config.qkv_bias)?;
            let k = linear("self_attn.k_proj", kv_out, d, config.qkv_bias)?;
            let v = linear("self_attn.v_proj", kv_out, d, config.qkv_bias)?;
            let o = linear("self_attn.o_proj", d, q_out, config.o_bias)?;
            let gate = linear("mlp.gate_proj", inner, d, config.mlp_bias)?;
            let up = linear("mlp.up_proj", inner, d, config.mlp_bias)?;
            let down = linear("mlp.down_proj", d, inner, config.mlp_bias)?;
            blocks.push(DecoderBlock {
                attn_norm: required_tensor(source, &p("input_layernorm.weight"), &[d])?,
                q,
                k,
                v,
                o,
                mlp_norm: required_tensor(source, &p("post_attention_layernorm.weight"), &[d])?,
                gate,
                up,
                down,
            });
        }
        let norm = required_tensor(source, "model.norm.weight", &[d])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(HostMatrix::new(v, d, required_tensor(source, "lm_head.weight", &[v, d])?))
        };
        Ok(DecoderWeights { config, embed, blocks, norm, lm_head })
    }

    /// Read a Llama-family checkpoint directory's `config.json` and safetensors.
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

    /// The unembedding `W_U` (`V × d`): `lm_head` when untied, else `embed`.
    pub fn unembedding(&self) -> &HostMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Number of parameters (`W_U` counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.attn_norm.len()
                    + b.mlp_norm.len()
                    + [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                        .iter()
                        .map(|l| l.parameter_count())
                        .sum::<usize>()
            })
            .sum();
        self.embed.data.len()
            + blocks
            + self.norm.len()
            + self.lm_head.as_ref().map_or(0, |m| m.data.len())
    }
}

/// The GGUF architectures read as Llama-family models.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama"];

impl DecoderConfig {
    /// The configuration of a llama.cpp `llama` GGUF file from its metadata
    /// (`llama.embedding_length`, `llama.block_count`, `llama.attention.head_count[_kv]`,
    /// `llama.rope.*`, …; the vocabulary size from `tokenizer.ggml.tokens`; tied when there is
    /// no `output.weight`; q/k/v and o biases when the file holds them).
    ///
    /// Errors name the file: another architecture, RoPE scaling (not read from GGUF), a
    /// missing key, inconsistent attention metadata, sizes over this tool's limits or more
    /// blocks than the file has tensors.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path();
        let arch = file.architecture();
        if !GGUF_ARCHITECTURES.contains(&arch) {
            return Err(CheckpointError::Unsupported {
                what: format!("GGUF architecture {arch:?} in {}", path.display()),
                supported: GGUF_ARCHITECTURES.join(", "),
            });
        }
        let get_u = |key: &str| -> Result<usize> {
            file.get(key)
                .and_then(GgufValue::as_u64)
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    CheckpointError::gguf(
                        path,
                        format!("lacks the metadata key {key}: not a llama.cpp llama GGUF"),
                    )
                })
        };
        let get_f = |key: &str| file.get(key).and_then(GgufValue::as_f64);
        if let Some(t) = file.get("llama.rope.scaling.type").and_then(GgufValue::as_str) {
            if t != "none" {
                return Err(CheckpointError::Unsupported {
                    what: format!("RoPE scaling {t:?} in the GGUF metadata of {}", path.display()),
                    supported: "none (Llama-3 scaling is read from HF config.json checkpoints)"
                        .into(),
                });
            }
        }
        let vocab_size = file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(<[GgufValue]>::len)
            .ok_or_else(|| CheckpointError::gguf(path, "lacks tokenizer.ggml.tokens"))?;
        let d = get_u("llama.embedding_length")?;
        let heads = get_u("llama.attention.head_count")?;
        let cfg = DecoderConfig {
            model_type: "llama".into(),
            vocab_size,
            hidden_size: d,
            intermediate_size: get_u("llama.feed_forward_length")?,
            num_hidden_layers: get_u("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: get_u("llama.attention.head_count_kv").unwrap_or(heads),
            head_dim: get_u("llama.rope.dimension_count").unwrap_or(d / heads.max(1)),
            rms_norm_eps: get_f("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: get_u("llama.context_length").unwrap_or(2048),
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            qkv_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            o_bias: file.tensor("blk.0.attn_output.bias").is_some(),
            mlp_bias: false,
        };
        if cfg.num_attention_heads == 0
            || cfg.num_key_value_heads == 0
            || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads)
            || !cfg.head_dim.is_multiple_of(2)
        {
            return Err(CheckpointError::gguf(
                path,
                format!(
                    "has inconsistent attention metadata (heads {}, kv heads {}, head dim {})",
                    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
                ),
            ));
        }
        // Sizes the model allocates from before any tensor is read: bounded by the file.
        let n_tensors = file.tensors().len();
        if cfg.num_hidden_layers == 0 || cfg.num_hidden_layers > n_tensors {
            return Err(CheckpointError::gguf(
                path,
                format!(
                    "declares llama.block_count = {} with {n_tensors} tensors in the file: it is corrupt, re-download it",
                    cfg.num_hidden_layers
                ),
            ));
        }
        // The same limits as a config.json (the RoPE table alone has head_dim / 2 entries).
        cfg.check_sizes(path).map_err(|e| match e {
            CheckpointError::Config { field, message, .. } => CheckpointError::gguf(
                path,
                format!(
                    "has impossible model sizes ({field} {message}): it is corrupt, re-download it"
                ),
            ),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Where the HF tensor `hf` lives in a llama.cpp GGUF file of this configuration, with the
    /// head count its rows were permuted for (q and k).
    pub fn gguf_tensor_name(&self, hf: &str) -> Option<GgufTensorName> {
        let (heads, kv_heads) = (self.num_attention_heads, self.num_key_value_heads);
        let (name, unpermute_heads) = match hf {
            "model.embed_tokens.weight" => ("token_embd.weight".to_string(), None),
            "model.norm.weight" => ("output_norm.weight".into(), None),
            "lm_head.weight" => ("output.weight".into(), None),
            _ => {
                let rest = hf.strip_prefix("model.layers.")?;
                let (i, name) = rest.split_once('.')?;
                let (g, permute) = match name {
                    "input_layernorm.weight" => ("attn_norm.weight", None),
                    "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
                    "self_attn.q_proj.weight" => ("attn_q.weight", Some(heads)),
                    "self_attn.k_proj.weight" => ("attn_k.weight", Some(kv_heads)),
                    "self_attn.v_proj.weight" => ("attn_v.weight", None),
                    "self_attn.o_proj.weight" => ("attn_output.weight", None),
                    "self_attn.q_proj.bias" => ("attn_q.bias", None),
                    "self_attn.k_proj.bias" => ("attn_k.bias", None),
                    "self_attn.v_proj.bias" => ("attn_v.bias", None),
                    "self_attn.o_proj.bias" => ("attn_output.bias", None),
                    "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
                    "mlp.up_proj.weight" => ("ffn_up.weight", None),
                    "mlp.down_proj.weight" => ("ffn_down.weight", None),
                    _ => return None,
                };
                (format!("blk.{i}.{g}"), permute)
            }
        };
        Some(GgufTensorName { name, unpermute_heads })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transformers_5_rope_parameters_and_4_x_fields() {
        let p = Path::new("config.json");
        let v5 = r#"{"model_type": "llama", "vocab_size": 211, "hidden_size": 48, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
            "rms_norm_eps": 1e-6, "attention_bias": true, "tie_word_embeddings": false, "hidden_act": "silu",
            "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
              "original_max_position_embeddings": 256, "rope_theta": 500000.0, "rope_type": "llama3"}}"#;
        let c = DecoderConfig::from_json(v5, p).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta), (2, 8, 500000.0));
        assert!(c.qkv_bias && c.o_bias && !c.tie_word_embeddings);
        assert!(c.rope_scaling.is_some());
        let v4 = r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1000000.0}"#;
        let c = DecoderConfig::from_json(v4, p).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta), (2, 4, 1e6));
        assert!(c.qkv_bias && !c.o_bias && c.rope_scaling.is_none());
        let bad = v4.replace(
            "\"rope_theta\": 1000000.0",
            "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0}",
        );
        assert!(DecoderConfig::from_json(&bad, p).unwrap_err().to_string().contains("llama3"));
        let bad = v4.replace("qwen2", "gpt2");
        assert!(DecoderConfig::from_json(&bad, p).is_err());
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = DecoderConfig {
            model_type: "llama".into(),
            vocab_size: 1,
            hidden_size: 8,
            intermediate_size: 1,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 500000.0,
            rope_scaling: Some(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 256.0,
            }),
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
        };
        let f = c.inv_freq();
        let base: Vec<f64> = (0..4).map(|i| 1.0 / 500000f64.powf(2.0 * i as f64 / 8.0)).collect();
        assert_eq!(f[0], base[0]); // wavelength 6.3 < 64: kept
        assert!((f[3] - base[3] / 8.0).abs() < 1e-18); // wavelength 1.2e5 > 256: divided by 8
        assert!(f[1] < base[1] && f[1] > base[1] / 8.0 || f[2] < base[2] && f[2] > base[2] / 8.0);
    }
}
