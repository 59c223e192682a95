//! GPT-2 (HF `GPT2LMHeadModel`): the `config.json`, the tensor layout, and the typed host
//! weights every engine uploads ([`Gpt2Weights`]).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::arch::{
    check_size_limits, present, HostMatrix, Linear, ModelConfig, WeightSource, MAX_CONFIG_LAYERS,
    MAX_CONFIG_WIDTH,
};
use crate::error::{CheckpointError, Result};

/// The activation functions a GPT-2 backend implements: both names denote the tanh
/// approximation of GELU.
pub const GPT2_ACTIVATIONS: &[&str] = &["gelu_new", "gelu_pytorch_tanh"];

/// HF `GPT2Config` (config.json). Missing optional fields take HF's defaults:
/// `layer_norm_epsilon` 1e-5, `activation_function` "gelu_new", `tie_word_embeddings` true,
/// `n_inner` None (= 4·`n_embd`).
///
/// Build it with [`Gpt2Config::from_file`] or [`Gpt2Config::from_json`], which check the fields
/// one by one (naming the one at fault) and then [`Gpt2Config::validate`]. The serde
/// `Deserialize` impl applies the same defaults but neither names fields nor validates.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct Gpt2Config {
    /// Number of tokens, `V`.
    pub vocab_size: usize,
    /// Longest sequence (learned position embeddings).
    pub n_positions: usize,
    /// Residual-stream width `d`.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads; divides `n_embd`.
    pub n_head: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// MLP activation (`gelu_new` or `gelu_pytorch_tanh`).
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Whether the LM head shares the token embedding matrix.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// MLP hidden width; `None` means 4·`n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
}

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}

fn default_activation() -> String {
    "gelu_new".to_string()
}

fn default_true() -> bool {
    true
}

impl Gpt2Config {
    /// Read, parse and validate a GPT-2 `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&crate::arch::read_config_text(path)?, path)
    }

    /// Parse and validate the text of a GPT-2 `config.json`; `path` is used only in messages.
    ///
    /// Beyond [`Gpt2Config::validate`], this checks what only the JSON shows: `model_type`, if
    /// present, must be `"gpt2"`, and the attention variants a standard GPT-2 forward pass does
    /// not implement (`scale_attn_weights: false`, `scale_attn_by_inverse_layer_idx: true`,
    /// `add_cross_attention: true`) are refused.
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        let obj = &crate::arch::parse_config_object(json, path)?;
        if let Some(mt) = present(obj, "model_type") {
            if mt.as_str() != Some("gpt2") {
                return Err(CheckpointError::config(
                    path,
                    "model_type",
                    format!("is {mt}, expected \"gpt2\": this is not a GPT-2 checkpoint, load it with the backend for its architecture"),
                ));
            }
        }
        for (field, refused) in [
            ("scale_attn_weights", false),
            ("scale_attn_by_inverse_layer_idx", true),
            ("add_cross_attention", true),
        ] {
            if present(obj, field).and_then(Value::as_bool) == Some(refused) {
                return Err(CheckpointError::Unsupported {
                    what: format!("`{field}: {refused}` in {}", path.display()),
                    supported: format!("GPT-2 with `{field}: {}` (the standard model)", !refused),
                });
            }
        }
        let cfg = Gpt2Config {
            vocab_size: req_usize(obj, "vocab_size", path)?,
            n_positions: req_usize(obj, "n_positions", path)?,
            n_embd: req_usize(obj, "n_embd", path)?,
            n_layer: req_usize(obj, "n_layer", path)?,
            n_head: req_usize(obj, "n_head", path)?,
            layer_norm_epsilon: match present(obj, "layer_norm_epsilon") {
                None => default_layer_norm_epsilon(),
                Some(v) => v.as_f64().ok_or_else(|| {
                    CheckpointError::config(
                        path,
                        "layer_norm_epsilon",
                        format!("is {v}, expected a number such as 1e-5"),
                    )
                })?,
            },
            activation_function: match present(obj, "activation_function") {
                None => default_activation(),
                Some(v) => v.as_str().map(str::to_string).ok_or_else(|| {
                    CheckpointError::config(
                        path,
                        "activation_function",
                        format!("is {v}, expected a string such as \"gelu_new\""),
                    )
                })?,
            },
            tie_word_embeddings: match present(obj, "tie_word_embeddings") {
                None => default_true(),
                Some(v) => v.as_bool().ok_or_else(|| {
                    CheckpointError::config(
                        path,
                        "tie_word_embeddings",
                        format!("is {v}, expected true or false"),
                    )
                })?,
            },
            n_inner: match present(obj, "n_inner") {
                None => None,
                Some(_) => Some(req_usize(obj, "n_inner", path)?),
            },
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The split model's sizes: `d = d_u = n_embd`, `V`, `n_layer` blocks, `n_positions`.
    pub fn dims(&self) -> fs_traits::ModelDims {
        fs_traits::ModelDims {
            d_model: self.n_embd,
            readout_dim: self.n_embd,
            vocab_size: self.vocab_size,
            n_layers: self.n_layer,
            max_seq_len: Some(self.n_positions),
        }
    }

    /// The MLP hidden width: `n_inner`, or 4·`n_embd` when it is unset.
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Check the values (called by `from_*`): every size > 0, `n_embd` divisible by `n_head`,
    /// `layer_norm_epsilon` finite and > 0, and an activation in [`GPT2_ACTIVATIONS`]
    /// ([`CheckpointError::Unsupported`] otherwise). `path` is used only in messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.n_inner.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(CheckpointError::config(path, field, "is 0, expected a positive size"));
            }
        }
        check_size_limits(
            path,
            &[
                ("vocab_size", self.vocab_size, MAX_CONFIG_WIDTH),
                ("n_embd", self.n_embd, MAX_CONFIG_WIDTH),
                ("n_layer", self.n_layer, MAX_CONFIG_LAYERS),
                ("n_head", self.n_head, MAX_CONFIG_WIDTH),
                ("n_inner", self.n_inner.unwrap_or(1), MAX_CONFIG_WIDTH),
            ],
        )?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(CheckpointError::config(
                path,
                "n_head",
                format!(
                    "is {}, which does not divide n_embd = {}: the head size must be a whole number",
                    self.n_head, self.n_embd
                ),
            ));
        }
        if self.n_embd.checked_mul(4).is_none() {
            return Err(CheckpointError::config(
                path,
                "n_embd",
                format!("is {}, far too large", self.n_embd),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(CheckpointError::config(
                path,
                "layer_norm_epsilon",
                format!(
                    "is {}, expected a small positive number such as 1e-5",
                    self.layer_norm_epsilon
                ),
            ));
        }
        if !GPT2_ACTIVATIONS.contains(&self.activation_function.as_str()) {
            return Err(CheckpointError::Unsupported {
                what: format!(
                    "activation_function \"{}\" in {}",
                    self.activation_function,
                    path.display()
                ),
                supported: GPT2_ACTIVATIONS.join(", "),
            });
        }
        Ok(())
    }
}

impl Gpt2Config {
    /// Canonical (unprefixed) tensor names and shapes of a GPT-2 checkpoint in HF layout
    /// (Conv1D weights `[in, out]`), in load order. An untied config adds `lm_head.weight`.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        let (d, v, n_pos, inner) =
            (self.n_embd, self.vocab_size, self.n_positions, self.inner_dim());
        let mut specs =
            vec![("wte.weight".to_string(), vec![v, d]), ("wpe.weight".into(), vec![n_pos, d])];
        for i in 0..self.n_layer {
            let p = |s: &str| format!("h.{i}.{s}");
            specs.extend([
                (p("ln_1.weight"), vec![d]),
                (p("ln_1.bias"), vec![d]),
                (p("attn.c_attn.weight"), vec![d, 3 * d]),
                (p("attn.c_attn.bias"), vec![3 * d]),
                (p("attn.c_proj.weight"), vec![d, d]),
                (p("attn.c_proj.bias"), vec![d]),
                (p("ln_2.weight"), vec![d]),
                (p("ln_2.bias"), vec![d]),
                (p("mlp.c_fc.weight"), vec![d, inner]),
                (p("mlp.c_fc.bias"), vec![inner]),
                (p("mlp.c_proj.weight"), vec![inner, d]),
                (p("mlp.c_proj.bias"), vec![d]),
            ]);
        }
        specs.push(("ln_f.weight".into(), vec![d]));
        specs.push(("ln_f.bias".into(), vec![d]));
        if !self.tie_word_embeddings {
            specs.push(("lm_head.weight".into(), vec![v, d]));
        }
        specs
    }

    /// The HF `config.json` of this configuration (`model_type: "gpt2"`).
    pub fn to_json(&self) -> Value {
        json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation_function,
            "tie_word_embeddings": self.tie_word_embeddings,
        })
    }
}

/// A LayerNorm `y = (x − mean x) / √(var x + ε) · weight + bias`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// The scale (length `d`).
    pub weight: Vec<f32>,
    /// The shift (length `d`).
    pub bias: Vec<f32>,
}

/// One GPT-2 block: `x ← x + attn(ln_1 x)`, `x ← x + mlp(ln_2 x)`. HF's Conv1D weights are
/// already stored `[in, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Block {
    /// LayerNorm before attention.
    pub ln_1: LayerNorm,
    /// `c_attn`: `d → 3d`, the query, key and value column blocks side by side.
    pub attn_qkv: Linear,
    /// Attention output projection `c_proj`: `d → d`.
    pub attn_out: Linear,
    /// LayerNorm before the MLP.
    pub ln_2: LayerNorm,
    /// `c_fc`: `d → inner`, followed by `gelu_new`.
    pub mlp_in: Linear,
    /// MLP output `c_proj`: `inner → d`.
    pub mlp_out: Linear,
}

/// The host weights of a GPT-2 model, shape-checked against its config and finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Weights {
    /// The configuration they were read for.
    pub config: Gpt2Config,
    /// Token embedding `wte`, `V × d`.
    pub wte: HostMatrix,
    /// Position embedding `wpe`, `n_positions × d`.
    pub wpe: HostMatrix,
    /// The blocks, in order.
    pub blocks: Vec<Gpt2Block>,
    /// The final LayerNorm.
    pub ln_f: LayerNorm,
    /// An untied unembedding `lm_head`, `V × d`; `None` when `W_U = wte` (tied, or an untied
    /// config whose checkpoint carries no `lm_head.weight`, as HF then ties it too).
    pub lm_head: Option<HostMatrix>,
}

impl Gpt2Weights {
    /// Read every tensor of `config` from `source`: `transformer.`-prefixed or unprefixed names
    /// (the `attn.bias` / `attn.masked_bias` buffers are never read), each checked against the
    /// shape the config implies and for NaN/±∞. A missing tensor is named with its prefixed
    /// name and the source's files.
    pub fn read(config: Gpt2Config, source: &mut dyn WeightSource) -> Result<Self> {
        config.validate(Path::new("<config>"))?;
        let (d, v, inner) = (config.n_embd, config.vocab_size, config.inner_dim());
        let get = gpt2_tensor;
        let norm = |source: &mut dyn WeightSource, p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(source, &format!("{p}.weight"), &[d])?,
                bias: get(source, &format!("{p}.bias"), &[d])?,
            })
        };
        let wte = HostMatrix::new(v, d, get(source, "wte.weight", &[v, d])?);
        let wpe = HostMatrix::new(
            config.n_positions,
            d,
            get(source, "wpe.weight", &[config.n_positions, d])?,
        );
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = |s: &str| format!("h.{i}.{s}");
            let linear = |source: &mut dyn WeightSource, name: &str, inp: usize, out: usize| {
                Ok::<_, CheckpointError>(Linear {
                    weight: HostMatrix::new(
                        inp,
                        out,
                        get(source, &p(&format!("{name}.weight")), &[inp, out])?,
                    ),
                    bias: Some(get(source, &p(&format!("{name}.bias")), &[out])?),
                })
            };
            let ln_1 = norm(source, &p("ln_1"))?;
            let attn_qkv = linear(source, "attn.c_attn", d, 3 * d)?;
            let attn_out = linear(source, "attn.c_proj", d, d)?;
            let ln_2 = norm(source, &p("ln_2"))?;
            let mlp_in = linear(source, "mlp.c_fc", d, inner)?;
            let mlp_out = linear(source, "mlp.c_proj", inner, d)?;
            blocks.push(Gpt2Block { ln_1, attn_qkv, attn_out, ln_2, mlp_in, mlp_out });
        }
        let ln_f = norm(source, "ln_f")?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            match source.read("lm_head.weight", &[v, d])? {
                Some(stored) => {
                    stored.check_finite("lm_head.weight")?;
                    Some(HostMatrix::new(v, d, stored.to_f32()))
                }
                None => None,
            }
        };
        Ok(Gpt2Weights { config, wte, wpe, blocks, ln_f, lm_head })
    }

    /// Read a GPT-2 checkpoint directory's `config.json` and safetensors (see
    /// [`crate::resolve_model`] for finding the files).
    pub fn load(files: &crate::ModelFiles) -> Result<Self> {
        let config = Gpt2Config::from_file(&files.config)?;
        Self::read(config, &mut crate::WeightStore::open(&files.weights)?)
    }

    /// The deterministic random weights of `(config, std, seed)` ([`crate::RandomSource`]):
    /// the same model on every engine.
    pub fn random(config: Gpt2Config, std: f64, seed: u64) -> Result<Self> {
        let source = &mut crate::RandomSource::new(&ModelConfig::Gpt2(config.clone()), std, seed);
        Self::read(config, source)
    }

    /// The unembedding `W_U` (`V × d`): `lm_head` when untied, else `wte`.
    pub fn unembedding(&self) -> &HostMatrix {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Number of parameters (`W_U` counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let norm = |n: &LayerNorm| n.weight.len() + n.bias.len();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                norm(&b.ln_1)
                    + norm(&b.ln_2)
                    + [&b.attn_qkv, &b.attn_out, &b.mlp_in, &b.mlp_out]
                        .iter()
                        .map(|l| l.parameter_count())
                        .sum::<usize>()
            })
            .sum();
        self.wte.data.len()
            + self.wpe.data.len()
            + blocks
            + norm(&self.ln_f)
            + self.lm_head.as_ref().map_or(0, |m| m.data.len())
    }
}

/// A GPT-2 tensor by its canonical name: `transformer.{name}` or `{name}` (HF saves the base
/// model unprefixed), finite; missing is named with the prefixed name.
fn gpt2_tensor(source: &mut dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let prefixed = format!("transformer.{name}");
    let stored = match source.read(&prefixed, shape)? {
        Some(stored) => stored,
        None => source.read(name, shape)?.ok_or_else(|| CheckpointError::MissingTensor {
            name: prefixed,
            files: source.describe(),
        })?,
    };
    stored.check_finite(name)?;
    Ok(stored.to_f32())
}

fn req_usize(obj: &Map<String, Value>, field: &str, path: &Path) -> Result<usize> {
    let v = present(obj, field).ok_or_else(|| {
        CheckpointError::config(path, field, "is missing: a GPT-2 config.json must set it")
    })?;
    v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
        CheckpointError::config(path, field, format!("is {v}, expected a non-negative integer"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = r#"{
      "activation_function": "gelu_new", "add_cross_attention": false,
      "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 100,
      "dtype": "float32", "embd_pdrop": 0.1, "eos_token_id": 100, "initializer_range": 0.4,
      "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": 32, "n_head": 2,
      "n_inner": null, "n_layer": 2, "n_positions": 32, "pad_token_id": null,
      "reorder_and_upcast_attn": false, "resid_pdrop": 0.1,
      "scale_attn_by_inverse_layer_idx": false, "scale_attn_weights": true,
      "summary_activation": null, "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
      "summary_type": "cls_index", "summary_use_proj": true, "tie_word_embeddings": true,
      "transformers_version": "5.24.0", "use_cache": true, "vocab_size": 101
    }"#;

    fn p() -> &'static Path {
        Path::new("/m/config.json")
    }

    fn edit(f: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(FIXTURE).unwrap();
        f(v.as_object_mut().unwrap());
        v.to_string()
    }

    #[test]
    fn parses_a_real_gpt2_config() {
        let c = Gpt2Config::from_json(FIXTURE, p()).unwrap();
        let expected = Gpt2Config {
            vocab_size: 101,
            n_positions: 32,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            tie_word_embeddings: true,
            n_inner: None,
        };
        assert_eq!(c, expected);
        assert_eq!(c.inner_dim(), 128);
        // serde's derive agrees.
        let d: Gpt2Config = serde_json::from_str(FIXTURE).unwrap();
        assert_eq!(d, expected);
    }

    #[test]
    fn defaults_for_missing_optional_fields() {
        let json = r#"{"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 1000}"#;
        let c = Gpt2Config::from_json(json, p()).unwrap();
        assert_eq!(c.layer_norm_epsilon, 1e-5);
        assert_eq!(c.activation_function, "gelu_new");
        assert!(c.tie_word_embeddings);
        assert_eq!(c.inner_dim(), 1000);
        let d: Gpt2Config = serde_json::from_str(json).unwrap();
        assert_eq!(c, d);
        let tanh = edit(|o| {
            o.insert("activation_function".into(), "gelu_pytorch_tanh".into());
        });
        assert!(Gpt2Config::from_json(&tanh, p()).is_ok());
    }

    fn err(json: &str) -> (CheckpointError, String) {
        let e = Gpt2Config::from_json(json, p()).unwrap_err();
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        assert!(m.contains("/m/config.json"), "{m}");
        (e, m)
    }

    #[test]
    fn head_count_must_divide_width() {
        let (e, m) = err(&edit(|o| {
            o.insert("n_head".into(), 3.into());
        }));
        assert!(matches!(e, CheckpointError::Config { ref field, .. } if field == "n_head"), "{m}");
        assert!(m.contains("n_embd = 32"), "{m}");
    }

    #[test]
    fn unknown_activation() {
        let (e, m) = err(&edit(|o| {
            o.insert("activation_function".into(), "relu".into());
        }));
        assert!(matches!(e, CheckpointError::Unsupported { .. }), "{m}");
        assert!(m.contains("relu") && m.contains("gelu_new") && m.contains("gelu_pytorch_tanh"));
    }

    #[test]
    fn other_model_type() {
        let (e, m) = err(&edit(|o| {
            o.insert("model_type".into(), "llama".into());
        }));
        assert!(matches!(e, CheckpointError::Config { ref field, .. } if field == "model_type"));
        assert!(m.contains("llama") && m.contains("gpt2"), "{m}");
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases: Vec<(String, &str)> = vec![
            (edit(|o| drop(o.remove("n_embd"))), "n_embd"),
            (edit(|o| drop(o.insert("n_layer".into(), Value::Null))), "n_layer"),
            (edit(|o| drop(o.insert("n_layer".into(), (-2).into()))), "n_layer"),
            (edit(|o| drop(o.insert("vocab_size".into(), "101".into()))), "vocab_size"),
            (edit(|o| drop(o.insert("n_positions".into(), 0.into()))), "n_positions"),
            (edit(|o| drop(o.insert("n_inner".into(), 0.into()))), "n_inner"),
            (edit(|o| drop(o.insert("n_inner".into(), 2.5.into()))), "n_inner"),
            (edit(|o| drop(o.insert("layer_norm_epsilon".into(), 0.into()))), "layer_norm_epsilon"),
            (
                edit(|o| drop(o.insert("layer_norm_epsilon".into(), "x".into()))),
                "layer_norm_epsilon",
            ),
            (
                edit(|o| drop(o.insert("tie_word_embeddings".into(), 1.into()))),
                "tie_word_embeddings",
            ),
        ];
        for (json, field) in cases {
            let (e, m) = err(&json);
            assert!(
                matches!(e, CheckpointError::Config { field: ref f, .. } if f == field),
                "{field}: {m}"
            );
            assert!(m.contains(field), "{m}");
        }
    }

    #[test]
    fn unsupported_attention_variants() {
        for (field, v) in [
            ("scale_attn_by_inverse_layer_idx", true),
            ("scale_attn_weights", false),
            ("add_cross_attention", true),
        ] {
            let (e, m) = err(&edit(|o| drop(o.insert(field.into(), v.into()))));
            assert!(matches!(e, CheckpointError::Unsupported { .. }), "{m}");
            assert!(m.contains(field), "{m}");
        }
    }

    #[test]
    fn not_json() {
        let (e, _) = err("{\"vocab_size\": ");
        assert!(matches!(e, CheckpointError::Json { .. }));
        let (e, _) = err("[1, 2]");
        assert!(matches!(e, CheckpointError::Json { .. }));
    }

    #[test]
    fn from_file_missing() {
        let e = Gpt2Config::from_file(Path::new("/no/such/config.json")).unwrap_err();
        assert!(matches!(e, CheckpointError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("/no/such/config.json"));
    }
}
