//! `fisher-stein report DIR`: one self-contained HTML page about a results directory (written by
//! `compute` or `merge`): the run's settings, the layer sweep, the mean Fisher per layer, three
//! plots (inline SVG; the same plots are written as PNG and SVG files under `DIR/plots/`), and
//! per analysed position the spectrum summary, the decoded top directions with their KL check,
//! and the projections `hᵀv`. No scripts, no external URLs.

use crate::dataset::{MeanState, MEAN_FILE};
use crate::output::write_atomic;
use crate::plots::{self, Plot, RankRow};
use crate::readouts::layer_summary;
use crate::results::{
    finite, json_text, read_results, results_files, LayerSummaryRow, MetadataView, PositionSummary,
    TokenEffect,
};
use crate::Globals;
use anyhow::{bail, Context, Result};
use fs_estimators::{spectrum, FisherAccumulator, Matrix};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `fisher-stein report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A results directory written by `compute` (or `merge`).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Where to write the HTML page (default DIR/report.html).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Show the decoded directions of at most this many analysed positions.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub max_positions: usize,
}

/// HTML-escape text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A number for a table; "–" for one metadata.json cannot hold (NaN, infinity: `null`).
fn num(x: f64, digits: usize) -> String {
    match finite(x) {
        Some(x) if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) => format!("{x:.digits$e}"),
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

/// [`num`] in scientific notation.
fn sci(x: f64) -> String {
    finite(x).map_or("–".into(), |x| format!("{x:.3e}"))
}

/// Per-layer eigenvalues, effective ranks of the mean Fisher, and what the spectra are of.
type LayerSpectra = (Vec<(usize, Vec<f64>)>, BTreeMap<usize, f64>, String);

/// Per layer: the eigenvalues of the mean Fisher, from mean.safetensors when the directory has
/// one (exact f64 sums), else streamed over the results files (one file in memory at a time).
fn layer_spectra(dir: &Path, has_mean: bool) -> Result<LayerSpectra> {
    let mut out = Vec::new();
    let mut eff = BTreeMap::new();
    if has_mean {
        let state = MeanState::read(&dir.join(MEAN_FILE))?;
        for (row, eig) in state.summary()? {
            eff.insert(row.layer, finite(row.effective_rank).unwrap_or(f64::NAN));
            out.push((row.layer, eig));
        }
        return Ok((out, eff, "the mean Fisher (mean.safetensors)".into()));
    }
    let files = results_files(dir)?;
    let mut accs: BTreeMap<usize, FisherAccumulator> = BTreeMap::new();
    // --estimator top-k files hold eigenpairs, not matrices: their per-position top-K
    // eigenvalues are averaged instead (sum and count per layer).
    let mut top_k: BTreeMap<usize, (Vec<f64>, usize)> = BTreeMap::new();
    for f in &files {
        let r = read_results(f)?;
        let d = r.d();
        for i in 0..r.n() {
            match r.matrix(i) {
                Some(m) => {
                    let m = Matrix::from_vec(d, d, m.to_vec())?;
                    accs.entry(r.layer(i))
                        .or_insert_with(|| FisherAccumulator::new(d))
                        .add(&m, 0.0)?;
                }
                None => {
                    let (values, _) =
                        r.eigenpairs(i).unwrap_or_else(|| unreachable!("checked on read"));
                    let (sum, n) =
                        top_k.entry(r.layer(i)).or_insert_with(|| (vec![0.0; values.len()], 0));
                    sum.iter_mut().zip(values).for_each(|(s, v)| *s += v);
                    *n += 1;
                }
            }
        }
    }
    if !top_k.is_empty() {
        for (layer, (sum, n)) in top_k {
            out.push((layer, sum.into_iter().map(|s| s / n as f64).collect()));
        }
        return Ok((out, eff, "the top-K eigenvalues of F (--estimator top-k; the mean over the analysed positions where there are several)".into()));
    }
    for (layer, acc) in accs {
        if let Some(m) = acc.mean() {
            let s = spectrum(&m, None)?;
            if acc.count() > 1 {
                eff.insert(layer, s.effective_rank);
            }
            out.push((layer, s.eigenvalues));
        }
    }
    Ok((out, eff, "F (the mean over the analysed positions where there are several)".into()))
}

/// Run `report`.
pub fn run(args: ReportArgs, g: &Globals) -> Result<()> {
    let dir = &args.dir;
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: give the --output directory of a compute or merge run",
            dir.display()
        );
    }
    let meta_path = dir.join("metadata.json");
    if !meta_path.exists() && dir.join(crate::steer::STEER_FILE).is_file() {
        return steering_report(&args, g);
    }
    let meta = MetadataView::from_json(&std::fs::read(&meta_path).with_context(|| {
        format!(
            "cannot read {}: point report at a finished compute or merge directory",
            meta_path.display()
        )
    })?)
    .with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
    let has_mean = dir.join(MEAN_FILE).is_file();
    let (spectra, mean_eff, spectra_what) = layer_spectra(dir, has_mean)?;
    let summary = &meta.summary;
    let sweep = match &meta.layer_summary {
        rows if !rows.is_empty() => rows.clone(),
        _ => layer_summary(summary),
    };
    let layers: Vec<usize> = sweep.iter().map(|r| r.layer).collect();

    let mut plot_list: Vec<Plot> = Vec::new();
    if !spectra.is_empty() {
        plot_list.push(plots::spectra(&spectra, &spectra_what)?);
    }
    let mut rank_rows: Vec<RankRow> = sweep
        .iter()
        .map(|r| RankRow {
            layer: r.layer,
            effective_rank: finite(r.mean_effective_rank).unwrap_or(f64::NAN),
            participation_ratio: finite(r.mean_participation_ratio).unwrap_or(f64::NAN),
            mean_fisher_effective_rank: mean_eff.get(&r.layer).copied(),
        })
        .collect();
    if rank_rows.is_empty() {
        rank_rows = mean_eff
            .iter()
            .map(|(&layer, &e)| RankRow {
                layer,
                effective_rank: f64::NAN,
                participation_ratio: f64::NAN,
                mean_fisher_effective_rank: Some(e),
            })
            .collect();
    }
    rank_rows.retain(|r| r.effective_rank.is_finite() || r.mean_fisher_effective_rank.is_some());
    if !rank_rows.is_empty() {
        plot_list.push(plots::effective_rank(&rank_rows)?);
    }
    let points: Vec<(usize, f64, f64)> = summary
        .iter()
        .filter_map(|s| Some((s.layer, finite(s.entropy)?, finite(s.trace)?)))
        .collect();
    if !points.is_empty() {
        plot_list.push(plots::entropy_trace(&points, &layers)?);
    }
    let plot_dir = write_plots(dir, &plot_list)?;

    let html = page(&meta, summary, &sweep, &plot_list, args.max_positions);
    let out = args.output.clone().unwrap_or_else(|| dir.join("report.html"));
    write_atomic(&out, html.as_bytes())?;
    g.log(&format!("{} plots written to {}", plot_list.len(), plot_dir.display()));
    if !g.quiet {
        eprintln!(
            "wrote {} ({} plots, PNG + SVG in {})",
            out.display(),
            plot_list.len(),
            plot_dir.display()
        );
    }
    Ok(())
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}\
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{margin-bottom:.3em}\
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.88em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}\
th{background:#f3f3f3}td.l,th.l{text-align:left}code{background:#f5f5f5;padding:0 3px}\
figure{margin:1em 0}figure svg{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.9em;color:#555}\
.up{color:#0a6b2c}.down{color:#a0182b}.muted{color:#777}";

fn page(
    meta: &MetadataView,
    summary: &[PositionSummary],
    layer_summary: &[LayerSummaryRow],
    plots: &[Plot],
    max_positions: usize,
) -> String {
    let mut h = String::new();
    let model = meta.model_spec().unwrap_or("?");
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fisher-stein report: {}</title><style>{STYLE}</style></head><body>\n",
        esc(model)
    );
    let _ = write!(h, "<h1>Fisher information report</h1>\n<p>F = Jᵀ(diag p − ppᵀ)J of the next-token distribution p with respect to the layer-k activation h = h<sub>k</sub>[t]. Its top eigenvectors are the directions in activation space the prediction is most sensitive to.</p>\n");
    // Run settings.
    h.push_str("<h2>Run</h2><table>");
    let mut row = |k: &str, v: String| {
        let _ = write!(h, "<tr><th class=\"l\">{k}</th><td class=\"l\">{v}</td></tr>");
    };
    row(
        "model",
        format!(
            "<code>{}</code> ({})",
            esc(model),
            esc(meta.model.as_ref().and_then(|m| m.architecture.as_deref()).unwrap_or("?"))
        ),
    );
    // Values as their JSON (`null` when missing).
    row("layers", esc(&json_text(&meta.layers)));
    row("d", json_text(&meta.d_model));
    row("sequences", json_text(&meta.n_sequences));
    row("estimator", format!("<code>{}</code>", esc(&json_text(&meta.estimator()))));
    if let Some(t) = &meta.text {
        row("text", esc(t));
    }
    if let Some(m) = &meta.merged_from {
        row("merged from", format!("{} accumulator(s)", m.len()));
    }
    row(
        "backend",
        format!(
            "{} on {}",
            esc(meta.backend.as_deref().unwrap_or("–")),
            esc(meta.device.as_deref().unwrap_or("–"))
        ),
    );
    row("tool", format!("fisher-stein {}", esc(meta.version.as_deref().unwrap_or("?"))));
    h.push_str("</table>\n");

    if !layer_summary.is_empty() {
        h.push_str("<h2>Layer sweep</h2><p>Means over the analysed positions of each layer.</p><table><tr><th>layer</th><th>positions</th><th>mean entropy</th><th>mean tr F</th><th class=\"l\">mean top eigenvalues</th><th>mean eff. rank</th><th>mean part. ratio</th></tr>");
        for r in layer_summary {
            let top = r.mean_top_eigenvalues.iter().map(|&x| sci(x)).collect::<Vec<_>>().join(", ");
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{top}</td><td>{}</td><td>{}</td></tr>",
                r.layer, r.positions, num(r.mean_entropy, 4), sci(r.mean_trace), num(r.mean_effective_rank, 2), num(r.mean_participation_ratio, 2)
            );
        }
        h.push_str("</table>\n");
    }
    if let Some(rows) = meta.mean_summary.as_ref().filter(|a| !a.is_empty()) {
        h.push_str("<h2>Dataset mean</h2><p>Spectrum of the mean Fisher F̄ = (1/n) Σ F over every analysed position and sequence (compensated f64 sums).</p><table><tr><th>layer</th><th>matrices</th><th>mean entropy</th><th>tr F̄</th><th class=\"l\">top eigenvalues</th><th>eff. rank</th><th>part. ratio</th></tr>");
        for r in rows {
            let top = r.top_eigenvalues.iter().map(|&x| sci(x)).collect::<Vec<_>>().join(", ");
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{top}</td><td>{}</td><td>{}</td></tr>",
                r.layer, r.count, num(r.mean_entropy.unwrap_or(f64::NAN), 4), sci(r.trace), num(r.effective_rank, 2), num(r.participation_ratio, 2)
            );
        }
        h.push_str("</table>\n");
    }

    if !plots.is_empty() {
        h.push_str("<h2>Plots</h2>\n");
        for p in plots {
            let _ = write!(h, "<figure id=\"plot-{}\">{}<figcaption>{} (also <code>plots/{}.png</code>, <code>.svg</code>)</figcaption></figure>", p.name, strip_xml_decl(&p.svg), esc(&p.caption), p.name);
        }
    }

    // Per-position tables.
    h.push_str("<h2>Positions</h2>\n");
    if summary.is_empty() {
        h.push_str("<p class=\"muted\">No per-position summaries in this directory.</p>");
    }
    let with_dirs = summary.iter().any(|s| s.directions.is_some());
    let token = |s: &PositionSummary| {
        s.token.as_deref().map(esc).unwrap_or_else(|| format!("#{}", s.token_id))
    };
    if !with_dirs && !summary.is_empty() {
        h.push_str("<p class=\"muted\">Directions were not decoded: run <code>compute --directions K</code> to add the tokens the top eigenvectors push up and down, the KL check and the projections.</p>");
    }
    h.push_str("<table><tr><th>seq</th><th>layer</th><th>position</th><th class=\"l\">token</th><th>entropy</th><th>tr F</th><th class=\"l\">top eigenvalues</th><th>eff. rank</th><th>part. ratio</th></tr>");
    for s in summary {
        let top = s.top_eigenvalues.iter().take(3).map(|&x| sci(x)).collect::<Vec<_>>().join(", ");
        let tok = token(s);
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{tok}</td><td>{}</td><td>{}</td><td class=\"l\">{top}</td><td>{}</td><td>{}</td></tr>",
            s.sequence, s.layer, s.position, num(s.entropy, 4), sci(s.trace), num(s.effective_rank, 2), num(s.participation_ratio, 2)
        );
    }
    h.push_str("</table>\n");

    if with_dirs {
        // Projections.
        h.push_str("<h2>Projections</h2><p>Coordinates hᵀv<sub>i</sub> of the activation on the top eigenvectors of its own Fisher matrix.</p><table><tr><th>seq</th><th>layer</th><th>position</th><th class=\"l\">token</th>");
        let k = summary
            .iter()
            .filter_map(|s| s.directions.as_ref().map(|a| a.len()))
            .max()
            .unwrap_or(0);
        for i in 1..=k {
            let _ = write!(h, "<th>hᵀv{i}</th>");
        }
        h.push_str("</tr>");
        for s in summary.iter().filter(|s| s.directions.is_some()) {
            let tok = token(s);
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{tok}</td>",
                s.sequence, s.layer, s.position
            );
            for d in s.directions.iter().flatten() {
                let _ = write!(h, "<td>{}</td>", num(d.projection, 4));
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>\n");

        h.push_str("<h2>Decoded directions</h2><p>For each top eigenvector v: the exact logit change Jv = W<sub>U</sub>Av ranked by the probability change ∂p<sub>y</sub>/∂ε = p<sub>y</sub>((Jv)<sub>y</sub> − pᵀJv) (number in brackets); the second-order check KL(p ‖ p(h+εv)) ≈ ½ε²vᵀFv measured at a small ε. For an attention distribution (<code>--distribution attention:L.J</code>) the outcomes are the keys <code>@position token</code> the query attends to, J the score Jacobian and the number the attention weight's change ∂a<sub>i</sub>/∂ε.</p>\n");
        for s in summary.iter().filter(|s| s.directions.is_some()).take(max_positions) {
            let tok = token(s);
            // An attention read-out names keys (`@position token`) and weight changes ∂a/∂ε.
            let attention = s
                .directions
                .iter()
                .flatten()
                .flat_map(|d| d.up.iter().chain(&d.down))
                .any(|t| t.key.is_some());
            let verb = if attention { "moves attention to" } else { "pushes up" };
            let _ = write!(
                h,
                "<h3>seq {} · layer {} · position {} · token {tok}</h3><table><tr><th>v</th><th>λ</th><th>vᵀFv</th><th>ε</th><th>KL measured</th><th>½ε²vᵀFv</th><th>ratio</th><th>hᵀv</th><th class=\"l\">+v {verb}</th><th class=\"l\">−v {verb}</th></tr>",
                s.sequence, s.layer, s.position
            );
            for d in s.directions.iter().flatten() {
                let toks = |tokens: &[TokenEffect], class: &str| {
                    tokens
                        .iter()
                        .map(|t| {
                            format!(
                                "<span class=\"{class}\">{}</span> ({:+.3})",
                                esc(&t.token),
                                finite(t.dp).unwrap_or(0.0)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = write!(
                    h,
                    "<tr><td>v{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                    d.k, sci(d.eigenvalue), sci(d.fisher_quadratic), sci(d.epsilon), sci(d.kl), sci(d.kl_quadratic), num(d.kl_ratio, 3), num(d.projection, 3), toks(&d.up, "up"), toks(&d.down, "down")
                );
            }
            h.push_str("</table>\n");
        }
        let n = summary.iter().filter(|s| s.directions.is_some()).count();
        if n > max_positions {
            let _ = write!(h, "<p class=\"muted\">{} more positions not shown (--max-positions {max_positions}); all are in metadata.json.</p>", n - max_positions);
        }
    }
    let with_sae: Vec<&PositionSummary> =
        summary.iter().filter(|s| s.sae.is_some()).take(max_positions).collect();
    if !with_sae.is_empty() {
        h.push_str("<h2>SAE features</h2><p>The sparse autoencoder's active features a<sub>i</sub> &gt; 0 at each position, costliest to ablate first: the Fisher sensitivity w<sub>i</sub>ᵀFw<sub>i</sub> of the decoder direction, the second-order KL cost of ablating the feature ½a<sub>i</sub>²w<sub>i</sub>ᵀFw<sub>i</sub>, and the KL measured by ablating it through the model, KL(p ‖ p(h − a<sub>i</sub>w<sub>i</sub>)); then the top eigenvectors of F in feature space (largest |cos(v, w<sub>i</sub>)|).</p>\n");
        for s in with_sae {
            let Some(sae) = &s.sae else { continue };
            let tok = token(s);
            let _ = write!(
                h,
                "<h3>seq {} · layer {} · position {} · token {tok} · {} active</h3><table><tr><th>feature</th><th>a</th><th>wᵀFw</th><th>½a²wᵀFw</th><th>KL measured</th></tr>",
                s.sequence, s.layer, s.position, sae.n_active
            );
            for f in sae.features.iter().take(10) {
                let _ = write!(
                    h,
                    "<tr><td>#{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    f.index,
                    num(f.activation, 4),
                    sci(f.sensitivity),
                    sci(f.kl_second_order),
                    sci(f.kl_ablation)
                );
            }
            h.push_str("</table><p>");
            for (k, feats) in sae.eigenvector_features.iter().enumerate() {
                let list: Vec<String> = feats
                    .iter()
                    .map(|f| format!("#{} ({:+.3})", f.index, finite(f.cosine).unwrap_or(f64::NAN)))
                    .collect();
                let _ = write!(h, "v{} in feature space: {}<br>", k + 1, list.join(", "));
            }
            h.push_str("</p>\n");
        }
    }
    h.push_str(
        "<p class=\"muted\">Generated by <code>fisher-stein report</code>.</p></body></html>\n",
    );
    h
}

/// Inline SVG must not carry an XML declaration.
fn strip_xml_decl(svg: &str) -> &str {
    match svg.strip_prefix("<?xml") {
        Some(rest) => rest.find("?>").map_or(svg, |i| rest[i + 2..].trim_start()),
        None => svg,
    }
}

/// Write each plot as `DIR/plots/NAME.svg` and `.png`; returns `DIR/plots`.
fn write_plots(dir: &Path, plot_list: &[Plot]) -> Result<PathBuf> {
    let plot_dir = dir.join("plots");
    std::fs::create_dir_all(&plot_dir)
        .with_context(|| format!("cannot create {}", plot_dir.display()))?;
    for p in plot_list {
        write_atomic(&plot_dir.join(format!("{}.svg", p.name)), p.svg.as_bytes())?;
        write_atomic(&plot_dir.join(format!("{}.png", p.name)), &p.png)?;
    }
    Ok(plot_dir)
}

/// `report` on a `steer` results directory: the summary, the scatter plot of off-target KL and
/// the per-pair table.
fn steering_report(args: &ReportArgs, g: &Globals) -> Result<()> {
    let dir = &args.dir;
    let r = crate::steer::read_report(dir)?;
    let fisher = r.summary.iter().map(|m| m.method.clone()).find(|m| m.starts_with("fisher"));
    let series: Vec<(String, Vec<(f64, f64)>)> = match &fisher {
        Some(f) => r
            .summary
            .iter()
            .filter(|m| &m.method != f)
            .map(|m| {
                let points = crate::steer::matched_pairs(&r.pairs, &m.method, Some(f))
                    .into_iter()
                    .filter_map(|x| Some((x.fisher?, x.off_target_kl)))
                    .collect();
                (m.method.clone(), points)
            })
            .collect(),
        None => Vec::new(),
    };
    let points = series.iter().any(|(_, p)| !p.is_empty());
    let mut plot_list = Vec::new();
    if points {
        plot_list.push(plots::steering_scatter(&series)?);
    }
    let plot_dir = write_plots(dir, &plot_list)?;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fisher-stein steering: {}</title><style>{STYLE}</style></head><body>\n<h1>Steering at layer {} ({})</h1><p>Model <code>{}</code> ({}), engine {}. Every method is steered to p(target) = {}, at most {} nats of first-order gain per step, the direction recomputed at every step (Fisher: solver {}, CG tolerance {}). <b>Off-target KL</b> = KL between the renormalised non-target parts of the distributions before and after; at a matched target probability it orders the methods exactly as the total KL does.</p>",
        esc(&r.model), r.layer, esc(&r.hook), esc(&r.model), esc(&r.model_type), esc(&r.backend),
        r.target_probability, r.max_step_nats, esc(&r.fisher_solver), r.cg_tolerance
    );
    if let Some(d) = &r.description {
        let _ = write!(h, "<p>{}</p>", esc(d));
    }
    h.push_str("<h2>Summary</h2><p>Each method against the Fisher method at the same target probability: on the pairs both reached it, and — for a method that stopped short after moving the target the requested way — at the probability it did reach, Fisher's off-target KL interpolated along its path (linear in log p between the steps that bracket it: an over-estimate of Fisher's cost). “matched (interpolated)”.</p><table><tr><th>method</th><th>reached</th><th>matched (interpolated)</th><th>median off-target KL</th><th>geometric mean ÷ Fisher</th><th>Fisher lower</th><th>median ‖δ‖/‖h‖</th></tr>");
    for m in &r.summary {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}/{}</td><td>{} ({})</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td></tr>",
            esc(&m.method),
            m.reached,
            m.runs,
            m.matched,
            m.interpolated,
            sci(m.median_off_target_kl),
            num(m.geomean_ratio_to_fisher, 3),
            m.fisher_lower,
            m.matched,
            num(m.median_relative_edit_norm, 4)
        );
    }
    h.push_str("</table>");
    for p in &plot_list {
        let _ = write!(h, "<figure id=\"plot-{}\">{}<figcaption>{} (also <code>plots/{}.png</code>, <code>.svg</code>)</figcaption></figure>", p.name, strip_xml_decl(&p.svg), esc(&p.caption), p.name);
    }
    h.push_str("<h2>Pairs</h2><table><tr><th>#</th><th>prompt</th><th>target</th><th>p before</th><th>method</th><th>off-target KL</th><th>KL</th><th>‖δ‖/‖h‖</th><th>steps</th><th>most raised besides the target</th></tr>");
    for (i, p) in r.pairs.iter().enumerate() {
        for m in &p.methods {
            let raised: Vec<String> = m
                .raised
                .iter()
                .take(3)
                .map(|(t, a, b)| format!("{} {:.3}→{:.3}", esc(t), a, b))
                .collect();
            let kl = if m.reached {
                sci(m.off_target_kl)
            } else {
                format!("not reached ({})", esc(m.stopped.as_deref().unwrap_or("")))
            };
            let _ = write!(
                h,
                "<tr><td>{i}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{kl}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&p.prompt), esc(&format!("{:?}", p.target)), sci(p.initial_probability), esc(&m.method),
                sci(m.kl), num(m.relative_edit_norm, 4), m.steps, raised.join(", ")
            );
        }
    }
    h.push_str("</table></body></html>\n");
    let out = args.output.clone().unwrap_or_else(|| dir.join("report.html"));
    write_atomic(&out, h.as_bytes())?;
    g.log(&format!("steering report: {} plot(s)", plot_list.len()));
    if !g.quiet {
        eprintln!(
            "wrote {} ({} plot(s), PNG + SVG in {})",
            out.display(),
            plot_list.len(),
            plot_dir.display()
        );
    }
    Ok(())
}
