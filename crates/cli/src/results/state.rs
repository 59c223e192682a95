//! `.state/seq_NNNNNN.json`: what `compute --resume` needs of a finished sequence.

use super::{compact_json, FailedPosition, PositionSummary};
use crate::output::write_atomic;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a resumed run needs to know of a finished sequence to write the same metadata.json as an
/// uninterrupted run: its summaries and its failed positions. Kept (hidden, inside the results
/// directory) in `.state/seq_NNNNNN.json`, written once the sequence's results file is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SequenceState {
    /// The sequence's per-position summaries.
    pub summaries: Vec<PositionSummary>,
    /// Its failed positions.
    pub failed: Vec<FailedPosition>,
}

impl SequenceState {
    /// The state file of sequence `i` in the results directory `dir`.
    pub fn path(dir: &Path, i: usize) -> PathBuf {
        dir.join(".state").join(format!("seq_{i:06}.json"))
    }

    /// Write `path` atomically (compact JSON), creating `.state/`.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        write_atomic(path, &compact_json(self)?)
    }

    /// Read `path`; one line naming it if it is not a state file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(path, &bytes)
    }

    /// [`SequenceState::read`] on the file's bytes; `path` names the file in messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|_| {
            anyhow!("{} is corrupt: re-run with --force to start over", path.display())
        })
    }
}
