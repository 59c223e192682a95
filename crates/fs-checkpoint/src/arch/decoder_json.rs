//! Each decoder family's `config.json` (transformers 4.x and 5.x field names) to one
//! [`DecoderConfig`], and back.

use crate::arch::decoder::{
    Activation, DecoderConfig, LayerAttention, Llama3RopeScaling, NormKind, QkNorm, Rope,
    RopeScaling, DECODER_MODEL_TYPES,
};
use crate::arch::{present, Architecture};
use crate::error::{CheckpointError, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

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
        CheckpointError::config(
            path,
            field,
            "is missing: this model family's config.json must set it",
        )
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

/// What one RoPE parameter object says: `(θ if given, scaling, partial_rotary_factor if given)`.
type RopeObject = (Option<f64>, Option<RopeScaling>, Option<f64>);

/// One RoPE parameter object (`rope_parameters`, `rope_scaling`, or a per-layer-type entry).
fn parse_rope_object(r: &Map<String, Value>, path: &Path) -> Result<RopeObject> {
    let theta = f64_field(r, "rope_theta", path)?;
    let partial = f64_field(r, "partial_rotary_factor", path)?;
    let rope_type = present(r, "rope_type").or_else(|| present(r, "type")).and_then(Value::as_str);
    let get = |f: &str| -> Result<f64> {
        f64_field(r, f, path)?
            .ok_or_else(|| CheckpointError::config(path, f, "is missing from the rope parameters"))
    };
    let scaling = match rope_type.unwrap_or("default") {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: get("factor")? }),
        "llama3" => Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: get("factor")?,
            low_freq_factor: get("low_freq_factor")?,
            high_freq_factor: get("high_freq_factor")?,
            original_max_position_embeddings: get("original_max_position_embeddings")?,
        })),
        other => return Err(CheckpointError::Unsupported {
            what: format!("rope type {other:?} in {}", path.display()),
            supported:
                "default, linear, llama3 (LongRoPE, YaRN and dynamic scaling are not implemented)"
                    .into(),
        }),
    };
    Ok((theta, scaling, partial))
}

fn layer_types_field(obj: &Map<String, Value>, path: &Path) -> Result<Option<Vec<LayerAttention>>> {
    let Some(v) = present(obj, "layer_types") else { return Ok(None) };
    let bad = || {
        CheckpointError::config(
            path,
            "layer_types",
            "must be a list of \"full_attention\" / \"sliding_attention\"",
        )
    };
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|t| match t.as_str() {
            Some("full_attention") => Ok(LayerAttention::Full),
            Some("sliding_attention") => Ok(LayerAttention::Sliding),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

impl DecoderConfig {
    /// Read, parse and validate a decoder family's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&crate::arch::read_config_text(path)?, path)
    }

    /// Parse a decoder family's `config.json` (`path` only names the file in messages):
    /// `model_type` picks the family and its defaults (those of transformers' config class);
    /// RoPE settings come from transformers 5.x `rope_parameters` (one object, or one per layer
    /// type) or the older `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`,
    /// `rotary_pct`, `rotary_emb_base`). RoPE types default, linear and llama3 are supported;
    /// others are refused naming the type.
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        use Architecture as A;
        let obj = &crate::arch::parse_config_object(json, path)?;
        let model_type = present(obj, "model_type").and_then(Value::as_str).unwrap_or("llama");
        if model_type == "gemma3" {
            return Err(CheckpointError::Unsupported {
                what: format!(
                    "model_type \"gemma3\" (the multimodal Gemma-3 checkpoint) in {}",
                    path.display()
                ),
                supported: "the text-only gemma3_text checkpoints (Gemma-3 270M and 1B)".into(),
            });
        }
        let arch = match Architecture::from_model_type(model_type) {
            Ok(a) if a != A::Gpt2 => a,
            _ => {
                return Err(CheckpointError::Unsupported {
                    what: format!("model_type {model_type:?} in {}", path.display()),
                    supported: DECODER_MODEL_TYPES.join(", "),
                })
            }
        };
        let gemma = matches!(arch, A::Gemma2 | A::Gemma3);
        let hidden_size = required(obj, "hidden_size", path)?;
        let heads = required(obj, "num_attention_heads", path)?;
        let kv = usize_field(obj, "num_key_value_heads", path)?.unwrap_or(heads);
        let head_dim = match (usize_field(obj, "head_dim", path)?, arch) {
            (Some(h), _) => h,
            (None, A::Gemma2 | A::Gemma3) => 256,
            (None, A::Qwen3) => 128,
            (None, _) if hidden_size.is_multiple_of(heads) => hidden_size / heads,
            (None, _) => {
                return Err(CheckpointError::config(
                    path,
                    "num_attention_heads",
                    format!("is {heads}, which does not divide hidden_size = {hidden_size} (and head_dim is not set)"),
                ))
            }
        };
        let act_name = present(obj, "hidden_activation")
            .or_else(|| present(obj, "hidden_act"))
            .and_then(Value::as_str);
        let activation = match (act_name, arch) {
            (None, A::Gemma2 | A::Gemma3) => Activation::GeluTanh,
            (None, A::GptNeoX) => Activation::GeluErf,
            (None, _) | (Some("silu" | "swish"), _) => Activation::Silu,
            (Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast"), _) => Activation::GeluTanh,
            (Some("gelu"), _) => Activation::GeluErf,
            (Some(other), _) => {
                return Err(CheckpointError::Unsupported {
                    what: format!("hidden_act {other:?} in {}", path.display()),
                    supported: "silu, gelu, gelu_new, gelu_pytorch_tanh".into(),
                })
            }
        };
        let num_hidden_layers = required(obj, "num_hidden_layers", path)?;
        let mut cfg = DecoderConfig::llama_like(
            arch,
            required(obj, "vocab_size", path)?,
            hidden_size,
            required(obj, "intermediate_size", path)?,
            num_hidden_layers,
            heads,
            kv,
            head_dim,
        );
        cfg.activation = activation;

        // RoPE: one object, or one per layer type (transformers 5.x Gemma-3), or 4.x fields.
        let rope_obj = present(obj, "rope_parameters")
            .or_else(|| present(obj, "rope_scaling"))
            .and_then(Value::as_object);
        let per_type = rope_obj.filter(|r| r.contains_key("full_attention"));
        let default_theta = match arch {
            A::Gemma3 | A::Qwen3 => 1_000_000.0,
            _ => 10_000.0,
        };
        let top_theta = f64_field(obj, "rope_theta", path)?
            .or(f64_field(obj, "rotary_emb_base", path)?)
            .unwrap_or(default_theta);
        let top_partial =
            f64_field(obj, "partial_rotary_factor", path)?.or(f64_field(obj, "rotary_pct", path)?);
        let mut partial = top_partial;
        if let Some(types) = per_type {
            let entry = |key: &str| -> Result<Option<RopeObject>> {
                present(types, key)
                    .and_then(Value::as_object)
                    .map(|r| parse_rope_object(r, path))
                    .transpose()
            };
            if let Some((theta, scaling, p)) = entry("full_attention")? {
                cfg.rope = Rope { theta: theta.unwrap_or(top_theta), scaling };
                partial = partial.or(p);
            }
            if let Some((theta, scaling, _)) = entry("sliding_attention")? {
                cfg.sliding_rope = Some(Rope { theta: theta.unwrap_or(10_000.0), scaling });
            }
        } else {
            let (theta, scaling, p) = match rope_obj {
                Some(r) => parse_rope_object(r, path)?,
                None => (None, None, None),
            };
            cfg.rope = Rope { theta: theta.unwrap_or(top_theta), scaling };
            partial = partial.or(p);
            if arch == A::Gemma3 {
                let local = f64_field(obj, "rope_local_base_freq", path)?.unwrap_or(10_000.0);
                cfg.sliding_rope = Some(Rope { theta: local, scaling: None });
            }
        }
        let default_partial = if arch == A::GptNeoX { 0.25 } else { 1.0 };
        let factor = partial.unwrap_or(default_partial);
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(CheckpointError::config(
                path,
                "partial_rotary_factor",
                format!("is {factor}, expected a fraction in (0, 1]"),
            ));
        }
        cfg.rotary_dim = (head_dim as f64 * factor) as usize;

        // Norms, residual form, q/k norms, biases, per family.
        cfg.norm_eps = f64_field(obj, "rms_norm_eps", path)?
            .or(f64_field(obj, "layer_norm_eps", path)?)
            .unwrap_or(match arch {
                A::Olmo2 | A::Phi3 | A::GptNeoX => 1e-5,
                _ => 1e-6,
            });
        let attention_bias = bool_field(obj, "attention_bias", arch == A::GptNeoX);
        (cfg.qkv_bias, cfg.o_bias) = match arch {
            A::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        cfg.mlp_bias = bool_field(obj, "mlp_bias", arch == A::GptNeoX);
        cfg.tie_word_embeddings = bool_field(obj, "tie_word_embeddings", gemma);
        cfg.max_position_embeddings =
            usize_field(obj, "max_position_embeddings", path)?.unwrap_or(2048);
        match arch {
            A::GptNeoX => {
                cfg.norm = NormKind::Layer;
                cfg.gated_mlp = false;
                cfg.parallel_residual = bool_field(obj, "use_parallel_residual", true);
            }
            A::Gemma2 | A::Gemma3 => {
                cfg.norm_unit_offset = true;
                cfg.scale_embeddings = true;
                cfg.query_pre_attn_scalar =
                    Some(f64_field(obj, "query_pre_attn_scalar", path)?.unwrap_or(256.0));
                if arch == A::Gemma2 {
                    cfg.attn_logit_softcap = f64_field(obj, "attn_logit_softcapping", path)?;
                    cfg.final_logit_softcap = f64_field(obj, "final_logit_softcapping", path)?;
                } else {
                    // transformers' Gemma-3 attention never applies `attn_logit_softcapping`
                    // (5.24 passes no soft-cap to its attention function); the final cap it does.
                    cfg.qk_norm = Some(QkNorm::PerHead);
                    cfg.final_logit_softcap = f64_field(obj, "final_logit_softcapping", path)?;
                }
            }
            A::Qwen3 => cfg.qk_norm = Some(QkNorm::PerHead),
            A::Olmo2 => cfg.qk_norm = Some(QkNorm::Projection),
            _ => {}
        }

        // Which layers slide, and by how much.
        let window = usize_field(obj, "sliding_window", path)?;
        let uses_window = match arch {
            A::Qwen2 | A::Qwen3 => bool_field(obj, "use_sliding_window", false),
            _ => true,
        };
        cfg.sliding_window =
            if uses_window { window.or(if gemma { Some(4096) } else { None }) } else { None };
        let explicit = layer_types_field(obj, path)?;
        let pattern = usize_field(obj, "sliding_window_pattern", path)?.unwrap_or(6);
        let window_from = usize_field(obj, "max_window_layers", path)?.unwrap_or(0);
        cfg.layer_types = match explicit {
            Some(t) => t,
            None => (0..num_hidden_layers)
                .map(|i| {
                    let sliding = match arch {
                        A::Gemma2 => i % 2 == 0,
                        A::Gemma3 => (i + 1) % pattern != 0,
                        A::Qwen2 | A::Qwen3 => cfg.sliding_window.is_some() && i >= window_from,
                        _ => cfg.sliding_window.is_some(),
                    };
                    if sliding {
                        LayerAttention::Sliding
                    } else {
                        LayerAttention::Full
                    }
                })
                .collect(),
        };
        if cfg.sliding_window.is_none() {
            // A layer type list without a window (Qwen with use_sliding_window false).
            cfg.layer_types.iter_mut().for_each(|t| *t = LayerAttention::Full);
        }
        cfg.check_sizes(path)?;
        Ok(cfg)
    }

    /// The HF `config.json` of this configuration, in the transformers 4.x style (top-level
    /// `rope_theta`, `rope_scaling`, `rope_local_base_freq`, `rotary_pct`) that
    /// [`DecoderConfig::from_json`] reads back to the same configuration, with an explicit
    /// `layer_types` list.
    pub fn to_json(&self) -> Value {
        use Architecture as A;
        let scaling = |s: Option<RopeScaling>| match s {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3(s)) => json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
        };
        let class = match self.architecture {
            A::Llama => "LlamaForCausalLM",
            A::Mistral => "MistralForCausalLM",
            A::Qwen2 => "Qwen2ForCausalLM",
            A::Qwen3 => "Qwen3ForCausalLM",
            A::Gemma2 => "Gemma2ForCausalLM",
            A::Gemma3 => "Gemma3ForCausalLM",
            A::Olmo2 => "Olmo2ForCausalLM",
            A::Phi3 => "Phi3ForCausalLM",
            A::GptNeoX => "GPTNeoXForCausalLM",
            A::Gpt2 => "GPT2LMHeadModel",
        };
        let layer_types: Vec<&str> = self
            .layer_types
            .iter()
            .map(|t| match t {
                LayerAttention::Full => "full_attention",
                LayerAttention::Sliding => "sliding_attention",
            })
            .collect();
        let mut cfg = json!({
            "model_type": self.model_type(),
            "architectures": [class],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope.theta,
            "rope_scaling": scaling(self.rope.scaling),
            "partial_rotary_factor": self.rotary_dim as f64 / self.head_dim as f64,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.activation.name(),
            "sliding_window": self.sliding_window,
            "layer_types": layer_types,
        });
        let eps_field =
            if self.norm == NormKind::Layer { "layer_norm_eps" } else { "rms_norm_eps" };
        cfg[eps_field] = json!(self.norm_eps);
        if self.sliding_window.is_some() && matches!(self.architecture, A::Qwen2 | A::Qwen3) {
            cfg["use_sliding_window"] = json!(true);
        }
        if self.architecture != A::Qwen2 {
            cfg["attention_bias"] = json!(self.qkv_bias || self.o_bias);
        }
        if self.architecture == A::GptNeoX {
            cfg["use_parallel_residual"] = json!(self.parallel_residual);
        }
        if let Some(s) = self.query_pre_attn_scalar {
            cfg["query_pre_attn_scalar"] = json!(s);
        }
        cfg["attn_logit_softcapping"] = json!(self.attn_logit_softcap);
        cfg["final_logit_softcapping"] = json!(self.final_logit_softcap);
        if let Some(r) = self.sliding_rope {
            cfg["rope_local_base_freq"] = json!(r.theta);
        }
        cfg
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
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope.theta), (2, 8, 500000.0));
        assert!(c.qkv_bias && c.o_bias && !c.tie_word_embeddings);
        assert!(matches!(c.rope.scaling, Some(RopeScaling::Llama3(_))));
        let v4 = r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1000000.0}"#;
        let c = DecoderConfig::from_json(v4, p).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope.theta), (2, 4, 1e6));
        assert!(c.qkv_bias && !c.o_bias && c.rope.scaling.is_none());
        let bad = v4.replace(
            "\"rope_theta\": 1000000.0",
            "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0}",
        );
        let e = DecoderConfig::from_json(&bad, p).unwrap_err().to_string();
        assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
        assert!(DecoderConfig::from_json(&v4.replace("qwen2", "gpt2"), p).is_err());
        let gemma3 = v4.replace("qwen2", "gemma3");
        let e = DecoderConfig::from_json(&gemma3, p).unwrap_err().to_string();
        assert!(e.contains("gemma3_text"), "{e}");
    }

    /// Each family's defaults, as transformers' config classes set them.
    #[test]
    fn family_defaults() {
        let p = Path::new("config.json");
        let base = |t: &str| {
            format!(
                r#"{{"model_type": "{t}", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 16,
                "num_hidden_layers": 6, "num_attention_heads": 2, "head_dim": 8}}"#
            )
        };
        let g2 = DecoderConfig::from_json(&base("gemma2"), p).unwrap();
        assert!(g2.norm_unit_offset && g2.scale_embeddings && g2.tie_word_embeddings);
        assert_eq!((g2.attn_logit_softcap, g2.final_logit_softcap), (None, None));
        assert_eq!(g2.activation, Activation::GeluTanh);
        assert_eq!(g2.sliding_window, Some(4096));
        assert_eq!(g2.layer_types[0], LayerAttention::Sliding);
        assert_eq!(g2.layer_types[1], LayerAttention::Full);
        assert_eq!(g2.attention_scale(), 1.0 / 16.0); // query_pre_attn_scalar 256
        let g3 = DecoderConfig::from_json(&base("gemma3_text"), p).unwrap();
        assert_eq!(g3.qk_norm, Some(QkNorm::PerHead));
        let sliding: Vec<bool> =
            g3.layer_types.iter().map(|t| *t == LayerAttention::Sliding).collect();
        assert_eq!(sliding, [true, true, true, true, true, false]);
        assert_eq!(g3.rope.theta, 1e6);
        assert_eq!(g3.sliding_rope.map(|r| r.theta), Some(1e4));
        assert_eq!(g3.layer_rope(0).theta, 1e4);
        assert_eq!(g3.layer_rope(5).theta, 1e6);
        let neox = DecoderConfig::from_json(&base("gpt_neox"), p).unwrap();
        assert!(neox.parallel_residual && !neox.gated_mlp && neox.qkv_bias && neox.mlp_bias);
        assert_eq!(
            (neox.norm, neox.rotary_dim, neox.activation),
            (NormKind::Layer, 2, Activation::GeluErf)
        );
        let olmo = DecoderConfig::from_json(&base("olmo2"), p).unwrap();
        assert_eq!(olmo.qk_norm, Some(QkNorm::Projection));
        let qwen3 = DecoderConfig::from_json(&base("qwen3"), p).unwrap();
        assert_eq!((qwen3.qk_norm, qwen3.sliding_window), (Some(QkNorm::PerHead), None));
        // Every family round-trips through to_json.
        for t in DECODER_MODEL_TYPES {
            let c = DecoderConfig::from_json(&base(t), p).unwrap();
            assert_eq!(DecoderConfig::from_json(&c.to_json().to_string(), p).unwrap(), c, "{t}");
        }
    }

    #[test]
    fn rope_scalings_keep_divide_and_smooth() {
        let llama3 = Rope {
            theta: 500000.0,
            scaling: Some(RopeScaling::Llama3(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 256.0,
            })),
        };
        let f = llama3.inv_freq(8);
        let base: Vec<f64> = (0..4).map(|i| 1.0 / 500000f64.powf(2.0 * i as f64 / 8.0)).collect();
        assert_eq!(f[0], base[0]); // wavelength 6.3 < 64: kept
        assert!((f[3] - base[3] / 8.0).abs() < 1e-18); // wavelength 1.2e5 > 256: divided by 8
        assert!(f[1] < base[1] && f[1] > base[1] / 8.0 || f[2] < base[2] && f[2] > base[2] / 8.0);
        let linear = Rope { theta: 1e4, scaling: Some(RopeScaling::Linear { factor: 4.0 }) };
        // Partial rotary: frequencies over rotary_dim, not head_dim.
        let f = linear.inv_freq(4);
        assert_eq!(f, vec![0.25, 0.25 / 100.0]);
    }
}
