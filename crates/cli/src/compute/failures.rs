//! The failure policy: a NaN or infinity fails only its position (recorded, warned about, exit
//! code 3 at the end: [`PartialFailure`]); with `--fail-fast` it stops the run; any other error
//! (I/O, a bad argument) stops the run at once.

use crate::results::FailedPosition;
use crate::Globals;
use anyhow::{bail, Result};
use fs_estimators::FsError;
use std::path::PathBuf;

/// A run that finished every position it could, with some positions failed on NaN or
/// infinity (they are listed in metadata.json). `main` exits with code 3 for it.
#[derive(Debug)]
pub struct PartialFailure {
    /// Positions (layer × position × sequence) that failed.
    pub failed: usize,
    /// Positions requested.
    pub total: usize,
    /// The first failure's message.
    pub first: String,
    /// The metadata file listing every failure.
    pub metadata: PathBuf,
}

impl std::fmt::Display for PartialFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} positions failed on non-finite values (first: {}); every other result is written, the failures are listed under \"failed_positions\" in {}: check the weights and inputs, or pass --fail-fast to stop at the first",
            self.failed,
            self.total,
            self.first,
            self.metadata.display()
        )
    }
}

impl std::error::Error for PartialFailure {}

/// Whether an estimator error is a numerical fault of one position (NaN or infinity met in
/// activations, logits, probabilities or results; a linear-algebra breakdown), as opposed to a
/// fault of the run (I/O, a bad argument), which stops the run.
pub(super) fn is_numerical(e: &anyhow::Error) -> bool {
    e.downcast_ref::<FsError>().is_some_and(is_numerical_fs)
}

/// [`is_numerical`] for an error of a model pass.
pub(super) fn is_numerical_fs(e: &FsError) -> bool {
    matches!(
        e,
        FsError::NonFinite { .. } | FsError::NotAProbability { .. } | FsError::LinearAlgebra(_)
    )
}

/// Record a failed position (or, with `--fail-fast`, stop the run with it).
pub(super) fn record_failure(
    sequence: usize,
    layer: usize,
    position: usize,
    e: anyhow::Error,
    fail_fast: bool,
    g: &Globals,
    failed: &mut Vec<FailedPosition>,
) -> Result<()> {
    let message = format!("document {sequence} layer {layer} position {position}: {e:#}");
    if fail_fast {
        bail!("{message} (--fail-fast): check the weights and inputs for NaN/Inf, or drop --fail-fast to record failed positions and go on");
    }
    if !g.quiet {
        eprintln!("warning: {message}; recorded as failed, continuing");
    }
    failed.push(FailedPosition { sequence, layer, position, error: message });
    Ok(())
}
