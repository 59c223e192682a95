//! `compute --sae PATH`: sparse-autoencoder features through the Fisher matrix.
//!
//! A residual-stream SAE at split layer `k` encodes `h = h_k[t]` into feature activations
//! `a = σ((h − c·b_dec) W_enc + b_enc)` (`σ` = ReLU, or JumpReLU `x·[x > θ]`; `c` = 1 when
//! the SAE subtracts its decoder bias first) and decodes `ĥ = Σ_i a_i w_i + b_dec`, `w_i` the
//! `i`-th row of `W_dec`. Per analysed position this module reports, for every active feature
//! (`a_i > 0`):
//!
//! * its Fisher sensitivity `s_i = w_iᵀ F w_i`: the KL cost per unit² of moving `h` along its
//!   decoder direction (`KL(p ‖ p(h + ε w_i)) ≈ ½ ε² s_i`);
//! * the second-order KL cost of ablating it, `½ a_i² s_i` (the step `h → h − a_i w_i`), next
//!   to the KL measured by actually ablating it: `KL(p ‖ p(h − a_i w_i))` through the model's
//!   upper half ([`SplitModel::upper_logits`]) — the two agree while `a_i w_i` is small;
//! * and the top eigenvectors `v_k` of `F` in feature space: the features whose decoder
//!   directions are most aligned with `v_k` (largest `|cos(v_k, w_i)|` over all features).
//!
//! Two layouts are read: SAELens (`cfg.json` + `sae_weights.safetensors` with `W_enc`
//! `[d_in, d_sae]`, `b_enc`, `W_dec` `[d_sae, d_in]`, `b_dec`, optional `threshold` or
//! `log_threshold` for JumpReLU; `hook_name` names the activation it was trained on), and
//! Gemma Scope (`params.npz` with the same arrays and `threshold`; JumpReLU without subtracting
//! `b_dec`; the layer from a `layer_N` path component: Gemma Scope's residual SAEs read the
//! output of block `N`, `blocks.N.hook_resid_post`).

use crate::layers::{resolve_layer, NamedLayer};
use crate::npz::read_npz;
use crate::results::{Array, SaeFeature, SaeFeatureCosine, SaeSummary};
use anyhow::{bail, Context, Result};
use fs_estimators::{kl_from_logits, Matrix, Scalar, Spectrum, SplitModel};
use std::path::{Path, PathBuf};

/// How many features are listed per eigenvector in feature space.
pub const FEATURES_PER_EIGENVECTOR: usize = 5;

/// The array `name` of an SAE file (`layout` names its conventions in the message).
fn named(
    arrays: &[(String, Array)],
    name: &str,
    file: &Path,
    layout: &str,
) -> Result<(Vec<usize>, Vec<f64>)> {
    arrays
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| (a.shape.clone(), a.data.clone()))
        .with_context(|| {
            format!(
                "{} has no array {name} ({layout} names: W_enc, b_enc, W_dec, b_dec, threshold)",
                file.display()
            )
        })
}

/// A residual-stream sparse autoencoder, in `f64`.
#[derive(Clone, Debug)]
pub struct Sae {
    /// `d_in` (must equal the model's `d`).
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// `W_enc`, `d_in × d_sae`, row-major.
    pub w_enc: Vec<f64>,
    /// `b_enc`, `d_sae`.
    pub b_enc: Vec<f64>,
    /// `W_dec`, `d_sae × d_in`, row-major: row `i` is feature `i`'s decoder direction.
    pub w_dec: Vec<f64>,
    /// `b_dec`, `d_in`.
    pub b_dec: Vec<f64>,
    /// JumpReLU thresholds `θ`, `d_sae` (`None`: ReLU).
    pub threshold: Option<Vec<f64>>,
    /// Whether the encoder subtracts `b_dec` first (SAELens `apply_b_dec_to_input`).
    pub subtract_b_dec: bool,
    /// The TransformerLens hook it was trained on, when the files say.
    pub hook: Option<String>,
    /// `saelens` or `gemma-scope`.
    pub layout: &'static str,
    /// The file the weights came from.
    pub weights: PathBuf,
}

impl Sae {
    /// Read an SAE from `path`: a SAELens directory (`cfg.json` + `sae_weights.safetensors`), a
    /// Gemma Scope `params.npz` or the directory holding it.
    pub fn load(path: &Path) -> Result<Sae> {
        let npz = if path.is_file() { Some(path.to_path_buf()) } else { None };
        let npz = npz.or_else(|| Some(path.join("params.npz")).filter(|p| p.is_file()));
        if let Some(npz) = npz {
            return Self::load_gemma_scope(&npz);
        }
        let cfg = path.join("cfg.json");
        let weights = path.join("sae_weights.safetensors");
        if !path.exists() {
            bail!("--sae {}: no such file or directory: give a SAELens directory (cfg.json + sae_weights.safetensors) or a Gemma Scope params.npz", path.display());
        }
        if !cfg.is_file() || !weights.is_file() {
            bail!("--sae {}: neither params.npz (Gemma Scope) nor cfg.json + sae_weights.safetensors (SAELens) is there", path.display());
        }
        Self::load_saelens(&cfg, &weights)
    }

    fn load_saelens(cfg_path: &Path, weights: &Path) -> Result<Sae> {
        let text = std::fs::read_to_string(cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
        let get = |key: &str| cfg.get(key).or_else(|| cfg.get("metadata").and_then(|m| m.get(key)));
        let architecture = get("architecture").and_then(|v| v.as_str()).unwrap_or("standard");
        if !matches!(architecture, "standard" | "jumprelu") {
            bail!("{}: SAE architecture {architecture:?} is not supported: fisher-stein reads standard (ReLU) and jumprelu SAEs", cfg_path.display());
        }
        if let Some(f) = get("activation_fn_str").and_then(|v| v.as_str()) {
            if f != "relu" {
                bail!("{}: activation_fn_str {f:?} is not supported: fisher-stein reads ReLU / JumpReLU SAEs", cfg_path.display());
            }
        }
        if let Some(n) = get("normalize_activations").and_then(|v| v.as_str()) {
            if n != "none" {
                bail!("{}: normalize_activations {n:?} rescales the input; only \"none\" is supported", cfg_path.display());
            }
        }
        let subtract_b_dec = get("apply_b_dec_to_input")
            .and_then(|v| v.as_bool())
            .unwrap_or(architecture == "standard");
        let hook = get("hook_name").and_then(|v| v.as_str()).map(str::to_string);
        let bytes =
            std::fs::read(weights).with_context(|| format!("reading {}", weights.display()))?;
        let arrays = crate::results::safetensors_arrays(&bytes).map_err(|e| {
            anyhow::anyhow!("{} is not a readable safetensors file ({e}): only F32 and F64 SAE weights are read", weights.display())
        })?;
        let tensor = |name: &str| named(&arrays, name, weights, "SAELens");
        let threshold = if architecture == "jumprelu" {
            Some(match tensor("threshold") {
                Ok((_, t)) => t,
                Err(_) => tensor("log_threshold")?.1.into_iter().map(f64::exp).collect(),
            })
        } else {
            None
        };
        let (enc_shape, w_enc) = tensor("W_enc")?;
        let (_, b_enc) = tensor("b_enc")?;
        let (dec_shape, w_dec) = tensor("W_dec")?;
        let (_, b_dec) = tensor("b_dec")?;
        let sae = Sae {
            d_in: enc_shape.first().copied().unwrap_or(0),
            d_sae: enc_shape.get(1).copied().unwrap_or(0),
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            threshold,
            subtract_b_dec,
            hook,
            layout: "saelens",
            weights: weights.to_path_buf(),
        };
        sae.check_shapes(&enc_shape, &dec_shape)?;
        for (key, want) in [("d_in", sae.d_in), ("d_sae", sae.d_sae)] {
            if let Some(n) = get(key).and_then(|v| v.as_u64()) {
                if n as usize != want {
                    bail!("{}: {key} = {n} but the weights have {want}", cfg_path.display());
                }
            }
        }
        Ok(sae)
    }

    fn load_gemma_scope(npz: &Path) -> Result<Sae> {
        let bytes = std::fs::read(npz).with_context(|| format!("reading {}", npz.display()))?;
        let arrays: Vec<(String, Array)> = read_npz(&bytes)
            .with_context(|| format!("{} is not a readable .npz", npz.display()))?
            .into_iter()
            .map(|(name, a)| (name, Array { shape: a.shape, data: a.data }))
            .collect();
        let take = |name: &str| named(&arrays, name, npz, "Gemma Scope");
        let (enc_shape, w_enc) = take("W_enc")?;
        let (dec_shape, w_dec) = take("W_dec")?;
        // Gemma Scope's residual SAEs sit at `…/layer_N/…` and read the output of block N.
        let hook = npz.components().rev().find_map(|c| {
            let s = c.as_os_str().to_str()?;
            let n: usize = s.strip_prefix("layer_")?.parse().ok()?;
            Some(format!("blocks.{n}.hook_resid_post"))
        });
        let sae = Sae {
            d_in: enc_shape.first().copied().unwrap_or(0),
            d_sae: enc_shape.get(1).copied().unwrap_or(0),
            w_enc,
            b_enc: take("b_enc")?.1,
            w_dec,
            b_dec: take("b_dec")?.1,
            threshold: Some(take("threshold")?.1),
            subtract_b_dec: false,
            hook,
            layout: "gemma-scope",
            weights: npz.to_path_buf(),
        };
        sae.check_shapes(&enc_shape, &dec_shape)?;
        Ok(sae)
    }

    fn check_shapes(&self, enc: &[usize], dec: &[usize]) -> Result<()> {
        let (d, n) = (self.d_in, self.d_sae);
        let ok = enc.len() == 2
            && d > 0
            && n > 0
            && dec == [n, d]
            && self.b_enc.len() == n
            && self.b_dec.len() == d
            && self.threshold.as_ref().is_none_or(|t| t.len() == n);
        if !ok {
            bail!(
                "{}: SAE shapes do not fit together (W_enc {enc:?}, W_dec {dec:?}, b_enc [{}], b_dec [{}]{}): expected W_enc [d_in, d_sae], W_dec [d_sae, d_in]",
                self.weights.display(),
                self.b_enc.len(),
                self.b_dec.len(),
                self.threshold.as_ref().map(|t| format!(", threshold [{}]", t.len())).unwrap_or_default()
            );
        }
        if [&self.w_enc, &self.w_dec, &self.b_enc, &self.b_dec]
            .into_iter()
            .chain(self.threshold.as_ref())
            .any(|v| v.iter().any(|x| !x.is_finite()))
        {
            bail!("{}: the SAE weights hold NaN or infinity", self.weights.display());
        }
        Ok(())
    }

    /// Check the SAE against the run: its width is the model's `d`, the run analyses one layer,
    /// and the layer the SAE was trained on (its hook name, when the files give one) is that
    /// layer.
    pub fn check_run(
        &self,
        path: &Path,
        layers: &[usize],
        d_model: usize,
        n_layers: usize,
        model_type: &str,
    ) -> Result<()> {
        if self.d_in != d_model {
            bail!("--sae {}: the SAE reads {}-dimensional activations but this model's d is {d_model}: use an SAE trained on this model", path.display(), self.d_in);
        }
        if layers.len() != 1 {
            bail!(
                "--sae {} analyses one layer: give --layer (the SAE's), not {} layers",
                path.display(),
                layers.len()
            );
        }
        let Some(hook) = &self.hook else {
            return Ok(());
        };
        let NamedLayer { index, .. } = resolve_layer(hook, n_layers, model_type, "the SAE's hook")
            .with_context(|| format!("--sae {}: the SAE was trained on {hook}, which is not the residual stream at a split layer of this model (fisher-stein analyses residual-stream SAEs)", path.display()))?;
        if index != layers[0] {
            bail!(
                "--sae {}: the SAE was trained on {hook} (split layer {index}) but the run analyses layer {}: pass --layer {index} (or --hook {hook}), or an SAE of layer {}",
                path.display(),
                layers[0],
                layers[0]
            );
        }
        Ok(())
    }

    /// Feature activations `a = σ((h − c·b_dec) W_enc + b_enc)` of an activation `h`.
    pub fn encode(&self, h: &[f64]) -> Vec<f64> {
        let (d, n) = (self.d_in, self.d_sae);
        let mut pre = self.b_enc.clone();
        for (j, (&hj, &bj)) in h.iter().zip(&self.b_dec).enumerate().take(d) {
            let x = hj - if self.subtract_b_dec { bj } else { 0.0 };
            if x == 0.0 {
                continue;
            }
            let row = &self.w_enc[j * n..(j + 1) * n];
            for (p, w) in pre.iter_mut().zip(row) {
                *p += x * w;
            }
        }
        for (i, p) in pre.iter_mut().enumerate() {
            let on = match &self.threshold {
                Some(t) => *p > t[i] && *p > 0.0,
                None => *p > 0.0,
            };
            if !on {
                *p = 0.0;
            }
        }
        pre
    }

    /// Feature `i`'s decoder direction `w_i` (length `d`).
    pub fn decoder(&self, i: usize) -> &[f64] {
        &self.w_dec[i * self.d_in..(i + 1) * self.d_in]
    }
}

/// The SAE read-out at `position` of `ctx` with the Fisher matrix `f` and its `spectrum`
/// (`k` eigenvectors expressed in feature space).
pub fn analyse<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    f: &Matrix<f64>,
    spectrum: &Spectrum,
    k: usize,
    sae: &Sae,
) -> Result<SaeSummary> {
    let d = sae.d_in;
    let h_s = model.activation(ctx, position)?;
    let h: Vec<f64> = h_s.iter().map(|x| x.as_f64()).collect();
    let acts = sae.encode(&h);
    let z0 = model.upper_logits(ctx, position, &h_s)?;
    let mut features = Vec::new();
    for (i, &a) in acts.iter().enumerate().filter(|(_, a)| **a > 0.0) {
        let w = sae.decoder(i);
        let mut fw = vec![0.0f64; d];
        for (r, out) in fw.iter_mut().enumerate() {
            *out = (0..d).map(|c| f.get(r, c) * w[c]).sum();
        }
        let sensitivity: f64 = w.iter().zip(&fw).map(|(x, y)| x * y).sum();
        let ablated: Vec<M::Scalar> =
            h.iter().zip(w).map(|(x, wi)| M::Scalar::round_from_f64(x - a * wi)).collect();
        let z1 = model.upper_logits(ctx, position, &ablated)?;
        features.push(SaeFeature {
            index: i,
            activation: a,
            sensitivity,
            kl_second_order: 0.5 * a * a * sensitivity,
            kl_ablation: kl_from_logits(&z0, &z1)?,
        });
    }
    features.sort_by(|a, b| b.kl_second_order.total_cmp(&a.kl_second_order));
    let norms: Vec<f64> =
        (0..sae.d_sae).map(|i| sae.decoder(i).iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let k = k.min(spectrum.eigenvectors.cols());
    let eigenvector_features = (0..k)
        .map(|c| {
            let mut cos: Vec<(usize, f64)> = (0..sae.d_sae)
                .filter(|&i| norms[i] > 0.0)
                .map(|i| {
                    let w = sae.decoder(i);
                    let dot: f64 = (0..d).map(|r| w[r] * spectrum.eigenvectors.get(r, c)).sum();
                    (i, dot / norms[i])
                })
                .collect();
            cos.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
            cos.truncate(FEATURES_PER_EIGENVECTOR);
            cos.into_iter().map(|(index, cosine)| SaeFeatureCosine { index, cosine }).collect()
        })
        .collect();
    Ok(SaeSummary { n_active: features.len(), features, eigenvector_features })
}
