//! The run: checks that need no model, the output directory and its lock, the model loaded
//! through the engine registry, then the [`Plan`] and the loop over sequences (skipping those a
//! resumed run finished), the mean accumulator, and metadata.json last.

use super::args::ComputeArgs;
use super::estimate::sequence_entries;
use super::failures::{record_failure, PartialFailure};
use super::plan::Plan;
use super::write::{metadata, sequence_info, sequence_results, summarise, Outcome};
use crate::backends::{with_model, LoadSpec, Loaded, ModelJob};
use crate::dataset::{print_mean_summary, start_mean};
use crate::output::{
    check_output_dir, create_results_dir, lock_output, remove_stale_temporaries, write_atomic,
    ExistingDir, RUN_FILE,
};
use crate::readouts::{layer_summary, print_layer_summary, token_text};
use crate::results::{pretty_json, ComputeSplit, RunSettings, SequenceState, Timings};
use crate::Globals;
use anyhow::{bail, Context, Result};
use fs_checkpoint::ModelFiles;
use fs_estimators::SplitModel;
use std::time::Instant;

/// Run `compute`: check the output directory and lock it, load the model, then compute.
pub fn run(args: ComputeArgs, g: &Globals) -> Result<()> {
    args.validate()?;
    // Held until the run ends (however it ends): no second run writes into this directory.
    let _lock = lock_output(&args.output)?;
    let resuming = prepare_output(&args)?;
    // A scheduler's SIGTERM (preemption, scancel, time limit) now ends the run between sequences,
    // with the accumulator checkpointed, rather than wherever it strikes.
    crate::signals::catch_sigterm();
    let spec = LoadSpec {
        model: &args.model,
        backend: args.backend,
        device: &args.device,
        batch: args.batch_size,
    };
    with_model(&spec, g, ComputeJob { args: &args, g, resuming })
}

/// `compute` on a model already loaded (`loaded` says how): what [`run`] does after the load,
/// and what the Python package calls on the model it holds. `args.model`, `args.backend` and
/// `args.device` are only recorded. Stops with [`crate::signals::Interrupted`] between batches
/// of positions once [`crate::signals::request_interrupt`] is called.
pub fn run_on<M: SplitModel>(
    model: &M,
    loaded: &Loaded,
    args: &ComputeArgs,
    g: &Globals,
) -> Result<()> {
    args.validate()?;
    let _lock = lock_output(&args.output)?;
    let resuming = prepare_output(args)?;
    run_locked(model, loaded, args, g, resuming)
}

/// Check the (locked) output directory against `--force` / `--resume`; when resuming, remove
/// the temporaries a killed run left behind. Whether the run resumes.
fn prepare_output(args: &ComputeArgs) -> Result<bool> {
    let existing = if args.resume {
        ExistingDir::Resume
    } else if args.force {
        ExistingDir::Replace
    } else {
        ExistingDir::Refuse
    };
    let resuming = check_output_dir(&args.output, existing)?;
    if resuming {
        // Only in a directory this tool wrote (it holds run.json) and under the lock.
        remove_stale_temporaries(&args.output)?;
        remove_stale_temporaries(&args.output.join(".state"))?;
    }
    Ok(resuming)
}

/// `compute` on a loaded model.
struct ComputeJob<'a> {
    args: &'a ComputeArgs,
    g: &'a Globals,
    resuming: bool,
}

impl ModelJob for ComputeJob<'_> {
    type Output = ();
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<()> {
        self.g.log(&format!(
            "loaded {} parameters on {} {} in {:.2} s",
            loaded.parameters,
            loaded.backend.name(),
            loaded.device,
            loaded.load_s
        ));
        run_locked(&model, &loaded, self.args, self.g, self.resuming)
    }
}

/// The run, with the output directory locked and checked.
fn run_locked<M: SplitModel>(
    model: &M,
    loaded: &Loaded,
    args: &ComputeArgs,
    g: &Globals,
    resuming: bool,
) -> Result<()> {
    let run = RunInfo {
        files: &loaded.files,
        tokenizer: loaded.tokenizer.clone(),
        arch: loaded.arch,
        model_type: loaded.model_type,
        backend: loaded.backend.name(),
        device: loaded.device.clone(),
        load_s: loaded.load_s,
    };
    run_with(model, &run, args, g, resuming)
}

/// What the metadata needs to know about the model run.
pub(super) struct RunInfo<'a> {
    pub files: &'a ModelFiles,
    /// A tokenizer that came with the weights (GGUF metadata), if any.
    pub tokenizer: Option<fs_checkpoint::tokenizers::Tokenizer>,
    pub arch: &'static str,
    pub model_type: &'static str,
    pub backend: &'static str,
    pub device: String,
    pub load_s: f64,
}

/// A fresh run writes run.json; a resumed one checks that the recorded run was this one.
fn record_or_check_run(args: &ComputeArgs, settings: &RunSettings, resuming: bool) -> Result<()> {
    let run_path = args.output.join(RUN_FILE);
    if resuming {
        let recorded =
            std::fs::read(&run_path).with_context(|| format!("reading {}", run_path.display()))?;
        let same = settings
            .same_as_recorded(&recorded)
            .with_context(|| format!("{} is corrupt: re-run with --force", run_path.display()))?;
        if !same {
            bail!(
                "--resume: {} was started with different settings (model, layers, estimator, positions, inputs or format): rerun with the original flags, or use --force to start over",
                args.output.display()
            );
        }
    } else {
        create_results_dir(&args.output, args.force)?;
        write_atomic(&run_path, &pretty_json(settings)?)?;
    }
    Ok(())
}

fn run_with<M: SplitModel>(
    model: &M,
    run: &RunInfo<'_>,
    args: &ComputeArgs,
    g: &Globals,
    resuming: bool,
) -> Result<()> {
    let t_start = Instant::now();
    let dims = model.dims();
    let plan = Plan::new(args, &dims, run.model_type, run.tokenizer.as_ref(), run.files, g)?;
    let (layers, d) = (&plan.layers, plan.d);
    if let Some(head) = args.distribution.head() {
        for &layer in layers {
            fs_estimators::check_attention_head(
                head,
                layer,
                dims.n_layers,
                model.attention_heads(),
            )
            .with_context(|| format!("--distribution {head} at split layer {layer}"))?;
        }
    }
    record_or_check_run(args, &plan.run_settings(args), resuming)?;

    let total = plan.total();
    let bar = g.progress(total as u64);
    let mut summaries = Vec::new();
    let mut failed = Vec::new();
    let mut sequences = Vec::new();
    let mut skipped = 0usize;
    let t_compute = Instant::now();
    let tokenizer =
        run.tokenizer.clone().or_else(|| fs_checkpoint::load_tokenizer(&run.files.tokenizer).ok());
    let decode = |id: u32| token_text(tokenizer.as_ref(), id);
    let mut mean = if args.readouts.accumulate() {
        let settings = || plan.mean_settings(args, run.files);
        Some(start_mean(&args.output, resuming, layers, d, args.readouts.shard, settings)?)
    } else {
        None
    };
    let mut last_checkpoint = Instant::now();
    let mut split = ComputeSplit::default();
    for (doc, positions) in plan.docs.iter().zip(&plan.positions) {
        let i = doc.index;
        if crate::signals::sigterm_received() {
            if let Some(m) = &mean {
                m.write(&args.output)?;
            }
            bar.finish_and_clear();
            bail!(
                "stopped by SIGTERM before sequence {i}: the finished sequences{} are saved in {}; rerun with --resume to continue",
                if mean.is_some() { " and the mean accumulator" } else { "" },
                args.output.display()
            );
        }
        let file = plan.sequence_file(i, args.format);
        let path = args.output.join(&file);
        let state_path = SequenceState::path(&args.output, i);
        sequences.push(sequence_info(doc, &file, args));
        // With --mean, a sequence already in the accumulator's checkpoint is never added again.
        // A sequence is finished once its state file (summaries, failures) is written: that
        // happens after its results file and before the accumulator's checkpoint records it.
        let in_mean = mean.as_ref().is_some_and(|m| m.sequences.contains(&i));
        let done = state_path.exists()
            && match &mean {
                Some(_) => in_mean && (args.readouts.mean_only || path.exists()),
                None => path.exists(),
            };
        if resuming && done {
            let state = SequenceState::read(&state_path)?;
            summaries.extend(state.summaries);
            failed.extend(state.failed);
            skipped += 1;
            bar.inc((positions.len() * layers.len()) as u64);
            g.log(&format!("sequence {i}: {file} exists, skipped (--resume)"));
            continue;
        }
        let first_summary = summaries.len();
        let first_failure = failed.len();
        let mut entries = Vec::new();
        let before = split;
        let clock = Instant::now();
        sequence_entries(
            model,
            &doc.tokens,
            layers,
            positions,
            args,
            &bar,
            plan.eig_rank.unwrap_or(5),
            plan.sae.as_ref(),
            &mut split,
            &mut |layer, t, e| record_failure(i, layer, t, e, args.fail_fast, g, &mut failed),
            &mut |e| {
                if let Some(m) = mean.as_mut().filter(|_| !in_mean) {
                    let f = e.estimate.matrix().ok_or_else(|| {
                        anyhow::anyhow!("--mean needs whole matrices, which top-k does not form")
                    })?;
                    m.layer_mut(e.layer)?.add(f, e.entropy)?;
                }
                if args.readouts.mean_only {
                    // Nothing per position is kept: summarise now, drop the matrix.
                    summarise(i, doc, &e, &mut summaries, g, &decode)?;
                } else {
                    entries.push(e);
                }
                Ok(())
            },
        )?;
        if !args.readouts.mean_only {
            let bytes = sequence_results(
                i,
                doc,
                &entries,
                d,
                plan.eig_rank,
                args,
                &mut summaries,
                g,
                &decode,
            )?;
            write_atomic(&path, &bytes)?;
            g.log(&format!("sequence {i}: wrote {file}"));
        }
        SequenceState {
            summaries: summaries[first_summary..].to_vec(),
            failed: failed[first_failure..].to_vec(),
        }
        .write(&state_path)?;
        let computed = split.lower + split.estimator + split.readouts
            - (before.lower + before.estimator + before.readouts);
        split.summaries_and_files += clock.elapsed().as_secs_f64() - computed;
        g.log(&format!(
            "sequence {i}: lower pass {:.3} s, estimator {:.3} s, read-outs {:.3} s, summaries and files {:.3} s",
            split.lower - before.lower,
            split.estimator - before.estimator,
            split.readouts - before.readouts,
            split.summaries_and_files - before.summaries_and_files,
        ));
        if let Some(m) = mean.as_mut().filter(|_| !in_mean) {
            m.sequences.push(i);
            // Checkpoint the accumulator (for --resume) at most every --checkpoint-secs;
            // always at the end.
            if last_checkpoint.elapsed().as_secs_f64() >= args.checkpoint_secs {
                m.write(&args.output)?;
                last_checkpoint = Instant::now();
            }
        }
        crate::signals::stop_point(i);
    }
    bar.finish_and_clear();
    let layer_summary = layer_summary(&summaries);
    let mean_summary = match &mean {
        Some(m) => {
            m.write(&args.output)?;
            Some(m.summary()?.into_iter().map(|(r, _)| r).collect::<Vec<_>>())
        }
        None => None,
    };

    let first_failure = failed.first().map(|f| f.error.clone());
    let n_failed = failed.len();
    let outcome = Outcome { sequences, summaries, failed, skipped, layer_summary, mean_summary };
    let metadata = metadata(args, run, &dims, &plan, outcome, || Timings {
        load: run.load_s,
        compute: t_compute.elapsed().as_secs_f64(),
        total: t_start.elapsed().as_secs_f64() + run.load_s,
        compute_split: Some(split),
    })?;
    write_atomic(&args.output.join("metadata.json"), &pretty_json(&metadata)?)?;
    if !g.quiet {
        if layers.len() > 1 {
            print_layer_summary(&metadata.layer_summary);
        }
        if let Some(rows) = &metadata.mean_summary {
            print_mean_summary(rows);
        }
        eprintln!(
            "wrote {} ({} sequence(s), {} matrices, d = {d})",
            args.output.display(),
            plan.docs.len(),
            total - n_failed
        );
    }
    if let Some(first) = first_failure {
        return Err(PartialFailure {
            failed: n_failed,
            total,
            first,
            metadata: args.output.join("metadata.json"),
        }
        .into());
    }
    Ok(())
}
