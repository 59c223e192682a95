//! HF `config.json` of the Llama family (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, grouped
//! query attention, SwiGLU.

use crate::config::present;
use crate::error::{CheckpointError, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The `model_type`s read as Llama-family models.
pub const LLAMA_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

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
pub struct LlamaConfig {
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

impl LlamaConfig {
    /// Read, parse and validate a Llama-family `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
        Self::from_json(&text, path)
    }

    /// Parse a Llama-family `config.json` (`path` only names the file in messages). RoPE
    /// settings are read from transformers 5.x `rope_parameters` or from the older top-level
    /// `rope_theta` + `rope_scaling`; only the default and `llama3` rope types are supported.
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| CheckpointError::json(path, e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| CheckpointError::json(path, "the top level is not a JSON object"))?;
        let model_type =
            present(obj, "model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
        if !LLAMA_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(CheckpointError::Unsupported {
                what: format!("model_type {model_type:?} in {}", path.display()),
                supported: LLAMA_MODEL_TYPES.join(", "),
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
        let cfg = LlamaConfig {
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
    /// `vocab × hidden`, `intermediate × hidden` representable. [`LlamaConfig::from_json`] runs
    /// it; a loader that builds the config from other metadata (GGUF) must run it too. `path`
    /// names the file in the one-line error.
    pub fn check_sizes(&self, path: &Path) -> Result<()> {
        use crate::config::{
            check_size_limits, MAX_CONFIG_LAYERS as LAYERS, MAX_CONFIG_WIDTH as W,
        };
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
        let c = LlamaConfig::from_json(v5, p).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta), (2, 8, 500000.0));
        assert!(c.qkv_bias && c.o_bias && !c.tie_word_embeddings);
        assert!(c.rope_scaling.is_some());
        let v4 = r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1000000.0}"#;
        let c = LlamaConfig::from_json(v4, p).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta), (2, 4, 1e6));
        assert!(c.qkv_bias && !c.o_bias && c.rope_scaling.is_none());
        let bad = v4.replace(
            "\"rope_theta\": 1000000.0",
            "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0}",
        );
        assert!(LlamaConfig::from_json(&bad, p).unwrap_err().to_string().contains("llama3"));
        let bad = v4.replace("qwen2", "gpt2");
        assert!(LlamaConfig::from_json(&bad, p).is_err());
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = LlamaConfig {
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
