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
use crate::dataset::{print_mean_summary, MeanState, MEAN_FILE};
use crate::readouts::{print_layer_summary, token_text};
use crate::results::{
    finite, read_results, results_files, Array, MeanSummaryRow, MetadataView, PositionSummary,
    TokenEffect,
};
use crate::Globals;
use anyhow::{bail, Context, Result};
use fs_estimators::{Matrix, SplitModel};
use std::path::PathBuf;

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
        token_text(self.tokenizer.as_ref(), id)
    }
}

/// Loads the model named in metadata.json on the chosen engine as a [`DirectionDecoder`].
struct DecoderJob;

impl ModelJob for DecoderJob {
    type Output = Box<dyn DirectionDecoder>;
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<Self::Output> {
        let tokenizer = match loaded.tokenizer {
            Some(t) => Some(t),
            None => fs_checkpoint::load_tokenizer(&loaded.files.tokenizer).ok(),
        };
        Ok(Box::new(ModelDecoder { model, tokenizer }))
    }
}

fn load_decoder(args: &InspectArgs, g: &Globals) -> Result<Box<dyn DirectionDecoder>> {
    let meta_path = args.dir.join("metadata.json");
    let meta = MetadataView::from_json(
        &std::fs::read(&meta_path)
            .with_context(|| format!("cannot read {}", meta_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
    let spec = meta
        .model
        .as_ref()
        .and_then(|m| m.spec.as_deref())
        .context("metadata.json names no model")?;
    let load = LoadSpec { model: spec, backend: args.backend, device: &args.device, batch: None };
    let decoder = with_model(&load, g, DecoderJob)?;
    g.log(&format!("loaded {spec} on {} to decode directions", args.backend.name()));
    Ok(decoder)
}

/// Print stored read-outs (`compute --directions K`) of one summary entry.
fn print_stored_directions(summary: &PositionSummary, top_k: usize, n: usize) {
    // Numbers as metadata.json holds them: a non-finite value reads as NaN (a `dp` as 0).
    let num = |x: f64| finite(x).unwrap_or(f64::NAN);
    for d in summary.directions.iter().flatten().take(top_k) {
        let toks = |v: &[TokenEffect]| {
            v.iter()
                .take(n)
                .map(|t| format!("{} ({:+.3})", t.token, finite(t.dp).unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // Attention read-outs name the keys a direction moves attention toward.
        let attention = d.up.iter().chain(&d.down).any(|t| t.key.is_some());
        let (verb, p) = if attention { ("moves attention to", "a") } else { ("pushes up", "p") };
        println!(
            "  v{} (λ = {:.4e}, hᵀv = {:.4})  KL({p}‖{p}(h+εv)) {:.4e} vs ½ε²vᵀFv {:.4e} (ratio {:.3}, ε {:.3e})",
            d.k,
            num(d.eigenvalue),
            num(d.projection),
            num(d.kl),
            num(d.kl_quadratic),
            num(d.kl_ratio),
            num(d.epsilon),
        );
        println!("    +v {verb}: {}", toks(&d.up));
        println!("    −v {verb}: {}", toks(&d.down));
    }
}

/// The SAE read-out of one position (`compute --sae`): the features costliest to ablate and the
/// top eigenvectors in feature space.
fn print_sae(summary: &PositionSummary, top_k: usize) {
    let Some(sae) = &summary.sae else { return };
    let num = |x: f64| finite(x).unwrap_or(f64::NAN);
    println!(
        "  SAE: {} active feature(s); costliest to ablate (½a²wᵀFw, second order, vs the KL measured by ablating):",
        sae.n_active
    );
    for f in sae.features.iter().take(5) {
        println!(
            "    #{:<6} a {:.4}  wᵀFw {:.4e}  ½a²wᵀFw {:.4e}  KL(p‖p(h−aw)) {:.4e}",
            f.index,
            num(f.activation),
            num(f.sensitivity),
            num(f.kl_second_order),
            num(f.kl_ablation)
        );
    }
    for (k, feats) in sae.eigenvector_features.iter().enumerate().take(top_k.max(1)) {
        let list: Vec<String> =
            feats.iter().map(|f| format!("#{} ({:+.3})", f.index, num(f.cosine))).collect();
        println!(
            "  v{} in feature space (cos with decoder directions): {}",
            k + 1,
            list.join(", ")
        );
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
    if !args.dir.join("metadata.json").exists() && args.dir.join(crate::steer::STEER_FILE).is_file()
    {
        // A `steer` directory: its table, the summary recomputed from the per-pair results.
        print!("{}", crate::steer::steer_table(&crate::steer::read_report(&args.dir)?));
        return Ok(());
    }
    let has_mean = args.dir.join(MEAN_FILE).is_file();
    let meta = std::fs::read(args.dir.join("metadata.json"))
        .ok()
        .and_then(|b| MetadataView::from_json(&b).ok())
        .unwrap_or_default();
    let stored = |seq: usize, layer: usize, position: usize| {
        meta.summary.iter().find(|s| {
            s.sequence == seq
                && s.layer == layer
                && s.position == position
                && s.directions.is_some()
        })
    };
    let files = match results_files(&args.dir) {
        Ok(f) => f,
        Err(_) if has_mean => Vec::new(),
        Err(e) => return Err(e),
    };
    let results = files.iter().map(|f| read_results(f)).collect::<Result<Vec<_>>>()?;
    let all_stored = results.iter().all(|r| r.has_directions());
    // The model decodes next-token effects; an attention run's eigenvectors are read out only by
    // `compute --directions` (keys, not tokens).
    let attention = meta.distribution.as_deref().is_some_and(|d| d != "next-token");
    if attention && !all_stored && args.top_k > 0 && !args.no_model && !files.is_empty() {
        eprintln!(
            "note: directions not decoded: this run's Fisher is of {} (rerun compute with --directions to read out the keys)",
            meta.distribution.as_deref().unwrap_or_default()
        );
    }
    let decoder = if args.no_model || args.top_k == 0 || files.is_empty() || all_stored || attention
    {
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
        let (n, d) = (r.n(), r.d());
        let tokens = r.token_ids();
        let seq = r.sequence();
        let name = file.file_name().map(|x| x.to_string_lossy().into_owned()).unwrap_or_default();
        for i in 0..n {
            let layer = r.layer(i);
            let position = r.position(i);
            let (s, trace_se) = r.spectrum(i, args.top_k)?;
            let entropy =
                r.entropy().map(|e| format!("{:.4}", e.data[i])).unwrap_or_else(|| "n/a".into());
            println!(
                "{name}  seq {seq}  layer {layer}  position {position}  token {}",
                tokens.get(position).map_or("?".into(), |t| t.to_string())
            );
            if r.is_top_k() {
                let se = crate::compute::trace_error_note(trace_se);
                println!(
                    "  entropy {entropy}  trace {:.4e}{se}  top-{} eigenpairs (--estimator top-k: no effective rank)",
                    s.trace,
                    s.eigenvalues.len()
                );
            } else {
                println!(
                    "  entropy {entropy}  trace {:.4e}  effective rank {:.2}  participation ratio {:.2}",
                    s.trace, s.effective_rank, s.participation_ratio
                );
            }
            println!(
                "  top eigenvalues {}",
                s.eigenvalues
                    .iter()
                    .take(5)
                    .map(|x| format!("{x:.4e}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
            if let Some(st) = meta.summary.iter().find(|s| {
                s.sequence == seq && s.layer == layer && s.position == position && s.sae.is_some()
            }) {
                print_sae(st, args.top_k);
            }
            if args.top_k == 0 || args.no_model {
                continue;
            }
            if let Some(st) = stored(seq, layer, position) {
                print_stored_directions(st, args.top_k, args.tokens_per_direction);
                continue;
            }
            let Some(dec) = &decoder else { continue };
            let k = args.top_k.min(s.eigenvalues.len());
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
        if let Some(Array { shape: ps, data: p }) = r.projections() {
            let k = ps.get(1).copied().unwrap_or(0);
            println!("{name}  projections hᵀv_i on the top eigenvectors of each position's F:");
            let header: Vec<String> =
                (1..=k).map(|c| format!("{:>10}", format!("hᵀv{c}"))).collect();
            println!("  layer  position  {}", header.join(" "));
            for i in 0..ps[0] {
                let row: Vec<String> = (0..k).map(|c| format!("{:>10.4}", p[i * k + c])).collect();
                println!("  {:>5}  {:>8}  {}", r.layer(i), r.position(i), row.join(" "));
            }
        }
    }
    if meta.layer_summary.len() > 1 {
        println!("layer sweep:");
        print_layer_summary(&meta.layer_summary);
    }
    if has_mean {
        let state = MeanState::read(&args.dir.join(MEAN_FILE))?;
        let rows: Vec<MeanSummaryRow> = state.summary()?.into_iter().map(|(r, _)| r).collect();
        println!("{MEAN_FILE} ({} sequence(s), shard {}):", state.sequences.len(), state.shard);
        print_mean_summary(&rows);
    }
    Ok(())
}
