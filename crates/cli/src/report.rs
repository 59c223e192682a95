//! `fisher-stein report DIR`: one self-contained HTML page about a results directory (written by
//! `compute` or `merge`): the run's settings, the layer sweep, the mean Fisher per layer, three
//! plots (inline SVG; the same plots are written as PNG and SVG files under `DIR/plots/`), and
//! per analysed position the spectrum summary, the decoded top directions with their KL check,
//! and the projections `hᵀv`. No scripts, no external URLs.

use crate::dataset::{MeanState, MEAN_FILE};
use crate::output::write_atomic;
use crate::plots::{self, Plot, RankRow};
use crate::Globals;
use anyhow::{bail, Context, Result};
use fs_estimators::{spectrum, FisherAccumulator, Matrix};
use serde_json::Value;
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

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) => format!("{x:.digits$e}"),
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

fn sci(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.3e}"))
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
            let layer = row["layer"].as_u64().unwrap_or(0) as usize;
            eff.insert(layer, row["effective_rank"].as_f64().unwrap_or(f64::NAN));
            out.push((layer, eig));
        }
        return Ok((out, eff, "the mean Fisher (mean.safetensors)".into()));
    }
    let files = crate::compute::results_files(dir)?;
    let mut accs: BTreeMap<usize, FisherAccumulator> = BTreeMap::new();
    for f in &files {
        let r = crate::inspect::read_results(f)?;
        let (fs, data) = &r["fisher"];
        let (n, d) = (fs[0], fs[1]);
        for i in 0..n {
            let layer = r["layer"].1[i] as usize;
            let m = Matrix::from_vec(d, d, data[i * d * d..(i + 1) * d * d].to_vec())?;
            accs.entry(layer).or_insert_with(|| FisherAccumulator::new(d)).add(&m, 0.0)?;
        }
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
    let meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).with_context(|| {
        format!(
            "cannot read {}: point report at a finished compute or merge directory",
            meta_path.display()
        )
    })?)
    .with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
    let has_mean = dir.join(MEAN_FILE).is_file();
    let (spectra, mean_eff, spectra_what) = layer_spectra(dir, has_mean)?;
    let summary: Vec<Value> = meta["summary"].as_array().cloned().unwrap_or_default();
    let layer_summary: Vec<Value> = match meta["layer_summary"].as_array() {
        Some(a) if !a.is_empty() => a.clone(),
        _ => crate::readouts::layer_summary(&summary),
    };
    let layers: Vec<usize> =
        layer_summary.iter().filter_map(|r| r["layer"].as_u64()).map(|l| l as usize).collect();

    let mut plot_list: Vec<Plot> = Vec::new();
    if !spectra.is_empty() {
        plot_list.push(plots::spectra(&spectra, &spectra_what)?);
    }
    let mut rank_rows: Vec<RankRow> = layer_summary
        .iter()
        .map(|r| {
            let layer = r["layer"].as_u64().unwrap_or(0) as usize;
            RankRow {
                layer,
                effective_rank: r["mean_effective_rank"].as_f64().unwrap_or(f64::NAN),
                participation_ratio: r["mean_participation_ratio"].as_f64().unwrap_or(f64::NAN),
                mean_fisher_effective_rank: mean_eff.get(&layer).copied(),
            }
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
        .filter_map(|s| {
            Some((s["layer"].as_u64()? as usize, s["entropy"].as_f64()?, s["trace"].as_f64()?))
        })
        .collect();
    if !points.is_empty() {
        plot_list.push(plots::entropy_trace(&points, &layers)?);
    }
    let plot_dir = dir.join("plots");
    std::fs::create_dir_all(&plot_dir)
        .with_context(|| format!("cannot create {}", plot_dir.display()))?;
    for p in &plot_list {
        write_atomic(&plot_dir.join(format!("{}.svg", p.name)), p.svg.as_bytes())?;
        write_atomic(&plot_dir.join(format!("{}.png", p.name)), &p.png)?;
    }

    let html = page(&meta, &summary, &layer_summary, &plot_list, args.max_positions);
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
    meta: &Value,
    summary: &[Value],
    layer_summary: &[Value],
    plots: &[Plot],
    max_positions: usize,
) -> String {
    let mut h = String::new();
    let model =
        meta["model"]["spec"].as_str().or(meta["settings"]["model"].as_str()).unwrap_or("?");
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
            esc(meta["model"]["architecture"].as_str().unwrap_or("?"))
        ),
    );
    row("layers", esc(&meta["layers"].to_string()));
    row("d", meta["d_model"].to_string());
    row("sequences", meta["n_sequences"].to_string());
    let est = if meta["estimator"].is_null() {
        &meta["settings"]["estimator"]
    } else {
        &meta["estimator"]
    };
    row("estimator", format!("<code>{}</code>", esc(&est.to_string())));
    if let Some(t) = meta["text"].as_str() {
        row("text", esc(t));
    }
    if let Some(m) = meta["merged_from"].as_array() {
        row("merged from", format!("{} accumulator(s)", m.len()));
    }
    row(
        "backend",
        format!(
            "{} on {}",
            esc(meta["backend"].as_str().unwrap_or("–")),
            esc(meta["device"].as_str().unwrap_or("–"))
        ),
    );
    row("tool", format!("fisher-stein {}", esc(meta["version"].as_str().unwrap_or("?"))));
    h.push_str("</table>\n");

    if !layer_summary.is_empty() {
        h.push_str("<h2>Layer sweep</h2><p>Means over the analysed positions of each layer.</p><table><tr><th>layer</th><th>positions</th><th>mean entropy</th><th>mean tr F</th><th class=\"l\">mean top eigenvalues</th><th>mean eff. rank</th><th>mean part. ratio</th></tr>");
        for r in layer_summary {
            let top = r["mean_top_eigenvalues"]
                .as_array()
                .map(|a| a.iter().map(sci).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{top}</td><td>{}</td><td>{}</td></tr>",
                r["layer"], r["positions"], num(&r["mean_entropy"], 4), sci(&r["mean_trace"]), num(&r["mean_effective_rank"], 2), num(&r["mean_participation_ratio"], 2)
            );
        }
        h.push_str("</table>\n");
    }
    if let Some(rows) = meta["mean_summary"].as_array().filter(|a| !a.is_empty()) {
        h.push_str("<h2>Dataset mean</h2><p>Spectrum of the mean Fisher F̄ = (1/n) Σ F over every analysed position and sequence (compensated f64 sums).</p><table><tr><th>layer</th><th>matrices</th><th>mean entropy</th><th>tr F̄</th><th class=\"l\">top eigenvalues</th><th>eff. rank</th><th>part. ratio</th></tr>");
        for r in rows {
            let top = r["top_eigenvalues"]
                .as_array()
                .map(|a| a.iter().map(sci).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{top}</td><td>{}</td><td>{}</td></tr>",
                r["layer"], r["count"], num(&r["mean_entropy"], 4), sci(&r["trace"]), num(&r["effective_rank"], 2), num(&r["participation_ratio"], 2)
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
    let with_dirs = summary.iter().any(|s| s["directions"].is_array());
    if !with_dirs && !summary.is_empty() {
        h.push_str("<p class=\"muted\">Directions were not decoded: run <code>compute --directions K</code> to add the tokens the top eigenvectors push up and down, the KL check and the projections.</p>");
    }
    h.push_str("<table><tr><th>seq</th><th>layer</th><th>position</th><th class=\"l\">token</th><th>entropy</th><th>tr F</th><th class=\"l\">top eigenvalues</th><th>eff. rank</th><th>part. ratio</th></tr>");
    for s in summary {
        let top = s["top_eigenvalues"]
            .as_array()
            .map(|a| a.iter().take(3).map(sci).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let tok = s["token"].as_str().map(esc).unwrap_or_else(|| format!("#{}", s["token_id"]));
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{tok}</td><td>{}</td><td>{}</td><td class=\"l\">{top}</td><td>{}</td><td>{}</td></tr>",
            s["sequence"], s["layer"], s["position"], num(&s["entropy"], 4), sci(&s["trace"]), num(&s["effective_rank"], 2), num(&s["participation_ratio"], 2)
        );
    }
    h.push_str("</table>\n");

    if with_dirs {
        // Projections.
        h.push_str("<h2>Projections</h2><p>Coordinates hᵀv<sub>i</sub> of the activation on the top eigenvectors of its own Fisher matrix.</p><table><tr><th>seq</th><th>layer</th><th>position</th><th class=\"l\">token</th>");
        let k = summary
            .iter()
            .filter_map(|s| s["directions"].as_array().map(|a| a.len()))
            .max()
            .unwrap_or(0);
        for i in 1..=k {
            let _ = write!(h, "<th>hᵀv{i}</th>");
        }
        h.push_str("</tr>");
        for s in summary.iter().filter(|s| s["directions"].is_array()) {
            let tok = s["token"].as_str().map(esc).unwrap_or_else(|| format!("#{}", s["token_id"]));
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{tok}</td>",
                s["sequence"], s["layer"], s["position"]
            );
            for d in s["directions"].as_array().into_iter().flatten() {
                let _ = write!(h, "<td>{}</td>", num(&d["projection"], 4));
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>\n");

        h.push_str("<h2>Decoded directions</h2><p>For each top eigenvector v: the exact logit change Jv = W<sub>U</sub>Av ranked by the probability change ∂p<sub>y</sub>/∂ε = p<sub>y</sub>((Jv)<sub>y</sub> − pᵀJv) (number in brackets); the second-order check KL(p ‖ p(h+εv)) ≈ ½ε²vᵀFv measured at a small ε.</p>\n");
        for s in summary.iter().filter(|s| s["directions"].is_array()).take(max_positions) {
            let tok = s["token"].as_str().map(esc).unwrap_or_else(|| format!("#{}", s["token_id"]));
            let _ = write!(
                h,
                "<h3>seq {} · layer {} · position {} · token {tok}</h3><table><tr><th>v</th><th>λ</th><th>vᵀFv</th><th>ε</th><th>KL measured</th><th>½ε²vᵀFv</th><th>ratio</th><th>hᵀv</th><th class=\"l\">+v pushes up</th><th class=\"l\">−v pushes up</th></tr>",
                s["sequence"], s["layer"], s["position"]
            );
            for d in s["directions"].as_array().into_iter().flatten() {
                let toks = |key: &str, class: &str| {
                    d[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| {
                            format!(
                                "<span class=\"{class}\">{}</span> ({:+.3})",
                                esc(t["token"].as_str().unwrap_or("?")),
                                t["dp"].as_f64().unwrap_or(0.0)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = write!(
                    h,
                    "<tr><td>v{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                    d["k"], sci(&d["eigenvalue"]), sci(&d["vFv"]), sci(&d["epsilon"]), sci(&d["kl"]), sci(&d["kl_quadratic"]), num(&d["kl_ratio"], 3), num(&d["projection"], 3), toks("up", "up"), toks("down", "down")
                );
            }
            h.push_str("</table>\n");
        }
        let n = summary.iter().filter(|s| s["directions"].is_array()).count();
        if n > max_positions {
            let _ = write!(h, "<p class=\"muted\">{} more positions not shown (--max-positions {max_positions}); all are in metadata.json.</p>", n - max_positions);
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
