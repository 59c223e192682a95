//! `fisher-stein inspect DIR`: per analysed position, the next-token entropy, the trace, the top
//! eigenvalues and the effective rank of F; for the top K eigenvectors `v`, the tokens whose
//! probability `+v` and `−v` push up most.
//!
//! The logit change along `v` is `J v = ∂z/∂h · v`, evaluated as a central difference of the
//! model's upper half, `(z(h + εv) − z(h − εv)) / 2ε` with `ε = 1e-3·max(1, ‖h‖)` (two
//! single-position passes per direction). Tokens are ranked by the first-order change of their
//! probability, `∂p_y/∂ε = p_y·((Jv)_y − Σ_y' p_y' (Jv)_y')` — the tokens the direction actually
//! moves (a large logit change on an improbable token moves nothing); the printed number is
//! that change per unit step along `v`.

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
}

type Arrays = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// Read every array of a results file (safetensors or npz) as `f64`.
fn read_results(path: &Path) -> Result<Arrays> {
    let bad = |e: String| {
        anyhow::anyhow!(
            "{} is not a valid results file ({e}): re-run compute to regenerate it",
            path.display()
        )
    };
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = HashMap::new();
    if path.extension().is_some_and(|e| e == "npz") {
        for (name, a) in read_npz(&bytes).map_err(|e| bad(format!("{e:#}")))? {
            out.insert(name, (a.shape, a.data));
        }
    } else {
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
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
    /// `J v` at (`tokens`, `layer`, `position`) by central differences.
    fn logit_change(
        &self,
        tokens: &[u32],
        layer: usize,
        position: usize,
        v: &[f64],
    ) -> Result<(Vec<f64>, Vec<f64>)>;
    /// A token's text.
    fn decode(&self, id: u32) -> String;
}

struct ModelDecoder<M: SplitModel> {
    model: M,
    tokenizer: Option<fs_checkpoint::tokenizers::Tokenizer>,
}

impl<M: SplitModel> DirectionDecoder for ModelDecoder<M> {
    fn logit_change(
        &self,
        tokens: &[u32],
        layer: usize,
        position: usize,
        v: &[f64],
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        use fs_estimators::Scalar;
        let ctx = self.model.lower(tokens, layer)?;
        let h = self.model.activation(&ctx, position)?;
        let norm = h.iter().map(|x| x.as_f64() * x.as_f64()).sum::<f64>().sqrt();
        let eps = 1e-3 * norm.max(1.0);
        let shifted = |sign: f64| -> Vec<M::Scalar> {
            h.iter()
                .zip(v)
                .map(|(x, d)| M::Scalar::round_from_f64(x.as_f64() + sign * eps * d))
                .collect()
        };
        let zp = self.model.upper_logits(&ctx, position, &shifted(1.0))?;
        let zm = self.model.upper_logits(&ctx, position, &shifted(-1.0))?;
        let p = fs_estimators::softmax(&self.model.upper_logits(&ctx, position, &h)?)?;
        Ok((zp.iter().zip(&zm).map(|(a, b)| (a.as_f64() - b.as_f64()) / (2.0 * eps)).collect(), p))
    }
    fn decode(&self, id: u32) -> String {
        match &self.tokenizer {
            Some(t) => t
                .decode(&[id], false)
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|_| format!("#{id}")),
            None => format!("#{id}"),
        }
    }
}

fn load_decoder(dir: &Path, g: &Globals) -> Result<Box<dyn DirectionDecoder>> {
    let meta_path = dir.join("metadata.json");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&meta_path)
            .with_context(|| format!("cannot read {}", meta_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
    let spec = meta["model"]["spec"].as_str().context("metadata.json names no model")?;
    #[cfg(feature = "candle")]
    if crate::backends::gguf_files(spec).is_some() {
        let (model, tokenizer) = backend_candle::load_llama_gguf(
            std::path::Path::new(spec),
            &backend_candle::Device::Cpu,
        )?;
        g.log(&format!("loaded {spec} to decode directions"));
        return Ok(Box::new(ModelDecoder { model, tokenizer: Some(tokenizer) }));
    }
    let files = fs_checkpoint::resolve_model(spec)?;
    let tokenizer = fs_checkpoint::load_tokenizer(&files.tokenizer).ok();
    match meta["model"]["architecture"].as_str().unwrap_or("gpt2") {
        #[cfg(feature = "candle")]
        "gpt2" => {
            let model = backend_candle::Gpt2::load(&files, &backend_candle::Device::Cpu)?;
            g.log(&format!("loaded {spec} to decode directions"));
            Ok(Box::new(ModelDecoder { model, tokenizer }))
        }
        #[cfg(feature = "candle")]
        "llama" | "mistral" | "qwen2" => {
            let model = backend_candle::Llama::load(&files, &backend_candle::Device::Cpu)?;
            g.log(&format!("loaded {spec} to decode directions"));
            Ok(Box::new(ModelDecoder { model, tokenizer }))
        }
        other => bail!("cannot load a {other} model in this build"),
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
    let files = crate::compute::results_files(&args.dir)?;
    let results = files.iter().map(|f| read_results(f)).collect::<Result<Vec<_>>>()?;
    let decoder = if args.no_model || args.top_k == 0 {
        None
    } else {
        match load_decoder(&args.dir, g) {
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
        let seq = r.get("sequence").map_or(0.0, |s| s.1[0]) as usize;
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
                "{}  seq {seq}  layer {layer}  position {position}  token {}",
                file.file_name().map(|x| x.to_string_lossy().into_owned()).unwrap_or_default(),
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
            let Some(dec) = &decoder else { continue };
            for k in 0..args.top_k.min(d) {
                let v: Vec<f64> = (0..d).map(|j| s.eigenvectors.get(j, k)).collect();
                let (dz, p) = dec.logit_change(&tokens, layer, position, &v)?;
                let mean: f64 = p.iter().zip(&dz).map(|(p, z)| p * z).sum();
                let dp: Vec<f64> = p.iter().zip(&dz).map(|(p, z)| p * (z - mean)).collect();
                let mut order: Vec<usize> = (0..dp.len()).collect();
                order.sort_by(|&a, &b| dp[b].total_cmp(&dp[a]));
                let fmt = |ids: &mut dyn Iterator<Item = &usize>| {
                    ids.take(args.tokens_per_direction)
                        .map(|&y| format!("{} ({:+.3})", dec.decode(y as u32), dp[y]))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!("  v{} (λ = {:.4e})", k + 1, s.eigenvalues[k]);
                println!("    +v pushes up: {}", fmt(&mut order.iter()));
                println!("    −v pushes up: {}", fmt(&mut order.iter().rev()));
            }
        }
    }
    Ok(())
}
