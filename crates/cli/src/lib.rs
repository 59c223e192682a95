//! `fisher-stein` as a library: the modules of the command-line tool (`src/main.rs` is a thin
//! binary over them). Exposed so that the fuzz targets (`fuzz/`) can call the results readers
//! ([`results::read_results_bytes`], [`npz::read_npz`], [`dataset::MeanState::from_bytes`]);
//! not a stable API.
//!
//! The modules depend on each other in one direction only (no cycles):
//!
//! * the jobs, one per subcommand: [`compute`], [`inspect`], [`report`], [`merge`], [`info`],
//!   [`bench`](mod@bench);
//! * what they share: [`backends`] (loading through the registry, `fs-engines`), [`dataset`] (means,
//!   `--shard`), [`readouts`] (direction read-outs, the layer sweep), [`plots`];
//! * at the bottom: [`results`] (every results format as serde types, and the results-file
//!   reader), [`output`] (atomic writes, locks, safetensors), [`npz`], [`inputs`],
//!   [`positions`], [`layers`] (split layers by index or TransformerLens hook name),
//!   [`signals`] (a clean stop on `SIGTERM`, interrupts), [`process`] (per-process settings,
//!   one-line errors).

pub mod backends;
pub mod bench;
pub mod compute;
pub mod dataset;
pub mod info;
pub mod inputs;
pub mod inspect;
pub mod layers;
pub mod merge;
pub mod npz;
pub mod output;
pub mod plots;
pub mod positions;
pub mod process;
pub mod readouts;
pub mod report;
pub mod results;
pub mod sae;
pub mod signals;
pub mod steer;

/// Options every subcommand shares.
pub struct Globals {
    /// `--quiet`.
    pub quiet: bool,
    /// `--verbose`.
    pub verbose: bool,
    /// When the process started.
    pub start: std::time::Instant,
}

impl Globals {
    /// Log a step to stderr with `--verbose`.
    pub fn log(&self, msg: &str) {
        if self.verbose {
            eprintln!("[{:>8.3} s] {msg}", self.start.elapsed().as_secs_f64());
        }
    }

    /// A progress bar over `total` positions on stderr: positions/s and ETA; hidden with
    /// `--quiet` or when stderr is not a terminal.
    pub fn progress(&self, total: u64) -> indicatif::ProgressBar {
        use std::io::IsTerminal;
        if self.quiet || !std::io::stderr().is_terminal() {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} positions  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    }
}
