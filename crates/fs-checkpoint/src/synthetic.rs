//! Synthetic checkpoints: deterministic random weights (in each architecture's HF tensor
//! layout) and a writer for HF-style model directories.
//!
//! Every backend loads the same directory through [`crate::resolve_model`], so a random model
//! written once here is *the same model* on candle, burn and dfdx: that is what the
//! cross-backend suite compares, and what the benchmarks run on.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{CheckpointError, Result};
use crate::{DecoderConfig, Gpt2Config, ModelFiles, ModelOrigin, TokenizerFiles};
use crate::{GgmlType, StoredMatrix};
use rayon::prelude::*;

/// One named host tensor (f32, row-major) in HF layout.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A seeded standard-normal stream (ChaCha-free: SplitMix64 + Box–Muller), identical on every
/// platform, so a `(config, std, seed)` triple names one model everywhere.
struct Normal {
    state: u64,
}

/// SplitMix64's increment γ.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn sample(&mut self) -> f64 {
        let u = |s: &mut Self| ((s.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let (u1, u2) = (u(self), u(self));
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Mean and standard deviation of a random tensor by its role, the GPT-2 initialisation scheme
/// with non-trivial norms: matrices `N(0, std²)`, residual output projections scaled by
/// `1/√(2·n_layer)`, norm weights `1 + N(0, 0.1²)`, norm biases `N(0, 0.1²)`, other biases
/// `N(0, 0.02²)`.
fn init(name: &str, std: f64, n_layer: usize, norm_weight_mean: f64) -> (f64, f64) {
    let is_norm = name.contains("ln_") || name.contains("norm");
    let proj_scale = 1.0 / (2.0 * n_layer.max(1) as f64).sqrt();
    if is_norm {
        (if name.ends_with("weight") { norm_weight_mean } else { 0.0 }, 0.1)
    } else if name.ends_with("bias") {
        (0.0, 0.02)
    } else if name.ends_with("c_proj.weight")
        || name.ends_with("o_proj.weight")
        || name.ends_with("down_proj.weight")
    {
        (0.0, std * proj_scale)
    } else {
        (0.0, std)
    }
}

/// Where one random tensor's values come from: its role's mean and standard deviation and the
/// index of its first sample in the seeded stream (tensors take consecutive stretches of the
/// stream in the order of the configuration's tensor specs).
pub(crate) struct RandomTensor {
    pub(crate) shape: Vec<usize>,
    mean: f64,
    std: f64,
    first_sample: u64,
}

/// The [`RandomTensor`] of every spec, by name. Norm weights are drawn around
/// `norm_weight_mean`: 1, or 0 for families whose norms act as `1 + w` (Gemma), so that every
/// family's norms scale by about 1.
pub(crate) fn random_tensor_plan(
    specs: Vec<(String, Vec<usize>)>,
    std: f64,
    n_layer: usize,
    norm_weight_mean: f64,
) -> std::collections::HashMap<String, RandomTensor> {
    let mut first_sample = 0u64;
    specs
        .into_iter()
        .map(|(name, shape)| {
            let (mean, s) = init(&name, std, n_layer, norm_weight_mean);
            let n = shape.iter().product::<usize>() as u64;
            let plan = RandomTensor { shape, mean, std: s, first_sample };
            first_sample += n;
            (name, plan)
        })
        .collect()
}

impl RandomTensor {
    /// The tensor's values as a `rows × cols` [`StoredMatrix`] in `dtype` (F32, F16 or BF16),
    /// drawn in parallel: sample `i` of the stream is the Box–Muller transform of draws `2i` and
    /// `2i + 1`, and SplitMix64's state before draw `k` is `seed + k·γ`, so any stretch of the
    /// stream can start anywhere.
    pub(crate) fn draw(
        &self,
        seed: u64,
        rows: usize,
        cols: usize,
        dtype: GgmlType,
    ) -> StoredMatrix {
        let n = rows * cols;
        const PIECE: usize = 1 << 16;
        let fill = |start: usize, out: &mut [f32]| {
            let draws = 2 * (self.first_sample + start as u64);
            let mut normal = Normal { state: seed.wrapping_add(draws.wrapping_mul(GAMMA)) };
            for o in out {
                *o = (self.mean + self.std * normal.sample()) as f32;
            }
        };
        match dtype {
            GgmlType::F16 | GgmlType::BF16 => {
                let mut bytes = vec![0u8; 2 * n];
                bytes.par_chunks_mut(2 * PIECE).enumerate().for_each(|(i, out)| {
                    let mut values = vec![0f32; out.len() / 2];
                    fill(i * PIECE, &mut values);
                    for (b, v) in out.chunks_exact_mut(2).zip(values) {
                        b.copy_from_slice(&if dtype == GgmlType::F16 {
                            half::f16::from_f32(v).to_le_bytes()
                        } else {
                            half::bf16::from_f32(v).to_le_bytes()
                        });
                    }
                });
                StoredMatrix::from_bytes(rows, cols, dtype, bytes).expect("2 bytes per value")
            }
            _ => {
                let mut data = vec![0f32; n];
                data.par_chunks_mut(PIECE).enumerate().for_each(|(i, out)| fill(i * PIECE, out));
                StoredMatrix::from_f32(rows, cols, data)
            }
        }
    }
}

/// Every spec's random values in f32, in spec order (see [`random_tensor_plan`]).
pub(crate) fn random_tensors(
    specs: Vec<(String, Vec<usize>)>,
    std: f64,
    n_layer: usize,
    norm_weight_mean: f64,
    seed: u64,
) -> Vec<NamedTensor> {
    let names: Vec<String> = specs.iter().map(|(n, _)| n.clone()).collect();
    let mut plan = random_tensor_plan(specs, std, n_layer, norm_weight_mean);
    names
        .into_iter()
        .map(|name| {
            let t = plan.remove(&name).expect("every spec is planned");
            let (rows, cols) = crate::matrix_dims(&t.shape);
            let data = t.draw(seed, rows, cols, GgmlType::F32).to_f32();
            (name, t.shape, data)
        })
        .collect()
}

/// Deterministic random weights for a GPT-2 configuration (names from
/// [`Gpt2Config::tensor_specs`]); `std` is the matrices' standard deviation (GPT-2 uses 0.02;
/// larger values give less uniform next-token distributions).
pub fn random_gpt2_weights(cfg: &Gpt2Config, std: f64, seed: u64) -> Vec<NamedTensor> {
    random_tensors(cfg.tensor_specs(), std, cfg.n_layer, 1.0, seed)
}

/// Deterministic random weights for a Llama-family configuration (names from
/// [`DecoderConfig::tensor_specs`]).
pub fn random_decoder_weights(cfg: &DecoderConfig, std: f64, seed: u64) -> Vec<NamedTensor> {
    let norm_mean = if cfg.norm_unit_offset { 0.0 } else { 1.0 };
    random_tensors(cfg.tensor_specs(), std, cfg.num_hidden_layers, norm_mean, seed)
}

/// Write an HF-style model directory: `config.json` and one F32 `model.safetensors` holding
/// `tensors` (GPT-2 names are written unprefixed, as `save_pretrained` does for the base
/// model). Returns the [`ModelFiles`] that [`crate::resolve_model`] would find there.
pub fn write_checkpoint(dir: &Path, config: &Value, tensors: &[NamedTensor]) -> Result<ModelFiles> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("a JSON value serialises");
    std::fs::write(&config_path, text).map_err(|e| CheckpointError::io(&config_path, e))?;

    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        assert_eq!(n, data.len(), "tensor {name}: shape {shape:?} does not match its data");
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * n]}),
        );
        offset += 4 * n;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("serialises");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let weights = dir.join("model.safetensors");
    let io = |e| CheckpointError::io(&weights, e);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&weights).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for (_, _, data) in tensors {
        for x in data {
            out.write_all(&x.to_le_bytes()).map_err(io)?;
        }
    }
    out.flush().map_err(io)?;
    Ok(ModelFiles {
        config: config_path,
        weights: vec![weights],
        tokenizer: TokenizerFiles::Missing,
        origin: ModelOrigin::LocalDir { dir: dir.to_path_buf() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WeightStore;

    fn gpt2() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 11,
            n_positions: 8,
            n_embd: 6,
            n_layer: 2,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            tie_word_embeddings: false,
            n_inner: None,
        }
    }

    #[test]
    fn written_gpt2_checkpoint_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = gpt2();
        let tensors = random_gpt2_weights(&cfg, 0.3, 7);
        assert_eq!(tensors, random_gpt2_weights(&cfg, 0.3, 7), "deterministic in the seed");
        let files = write_checkpoint(dir.path(), &cfg.to_json(), &tensors).unwrap();
        assert_eq!(Gpt2Config::from_file(&files.config).unwrap(), cfg);
        let resolved = crate::resolve_model(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(resolved.weights, files.weights);
        let store = WeightStore::open(&files.weights).unwrap();
        assert_eq!(store.len(), tensors.len());
        for (name, shape, data) in &tensors {
            let t = store.read_f32_shaped(name, shape).unwrap();
            assert_eq!(&t.data, data, "{name}");
        }
        let ln = &tensors.iter().find(|t| t.0 == "h.0.ln_1.weight").unwrap().2;
        assert!(ln.iter().all(|x| (x - 1.0).abs() < 0.6), "norm weights near 1");
    }

    #[test]
    fn llama_config_round_trips_through_json() {
        for (model_type, bias, tied, scaling) in [
            ("llama", true, false, true),
            ("qwen2", true, true, false),
            ("mistral", false, true, false),
        ] {
            let mut json = json!({
                "model_type": model_type, "vocab_size": 13, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "tie_word_embeddings": tied, "attention_bias": bias,
                "rope_theta": 500.0,
            });
            if scaling {
                json["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16});
            }
            let path = Path::new("config.json");
            let cfg = DecoderConfig::from_json(&json.to_string(), path).unwrap();
            let back = DecoderConfig::from_json(&cfg.to_json().to_string(), path).unwrap();
            assert_eq!(back, cfg, "{model_type}");
            let names: Vec<String> = cfg.tensor_specs().into_iter().map(|s| s.0).collect();
            assert_eq!(names.contains(&"lm_head.weight".to_string()), !tied);
            assert_eq!(names.iter().any(|n| n.ends_with("q_proj.bias")), cfg.qkv_bias);
            assert_eq!(cfg.model_type(), model_type);
            assert_eq!(names.iter().any(|n| n.ends_with("o_proj.bias")), cfg.o_bias);
        }
    }

    /// The typed weights of a written random checkpoint equal those of the random source, for
    /// both families and both tyings, and count every written parameter once.
    #[test]
    fn random_source_is_the_model_of_the_written_checkpoint() {
        for tied in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = Gpt2Config { tie_word_embeddings: tied, ..gpt2() };
            let tensors = random_gpt2_weights(&cfg, 0.3, 7);
            let files = write_checkpoint(dir.path(), &cfg.to_json(), &tensors).unwrap();
            let loaded = crate::Gpt2Weights::load(&files).unwrap();
            assert_eq!(loaded, crate::Gpt2Weights::random(cfg.clone(), 0.3, 7).unwrap());
            let n: usize = tensors.iter().map(|t| t.2.len()).sum();
            assert_eq!(loaded.parameter_count(), n, "tied {tied}");
            assert_eq!(loaded.lm_head.is_none(), tied);
        }
        let json = json!({"model_type": "qwen2", "vocab_size": 13, "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": false});
        let cfg = DecoderConfig::from_json(&json.to_string(), Path::new("config.json")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tensors = random_decoder_weights(&cfg, 0.3, 9);
        let files = write_checkpoint(dir.path(), &cfg.to_json(), &tensors).unwrap();
        let loaded = crate::DecoderWeights::load(&files).unwrap();
        assert_eq!(loaded, crate::DecoderWeights::random(cfg, 0.3, 9).unwrap());
        let n: usize = tensors.iter().map(|t| t.2.len()).sum();
        assert_eq!(loaded.parameter_count(), n);
        // HF stores q_proj as [out, in], and so do the typed weights; `to_linear` gives [in, out].
        let hf = &tensors.iter().find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight").unwrap();
        let q = &loaded.blocks[0].q;
        assert_eq!(q.weight.shape(), [hf.1[0], hf.1[1]]);
        assert_eq!(q.weight.to_f32(), hf.2);
        let t = q.to_linear().weight;
        assert_eq!((t.rows, t.cols), (hf.1[1], hf.1[0]));
        assert_eq!(t.data[1], hf.2[t.rows]); // W[0][1] = HF[1][0]
    }

    /// The stream the random weights came from before tensors were drawn lazily and in parallel
    /// (one sequential SplitMix64 + Box–Muller stream over the specs in order): the values must
    /// not change, the fixtures and benchmarks name models by `(config, std, seed)`.
    #[test]
    fn lazy_parallel_draws_reproduce_the_sequential_stream() {
        let cfg = DecoderConfig::from_json(
            &json!({"model_type": "llama", "vocab_size": 300, "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "tie_word_embeddings": false})
            .to_string(),
            Path::new("config.json"),
        )
        .unwrap();
        let specs = cfg.tensor_specs();
        let mut normal = Normal { state: 5 };
        let sequential: Vec<Vec<f32>> = specs
            .iter()
            .map(|(name, shape)| {
                let (mean, s) = init(name, 0.3, 2, 1.0);
                let n: usize = shape.iter().product();
                (0..n).map(|_| (mean + s * normal.sample()) as f32).collect()
            })
            .collect();
        let drawn = random_decoder_weights(&cfg, 0.3, 5);
        for ((name, _, data), expected) in drawn.iter().zip(&sequential) {
            assert_eq!(data, expected, "{name}");
        }
        // Read in reverse order and held in bf16: the same draws, rounded.
        let mut source = crate::RandomSource::new(&crate::ModelConfig::Decoder(cfg), 0.3, 5)
            .with_dtype(GgmlType::BF16)
            .unwrap();
        for ((name, shape), expected) in specs.iter().zip(&sequential).rev() {
            let m = crate::WeightSource::read(&mut source, name, shape).unwrap().unwrap();
            let rounded: Vec<f32> = if shape.len() == 2 {
                expected.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
            } else {
                expected.clone()
            };
            assert_eq!(m.to_f32(), rounded, "{name}");
            assert_eq!(m.dtype() == GgmlType::BF16, shape.len() == 2, "{name}");
        }
    }
}
