//! `fisher-stein`: the command-line front end, a thin layer over `fs-estimators`, `fs-checkpoint`
//! and the backend crates.
//!
//! Every error is one line on stderr (`error: …` naming the problem and the fix) with exit
//! code 2; nothing half-written is left behind (results files are written atomically). A run
//! that finished but recorded positions as failed on NaN/Inf exits with code 3.

use clap::{Parser, Subcommand};
use fisher_stein::{bench, compute, info, inspect, merge, report, Globals};
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
    /// Write a self-contained HTML report (plots, layer sweep, decoded directions) of a results
    /// directory, and its plots as PNG and SVG.
    Report(report::ReportArgs),
}

/// Keep freed tensor-sized blocks (up to 32 MiB, glibc's maximum) in the heap instead of
/// unmapping them: the backward passes allocate and free many such buffers, and every freshly
/// mapped page is zeroed by the kernel on first touch (≈ 8% of the exact estimator's time when
/// profiled with `perf`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

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

/// Fix the worker-thread count once, before any thread starts: candle 0.11 otherwise re-reads
/// the CPU topology from `/proc` on every matmul (`RAYON_NUM_THREADS` unset), which cost 12% of
/// the top-K estimator's time on the SmolLM2 shape. The value is candle's own default (physical
/// cores), so candle's kernels run as before; rayon's pool (faer's products) follows it. A
/// `RAYON_NUM_THREADS` the user set is left alone.
fn pin_thread_count() {
    #[cfg(feature = "candle")]
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", backend_candle::default_threads().to_string());
    }
}

fn main() -> ExitCode {
    tune_allocator();
    default_sigpipe();
    pin_thread_count();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; usage errors are one line, exit code 2.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
            let first = first.trim_start_matches("error: ");
            let hint = text
                .lines()
                .find(|l| l.contains("possible values"))
                .map(|l| format!(" ({})", l.trim().trim_start_matches('[').trim_end_matches(']')))
                .unwrap_or_default();
            eprintln!("error: {first}{hint}: see `fisher-stein --help`");
            return ExitCode::from(2);
        }
    };
    let g = Globals { quiet: cli.quiet, verbose: cli.verbose, start: std::time::Instant::now() };
    let result = match cli.command {
        Command::Compute(args) => compute::run(*args, &g),
        Command::Inspect(args) => inspect::run(args, &g),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Merge(args) => merge::run(args, &g),
        Command::Report(args) => report::run(args, &g),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
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

/// The error and its causes on one line, without repeating a cause its parent already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
