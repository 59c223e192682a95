//! `fisher-stein`: the command-line front end, a thin layer over `fs-estimators`, `fs-checkpoint`
//! and the backend crates.
//!
//! Every error is one line on stderr (`error: …` naming the problem and the fix) with exit
//! code 2; nothing half-written is left behind (results directories are written atomically).

mod bench;
mod compute;
mod output;
mod positions;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Fisher information of a language model's next-token distribution with respect to an
/// intermediate activation: F = Jᵀ(diag p − p pᵀ)J at layer k, position t.
#[derive(Parser, Debug)]
#[command(name = "fisher-stein", version, about, long_about = None)]
struct Cli {
    /// No progress or summary output.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute Fisher matrices at a layer for chosen positions of a text.
    Compute(compute::ComputeArgs),
    /// Time the estimators on a random model of a named shape and print a table.
    Bench(bench::BenchArgs),
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

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; usage errors exit with 2.
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let result = match cli.command {
        Command::Compute(args) => compute::run(args, cli.quiet),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
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
