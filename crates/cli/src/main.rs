//! `fisher-stein`: the command-line front end, a thin layer over `fs-estimators`, `fs-checkpoint`
//! and the backend crates.
//!
//! Every error is one line on stderr (`error: …` naming the problem and the fix) with exit
//! code 2; nothing half-written is left behind (results files are written atomically). A run
//! that finished but recorded positions as failed on NaN/Inf exits with code 3.

use clap::{Parser, Subcommand};
use fisher_stein::{bench, compute, info, inspect, merge, process, report, steer, Globals};
use std::process::ExitCode;

/// Fisher information of a language model's next-token distribution with respect to an
/// intermediate activation: F = Jᵀ(diag p − p pᵀ)J at layer k, position t.
#[derive(Parser, Debug)]
#[command(name = "fisher-stein", version, about, long_about = None)]
struct Cli {
    /// No progress bar, summaries or warnings.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Log each step to stderr (with timestamps).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute Fisher matrices at one or more layers for chosen positions of one or more texts.
    Compute(Box<compute::ComputeArgs>),
    /// Summarise a results directory: entropy, trace, spectrum, and what the top directions do.
    Inspect(inspect::InspectArgs),
    /// Describe a model: architecture, sizes, parameters, tokenizer, where the files came from.
    Info(info::InfoArgs),
    /// Time the estimators on a random model of a named shape and print a table.
    Bench(bench::BenchArgs),
    /// Add the mean accumulators of `compute --mean --shard i/N` jobs into one result.
    Merge(merge::MergeArgs),
    /// What editing the activation along a direction costs: v̂ᵀFv̂, the second-order vs measured
    /// KL at several edit sizes, and the change of chosen tokens' log-probabilities.
    Edit(Box<steer::EditArgs>),
    /// Steer the next-token prediction to a target probability by the Euclidean gradient, the
    /// damped Fisher direction and a contrastive vector, and compare their off-target KL.
    Steer(Box<steer::SteerArgs>),
    /// Write a self-contained HTML report (plots, layer sweep, decoded directions) of a results
    /// directory, and its plots as PNG and SVG.
    Report(report::ReportArgs),
}

/// Restore the default SIGPIPE action so that `fisher-stein inspect DIR | head` ends quietly,
/// as Unix tools do, instead of panicking on a closed stdout.
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn default_sigpipe() {}

fn main() -> ExitCode {
    process::tune_allocator();
    default_sigpipe();
    process::pin_thread_count();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; usage errors are one line, exit code 2.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}: see `fisher-stein --help`", process::usage_error_line(&e));
            return ExitCode::from(2);
        }
    };
    // A hub model missing from the cache is downloaded with a progress bar (on a terminal).
    fs_checkpoint::set_download_progress(!cli.quiet);
    let g = Globals { quiet: cli.quiet, verbose: cli.verbose, start: std::time::Instant::now() };
    let result = match cli.command {
        Command::Compute(args) => compute::run(*args, &g),
        Command::Inspect(args) => inspect::run(args, &g),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Edit(args) => steer::run_edit(*args, &g),
        Command::Steer(args) => steer::run_steer(*args, &g),
        Command::Merge(args) => merge::run(args, &g),
        Command::Report(args) => report::run(args, &g),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", process::one_line(&e));
            // 3: the run finished, but some positions failed on NaN/Inf (listed in
            // metadata.json); 2: nothing (more) was computed.
            if e.downcast_ref::<compute::PartialFailure>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
