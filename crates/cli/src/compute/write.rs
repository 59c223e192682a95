//! What a run writes: each sequence's results file (tensors, safetensors or npz) with the
//! summary of each of its matrices, and metadata.json at the end.

use super::args::{ComputeArgs, Format};
use super::estimate::{Entry, Estimated};
use super::plan::Plan;
use super::run::RunInfo;
use crate::inputs::Document;
use crate::npz::npz_bytes;
use crate::output::{safetensors_bytes, OwnedTensor};
use crate::readouts::{readout_summary, readout_tensors, Readout};
use crate::results::{
    FailedPosition, LayerSummaryRow, MeanSummaryRow, Metadata, ModelInfo, PositionSummary,
    SequenceInfo, Timings, TopKSummary, WeightHash, TOOL, VERSION,
};
use crate::Globals;
use anyhow::Result;
use fs_traits::ModelDims;

/// Summarise one position of sequence `i`: append its summary (with decoded read-outs) to
/// `summaries` and print its line, from the entry's spectrum.
pub(super) fn summarise(
    i: usize,
    doc: &Document,
    e: &Entry,
    summaries: &mut Vec<PositionSummary>,
    g: &Globals,
    decode: &dyn Fn(u32) -> String,
) -> Result<()> {
    let s = &e.spectrum;
    let (trace_std_error, top_k) = match &e.estimate {
        Estimated::Matrix(_) => (None, None),
        Estimated::TopK(r) => {
            let max_residual = r.residuals.iter().cloned().fold(0.0, f64::max);
            let summary = TopKSummary {
                k: r.eigenvalues.len(),
                applications: r.applications,
                trace_applications: r.trace.applications,
                start_vectors: r.start_vectors,
                max_residual,
                converged: r.converged,
            };
            if !r.converged && !g.quiet {
                eprintln!(
                    "warning: seq {i} layer {} position {}: top-k stopped after {} operator applications with a residual of {max_residual:.1e}·λ1 (above --tolerance): the eigenpairs are recorded with their residuals; lower --k or raise --tolerance",
                    e.layer, e.position, r.applications
                );
            }
            (r.trace.std_error, Some(summary))
        }
    };
    let token_id = doc.tokens[e.position];
    if !g.quiet {
        let top = s.eigenvalues.iter().take(3).map(|x| format!("{x:.3e}")).collect::<Vec<_>>();
        let tail = match &top_k {
            None => format!("eff. rank {:.2}", s.effective_rank),
            Some(t) => format!(
                "top-{} in {} applications (+{} start scores), max residual {:.1e}",
                t.k, t.applications, t.start_vectors, t.max_residual
            ),
        };
        let trace = format!("{:.4e}{}", s.trace, trace_error_note(trace_std_error));
        println!(
            "seq {i:>3}  layer {:>3}  position {:>4}  token {:>6}  entropy {:.4}  trace {trace}  top eigenvalues [{}]  {tail}",
            e.layer,
            e.position,
            token_id,
            e.entropy,
            top.join(", "),
        );
    }
    summaries.push(PositionSummary {
        sequence: i,
        layer: e.layer,
        position: e.position,
        token_id,
        entropy: e.entropy,
        trace: s.trace,
        top_eigenvalues: s.eigenvalues[..s.eigenvalues.len().min(5)].to_vec(),
        effective_rank: s.effective_rank,
        participation_ratio: s.participation_ratio,
        clamped_negative_eigenvalues: s.clamped_negative,
        trace_std_error,
        top_k,
        token: e.readout.as_ref().map(|_| decode(token_id)),
        directions: e.readout.as_ref().map(|r| readout_summary(r, decode, &doc.tokens)),
        sae: e.sae.clone(),
    });
    Ok(())
}

/// Serialise one sequence's results file and append the summaries of its matrices.
#[allow(clippy::too_many_arguments)]
pub(super) fn sequence_results(
    i: usize,
    doc: &Document,
    entries: &[Entry],
    d: usize,
    eig_rank: Option<usize>,
    args: &ComputeArgs,
    summaries: &mut Vec<PositionSummary>,
    g: &Globals,
    decode: &dyn Fn(u32) -> String,
) -> Result<Vec<u8>> {
    let n = entries.len();
    let mut eigenvalues = Vec::new();
    let mut eigenvectors = Vec::new();
    for e in entries {
        summarise(i, doc, e, summaries, g, decode)?;
        let s = &e.spectrum;
        if let Some(r) = eig_rank {
            eigenvalues.extend(s.eigenvalues.iter().take(r).map(|&x| x as f32));
            for row in 0..d {
                eigenvectors.extend((0..r).map(|c| s.eigenvectors.get(row, c) as f32));
            }
        }
    }
    let matrices: Vec<&fs_estimators::Matrix<f64>> =
        entries.iter().filter_map(|e| e.estimate.matrix()).collect();
    let mut tensors = Vec::new();
    if matrices.len() == n {
        tensors.push((
            "fisher",
            OwnedTensor::f32(
                vec![n, d, d],
                matrices.iter().flat_map(|f| f.as_slice().iter().map(|&x| x as f32)),
            ),
        ));
    }
    let top: Vec<&fs_estimators::TopKFisher> = entries
        .iter()
        .filter_map(|e| match &e.estimate {
            Estimated::TopK(r) => Some(r),
            Estimated::Matrix(_) => None,
        })
        .collect();
    if n > 0 && top.len() == n {
        let k = top[0].residuals.len();
        tensors.extend([
            (
                "residuals",
                OwnedTensor::f64(vec![n, k], top.iter().flat_map(|r| r.residuals.clone())),
            ),
            ("applications", OwnedTensor::i64(vec![n], top.iter().map(|r| r.applications as i64))),
            ("trace", OwnedTensor::f64(vec![n], top.iter().map(|r| r.trace.value))),
            (
                "trace_std_error",
                OwnedTensor::f64(
                    vec![n],
                    top.iter().map(|r| r.trace.std_error.unwrap_or(f64::NAN)),
                ),
            ),
        ]);
    }
    tensors.extend([
        ("layer", OwnedTensor::i64(vec![n], entries.iter().map(|e| e.layer as i64))),
        ("positions", OwnedTensor::i64(vec![n], entries.iter().map(|e| e.position as i64))),
        ("sequence", OwnedTensor::i64(vec![n], std::iter::repeat_n(i as i64, n))),
        (
            "token_ids",
            OwnedTensor::i64(vec![1, doc.tokens.len()], doc.tokens.iter().map(|&t| t as i64)),
        ),
        ("probs_entropy", OwnedTensor::f64(vec![n], entries.iter().map(|e| e.entropy))),
    ]);
    if let Some(r) = eig_rank {
        tensors.push(("eigenvalues", OwnedTensor::f32(vec![n, r], eigenvalues)));
        tensors.push(("eigenvectors", OwnedTensor::f32(vec![n, d, r], eigenvectors)));
    }
    let readouts: Vec<&Readout> = entries.iter().filter_map(|e| e.readout.as_ref()).collect();
    if n > 0 && readouts.len() == n {
        let k = args.readouts.directions.min(d);
        tensors.extend(readout_tensors(&readouts, k, args.readouts.direction_tokens));
    }
    if n > 0 && entries.iter().all(|e| e.attention.is_some()) {
        // The head's weights over every position of the sequence (0 for keys it does not see).
        let t = doc.tokens.len();
        let rows = entries.iter().flat_map(|e| {
            let mut row = vec![0.0; t];
            for &(key, a) in e.attention.iter().flatten() {
                row[key] = a;
            }
            row
        });
        tensors.push(("attention_weights", OwnedTensor::f64(vec![n, t], rows)));
    }
    if let Some(s) = entries.first().and_then(|e| e.draws.as_ref()).map(|v| v.len()) {
        let draws = entries.iter().flat_map(|e| e.draws.iter().flatten().map(|&t| t as i64));
        tensors.push(("sample_tokens", OwnedTensor::i64(vec![n, s], draws)));
    }
    match args.format {
        Format::Safetensors => safetensors_bytes(&tensors, None),
        Format::Npz => npz_bytes(&tensors),
    }
}

/// The metadata.json entry of one sequence.
pub(super) fn sequence_info(doc: &Document, file: &str, args: &ComputeArgs) -> SequenceInfo {
    SequenceInfo {
        index: doc.index,
        file: (!args.readouts.mean_only).then(|| file.to_string()),
        n_tokens: doc.tokens.len(),
        truncated_tokens: doc.truncated,
        text_preview: doc.text.as_deref().map(|t| t.chars().take(200).collect()),
    }
}

/// What the sequence loop produced, resumed sequences included.
pub(super) struct Outcome {
    /// One entry per sequence.
    pub sequences: Vec<SequenceInfo>,
    /// One summary per computed matrix.
    pub summaries: Vec<PositionSummary>,
    /// The positions that failed.
    pub failed: Vec<FailedPosition>,
    /// Sequences `--resume` found finished.
    pub skipped: usize,
    /// The layer sweep.
    pub layer_summary: Vec<LayerSummaryRow>,
    /// With `--mean`: the mean Fisher's summary.
    pub mean_summary: Option<Vec<MeanSummaryRow>>,
}

/// The run's metadata.json: hashes the weight files, then takes the `timings`.
pub(super) fn metadata(
    args: &ComputeArgs,
    run: &RunInfo<'_>,
    dims: &ModelDims,
    plan: &Plan,
    outcome: Outcome,
    timings: impl FnOnce() -> Timings,
) -> Result<Metadata> {
    let weights = run
        .files
        .weights
        .iter()
        .map(|p| Ok(WeightHash { path: p.clone(), sha256: fs_checkpoint::sha256_file(p)? }))
        .collect::<Result<Vec<_>>>()?;
    Ok(Metadata {
        tool: TOOL.into(),
        version: VERSION.into(),
        model: ModelInfo {
            spec: args.model.clone(),
            architecture: run.arch.into(),
            config: run.files.config.clone(),
            origin: (&run.files.origin).into(),
            weights,
            d_model: plan.d,
            vocab_size: dims.vocab_size,
            n_layers: dims.n_layers,
        },
        layers: plan.layers.clone(),
        hooks: plan.hooks.clone(),
        d_model: plan.d,
        n_sequences: plan.docs.len(),
        sequences: outcome.sequences,
        positions: plan.positions.clone(),
        token_ids: plan.token_ids(),
        text: args.text.clone(),
        input: args.input.clone(),
        estimator: args.estimator_settings(),
        distribution: args.distribution.to_string(),
        eig_rank: plan.eig_rank,
        format: args.format.extension().into(),
        dtype: "f32 GEMMs (model dtype), f64 accumulation of d×d results; stored as f32".into(),
        backend: run.backend.into(),
        device: run.device.clone(),
        resumed_sequences_skipped: outcome.skipped,
        n_failed_positions: outcome.failed.len(),
        failed_positions: outcome.failed,
        timings_s: timings(),
        readouts: args.readouts.settings(),
        layer_summary: outcome.layer_summary,
        mean_summary: outcome.mean_summary,
        summary: outcome.summaries,
    })
}

/// How a top-k trace is qualified where it is printed: ` ± SE (estimate)`, or nothing when it
/// is exact.
pub(crate) fn trace_error_note(std_error: Option<f64>) -> String {
    std_error.map(|se| format!(" ± {se:.1e} (estimate)")).unwrap_or_default()
}
