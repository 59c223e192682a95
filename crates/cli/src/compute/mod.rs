//! `fisher-stein compute`: Fisher matrices of a model at one or more layers, for chosen positions
//! of one or more texts.
//!
//! Everything the user gave is checked (model, tokenizer, every document, layers, positions,
//! estimator options) before the results directory is created. Then each sequence's results go
//! to their own file, written atomically; `metadata.json` is written last. A killed run leaves
//! only complete files and continues with `--resume` without recomputing them.
//!
//! One call, file by file:
//!
//! * `args`: the flags ([`ComputeArgs`], [`ReadoutArgs`]) and the checks that need no model;
//!   the estimator's and read-outs' settings as recorded;
//! * `run` ([`run()`]): the output directory and its lock, the model loaded through the engine
//!   registry, then the loop over sequences (`--resume` skips finished ones), the mean
//!   accumulator, metadata.json;
//! * `plan`: the flags resolved against the model into a plan (layers, documents,
//!   positions, eigenpairs stored) and the settings it records (run.json, the accumulator's);
//! * `estimate`: one sequence's matrices (the estimator dispatch, batches, read-outs);
//! * `failures`: NaN/Inf fail their position only ([`PartialFailure`], exit code 3);
//! * `write`: each sequence's results file and the summaries, metadata.json.

mod args;
mod estimate;
mod failures;
mod plan;
mod run;
mod write;

pub use args::{ComputeArgs, Estimator, Format, ReadoutArgs};
pub use failures::PartialFailure;
pub use run::{run, run_on};
pub(crate) use write::trace_error_note;
