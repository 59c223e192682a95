//! `fisher-stein`: the command-line front end. A thin layer over `fs-estimators` and the backend
//! crates; in this milestone no model backend is compiled in yet, so the binary reports its
//! version and what it links, and refuses every subcommand with a message naming why.

use std::process::ExitCode;

const USAGE: &str = "\
fisher-stein — Fisher information of a language model's next-token distribution
with respect to an intermediate activation: F = J^T (diag p - p p^T) J.

USAGE:
    fisher-stein --version
    fisher-stein --help

No model backend is compiled into this build yet: `compute` arrives with the candle
GPT-2 backend. To use the estimators today, link the `fs-estimators` crate and
implement `fs_traits::SplitModel` for your model (see
crates/fs-estimators/examples/custom_model.rs).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("-V") => {
            println!("fisher-stein {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        None | Some("--help") | Some("-h") | Some("help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!(
                "error: unknown subcommand or flag `{other}`: this build has no model backend yet; run `fisher-stein --help`"
            );
            ExitCode::from(2)
        }
    }
}
