//! `fisher-stein merge DIR... --output OUT`: add the mean accumulators (`mean.safetensors`) of
//! independent shard jobs (`compute --mean --shard i/N`) into the result one job over all the
//! documents would have produced: sums and counts add exactly (compensated f64 sums, see
//! `fs_estimators::FisherAccumulator`), so the merged mean equals the single job's to f64
//! round-off whatever the order of the shards.
//!
//! The inputs must come from one run: same model weights (sha256), width, layers, estimator
//! settings and position selection; no document may appear in two of them.

use crate::dataset::{check_compatible, print_mean_summary, MeanState, MEAN_FILE};
use crate::output::{check_output_dir, create_results_dir, lock_output, write_atomic, ExistingDir};
use crate::readouts::layer_summary;
use crate::results::{
    json_text, pretty_json, MeanSummaryRow, MergeMetadata, MergedInput, MetadataView, TOOL, VERSION,
};
use crate::Globals;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;

/// Arguments of `fisher-stein merge`.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// Results directories (or mean.safetensors files) of `compute --mean` shard jobs.
    #[arg(value_name = "DIR", required = true)]
    pub inputs: Vec<PathBuf>,
    /// Directory to write the merged mean.safetensors and metadata.json to.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Replace a non-empty output directory.
    #[arg(long)]
    pub force: bool,
}

/// Run `merge`.
pub fn run(args: MergeArgs, g: &Globals) -> Result<()> {
    let existing = if args.force { ExistingDir::Replace } else { ExistingDir::Refuse };
    // No other run writes into the output directory while this one does.
    let _lock = lock_output(&args.output)?;
    check_output_dir(&args.output, existing)?;
    let mut merged: Option<MeanState> = None;
    let mut seen: HashMap<(String, usize), String> = HashMap::new();
    let mut shards = Vec::new();
    let mut summaries = Vec::new();
    for input in &args.inputs {
        let (path, dir) = if input.is_dir() {
            (input.join(MEAN_FILE), Some(input.clone()))
        } else if input.is_file() {
            (input.clone(), input.parent().map(PathBuf::from))
        } else {
            bail!(
                "{} does not exist: give the --output directories of compute --mean jobs",
                input.display()
            );
        };
        if !path.is_file() {
            bail!(
                "{} holds no {MEAN_FILE}: run compute with --mean (or --mean-only) to produce an accumulator",
                input.display()
            );
        }
        let name = input.display().to_string();
        let state = MeanState::read(&path)?;
        // Documents of distinct inputs may share an index.
        let source = json_text(&state.settings.input);
        for &s in &state.sequences {
            if let Some(other) = seen.insert((source.clone(), s), name.clone()) {
                bail!("document {s} is in both {other} and {name}: each document may be merged once (shards of one run, or distinct inputs)");
            }
        }
        g.log(&format!(
            "read {} ({} layers, shard {})",
            path.display(),
            state.layers.len(),
            state.shard
        ));
        shards.push(MergedInput {
            path: path.clone(),
            shard: state.shard.clone(),
            sequences: state.sequences.len(),
        });
        if let Some(s) = dir.as_ref().map(|d| d.join("metadata.json")).filter(|p| p.is_file()) {
            if let Ok(m) = MetadataView::from_json(&std::fs::read(&s)?) {
                summaries.extend(m.summary);
            }
        }
        match merged.as_mut() {
            None => merged = Some(state),
            Some(m) => {
                check_compatible(m, &state, &args.inputs[0].display().to_string(), &name)?;
                for ((la, a), (lb, b)) in m.layers.iter_mut().zip(&state.layers) {
                    if la != lb {
                        bail!("cannot merge {name}: its layers differ from the first input's");
                    }
                    a.merge(b).with_context(|| format!("merging {name}"))?;
                }
                m.sequences.extend(&state.sequences);
            }
        }
    }
    let mut m = merged.context("no inputs to merge")?;
    m.sequences.sort_unstable();
    m.shard = format!("merged from {} input(s)", args.inputs.len());
    create_results_dir(&args.output, args.force)?;
    m.write(&args.output)?;
    let rows: Vec<MeanSummaryRow> = m.summary()?.into_iter().map(|(r, _)| r).collect();
    let metadata = MergeMetadata {
        tool: TOOL.into(),
        version: VERSION.into(),
        merged_from: shards,
        settings: m.settings.clone(),
        layers: m.layers.iter().map(|(l, _)| *l).collect(),
        d_model: m.dim(),
        n_sequences: m.sequences.len(),
        mean_summary: rows,
        layer_summary: layer_summary(&summaries),
        summary: summaries,
    };
    write_atomic(&args.output.join("metadata.json"), &pretty_json(&metadata)?)?;
    if !g.quiet {
        print_mean_summary(&metadata.mean_summary);
        eprintln!(
            "merged {} input(s), {} document(s), into {}",
            args.inputs.len(),
            m.sequences.len(),
            args.output.display()
        );
    }
    Ok(())
}
