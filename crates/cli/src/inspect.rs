//! `fisher-stein inspect DIR`: per analysed position, the next-token entropy, the trace, the top
//! eigenvalues and the effective rank of F; for the top K eigenvectors `v`, the tokens whose
//! probability `+v` and `−v` push up most.
//!
//! The logit change along `v` is `J v = W_U A v`, exact (`fs_estimators::direction_effects`: the
//! readout Jacobian and the unembedding, no finite differences). Tokens are ranked by the
//! first-order change of their probability, `∂p_y/∂ε = p_y·((Jv)_y − Σ_y' p_y' (Jv)_y')` — the
//! tokens the direction actually moves (a large logit change on an improbable token moves
//! nothing); the printed number is that change per unit step along `v`. Each direction also
//! shows the second-order check `KL(p ‖ p(h + εv))` vs `½ ε² vᵀFv` at a small `ε`.
//!
//! Results computed with `compute --directions K` carry their decoded directions and the
//! projections `hᵀv` (printed as a table); they are shown without loading the model. A layer
//! sweep (`--layers`) adds a per-layer table, a `--mean` run the spectrum of the mean Fisher.

use crate::backends::{with_model, Backend, LoadSpec, Loaded, ModelJob};
use crate::npz::read_npz;
use crate::Globals;
use anyhow::{bail, Context, Result};
use fs_estimators::{spectrum, Matrix, SplitModel};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Arguments of `fisher-stein inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A results directory written by `compute`.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Eigenvectors to decode per position.
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    /// Tokens listed per direction and sign.
    #[arg(long, default_value_t = 5)]
    pub tokens_per_direction: usize,
    /// Do not load the model (spectra only, no decoded directions).
    #[arg(long)]
    pub no_model: bool,
    /// The engine that loads the model to decode directions.
    #[arg(long, value_enum, default_value_t = Backend::Candle)]
    pub backend: Backend,
    /// Its device: `cpu`, `cuda:N` (candle, dfdx with `cuda`), `wgpu` (burn with `wgpu`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub type Arrays = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// Read every array of a results file (safetensors or npz) as `f64`.
pub fn read_results(path: &Path) -> Result<Arrays> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_results_bytes(path, &bytes)
}

/// [`read_results`] on the file's bytes: `path` chooses the format (`.npz`, else safetensors)
/// and names the file in messages.
pub fn read_results_bytes(path: &Path, bytes: &[u8]) -> Result<Arrays> {
    let bad = |e: String| {
        anyhow::anyhow!(
            "{} is not a valid results file ({e}): re-run compute to regenerate it",
            path.display()
        )
    };
    let mut out = HashMap::new();
    if path.extension().is_some_and(|e| e == "npz") {
        for (name, a) in read_npz(bytes).map_err(|e| bad(format!("{e:#}")))? {
            out.insert(name, (a.shape, a.data));
        }
    } else {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        for (name, t) in st.tensors() {
            let v: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => return Err(bad(format!("tensor {name} has unexpected dtype {d:?}"))),
            };
            out.insert(name, (t.shape().to_vec(), v));
        }
    }
    for required in ["fisher", "layer", "positions", "token_ids"] {
        if !out.contains_key(required) {
            return Err(bad(format!("tensor `{required}` is missing")));
        }
    }
    let (fs, f) = &out["fisher"];
    if fs.len() != 3 || fs[1] != fs[2] || f.len() != fs.iter().product::<usize>() {
        return Err(bad(format!("`fisher` has shape {fs:?}, expected [N, d, d]")));
    }
    if out["layer"].1.len() != fs[0] || out["positions"].1.len() != fs[0] {
        return Err(bad("`layer` / `positions` do not have one entry per matrix".into()));
    }
    Ok(out)
}

/// Decodes directions with a loaded model.
trait DirectionDecoder {
    /// What the columns of `v` (`d × K`) do at (`tokens`, `layer`, `position`).
    fn effects(
        &self,
        tokens: &[u32],
        layer: usize,
        position: usize,
        v: &Matrix<f64>,
    ) -> Result<Vec<fs_estimators::DirectionEffect>>;
    /// A token's text.
    fn decode(&self, id: u32) -> String;
}

struct ModelDecoder<M: SplitModel> {
    model: M,
    tokenizer: Option<fs_checkpoint::tokenizers::Tokenizer>,
}

impl<M: SplitModel> DirectionDecoder for ModelDecoder<M> {
    fn effects(
        &self,
        tokens: &[u32],
        layer: usize,
        position: usize,
        v: &Matrix<f64>,
    ) -> Result<Vec<fs_estimators::DirectionEffect>> {
        let ctx = self.model.lower(tokens, layer)?;
        Ok(fs_estimators::direction_effects(
            &self.model,
            &ctx,
            position,
            v,
            &fs_estimators::DirectionOptions::default(),
        )?)
    }
    fn decode(&self, id: u32) -> String {
        crate::readouts::token_text(self.tokenizer.as_ref(), id)
    }
}

/// Loads the model named in metadata.json on the chosen engine as a [`DirectionDecoder`].
struct DecoderJob;

impl ModelJob for DecoderJob {
    type Output = Box<dyn DirectionDecoder>;
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<Self::Output>
    where
        M::Scalar: fs_estimators::Element,
    {
        let tokenizer = match loaded.tokenizer {
            Some(t) => Some(t),
            None => fs_checkpoint::load_tokenizer(&loaded.files.tokenizer).ok(),
        };
        Ok(Box::new(ModelDecoder { model, tokenizer }))
    }
}

fn load_decoder(args: &InspectArgs, g: &Globals) -> Result<Box<dyn DirectionDecoder>> {
    let meta_path = args.dir.join("metadata.json");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&meta_path)
            .with_context(|| format!("cannot read {}", meta_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
    let spec = meta["model"]["spec"].as_str().context("metadata.json names no model")?;
    let load = LoadSpec { model: spec, backend: args.backend, device: &args.device, batch: None };
    let decoder = with_model(&load, g, DecoderJob)?;
    g.log(&format!("loaded {spec} on {} to decode directions", args.backend.name()));
    Ok(decoder)
}

/// Print stored read-outs (`compute --directions K`) of one summary entry.
fn print_stored_directions(summary: &serde_json::Value, top_k: usize, n: usize) {
    for d in summary["directions"].as_array().into_iter().flatten().take(top_k) {
        let toks = |key: &str| {
            d[key]
                .as_array()
                .into_iter()
                .flatten()
                .take(n)
                .map(|t| {
                    format!(
                        "{} ({:+.3})",
                        t["token"].as_str().unwrap_or("?"),
                        t["dp"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  v{} (λ = {:.4e}, hᵀv = {:.4})  KL(p‖p(h+εv)) {:.4e} vs ½ε²vᵀFv {:.4e} (ratio {:.3}, ε {:.3e})",
            d["k"],
            d["eigenvalue"].as_f64().unwrap_or(f64::NAN),
            d["projection"].as_f64().unwrap_or(f64::NAN),
            d["kl"].as_f64().unwrap_or(f64::NAN),
            d["kl_quadratic"].as_f64().unwrap_or(f64::NAN),
            d["kl_ratio"].as_f64().unwrap_or(f64::NAN),
            d["epsilon"].as_f64().unwrap_or(f64::NAN),
        );
        println!("    +v pushes up: {}", toks("up"));
        println!("    −v pushes up: {}", toks("down"));
    }
}

/// Run `inspect`.
pub fn run(args: InspectArgs, g: &Globals) -> Result<()> {
    if !args.dir.is_dir() {
        bail!(
            "{} is not a directory: give the --output directory of a compute run",
            args.dir.display()
        );
    }
    let has_mean = args.dir.join(crate::dataset::MEAN_FILE).is_file();
    let meta: serde_json::Value = std::fs::read(args.dir.join("metadata.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let summaries: Vec<serde_json::Value> = meta["summary"].as_array().cloned().unwrap_or_default();
    let stored = |seq: usize, layer: usize, position: usize| {
        summaries.iter().find(|s| {
            s["sequence"].as_u64() == Some(seq as u64)
                && s["layer"].as_u64() == Some(layer as u64)
                && s["position"].as_u64() == Some(position as u64)
                && s["directions"].is_array()
        })
    };
    let files = match crate::compute::results_files(&args.dir) {
        Ok(f) => f,
        Err(_) if has_mean => Vec::new(),
        Err(e) => return Err(e),
    };
    let results = files.iter().map(|f| read_results(f)).collect::<Result<Vec<_>>>()?;
    let all_stored = results.iter().all(|r| r.contains_key("direction_kl"));
    let decoder = if args.no_model || args.top_k == 0 || files.is_empty() || all_stored {
        None
    } else {
        match load_decoder(&args, g) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("note: directions not decoded, the model could not be loaded: {e:#}");
                None
            }
        }
    };
    for (file, r) in files.iter().zip(&results) {
        let (fs, f) = &r["fisher"];
        let (n, d) = (fs[0], fs[1]);
        let tokens: Vec<u32> = r["token_ids"].1.iter().map(|&x| x as u32).collect();
        let seq = r.get("sequence").and_then(|s| s.1.first().copied()).unwrap_or(0.0) as usize;
        let name = file.file_name().map(|x| x.to_string_lossy().into_owned()).unwrap_or_default();
        for i in 0..n {
            let layer = r["layer"].1[i] as usize;
            let position = r["positions"].1[i] as usize;
            let m = Matrix::from_vec(d, d, f[i * d * d..(i + 1) * d * d].to_vec())?;
            let s = spectrum(&m, Some(args.top_k.max(5).min(d)))?;
            let entropy = r
                .get("probs_entropy")
                .map(|e| format!("{:.4}", e.1[i]))
                .unwrap_or_else(|| "n/a".into());
            println!(
                "{name}  seq {seq}  layer {layer}  position {position}  token {}",
                tokens.get(position).map_or("?".into(), |t| t.to_string())
            );
            println!(
                "  entropy {entropy}  trace {:.4e}  effective rank {:.2}  participation ratio {:.2}",
                s.trace, s.effective_rank, s.participation_ratio
            );
            println!(
                "  top eigenvalues {}",
                s.eigenvalues
                    .iter()
                    .take(5)
                    .map(|x| format!("{x:.4e}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
            if args.top_k == 0 || args.no_model {
                continue;
            }
            if let Some(st) = stored(seq, layer, position) {
                print_stored_directions(st, args.top_k, args.tokens_per_direction);
                continue;
            }
            let Some(dec) = &decoder else { continue };
            let k = args.top_k.min(d);
            let v = Matrix::from_fn(d, k, |j, c| s.eigenvectors.get(j, c));
            for (c, e) in dec.effects(&tokens, layer, position, &v)?.iter().enumerate() {
                let fmt = |v: Vec<(u32, f64)>| {
                    v.into_iter()
                        .map(|(y, dp)| format!("{} ({dp:+.3})", dec.decode(y)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "  v{} (λ = {:.4e})  KL(p‖p(h+εv)) {:.4e} vs ½ε²vᵀFv {:.4e} (ratio {:.3}, ε {:.3e})",
                    c + 1,
                    s.eigenvalues[c],
                    e.kl,
                    e.kl_quadratic,
                    e.kl_ratio(),
                    e.epsilon
                );
                println!("    +v pushes up: {}", fmt(e.pushed_up(args.tokens_per_direction)));
                println!("    −v pushes up: {}", fmt(e.pushed_down(args.tokens_per_direction)));
            }
        }
        if let Some((ps, p)) = r.get("projections") {
            let k = ps.get(1).copied().unwrap_or(0);
            println!("{name}  projections hᵀv_i on the top eigenvectors of each position's F:");
            let header: Vec<String> =
                (1..=k).map(|c| format!("{:>10}", format!("hᵀv{c}"))).collect();
            println!("  layer  position  {}", header.join(" "));
            for i in 0..ps[0] {
                let row: Vec<String> = (0..k).map(|c| format!("{:>10.4}", p[i * k + c])).collect();
                println!(
                    "  {:>5}  {:>8}  {}",
                    r["layer"].1[i] as usize,
                    r["positions"].1[i] as usize,
                    row.join(" ")
                );
            }
        }
    }
    if let Some(rows) = meta["layer_summary"].as_array().filter(|a| a.len() > 1) {
        println!("layer sweep:");
        crate::readouts::print_layer_summary(rows);
    }
    if has_mean {
        let state = crate::dataset::MeanState::read(&args.dir.join(crate::dataset::MEAN_FILE))?;
        let rows: Vec<serde_json::Value> = state.summary()?.into_iter().map(|(r, _)| r).collect();
        println!(
            "{} ({} sequence(s), shard {}):",
            crate::dataset::MEAN_FILE,
            state.sequences.len(),
            state.shard
        );
        crate::dataset::print_mean_summary(&rows);
    }
    Ok(())
}
