//! What the binary and the Python module do once per process (allocator and thread-count
//! settings), and how errors become the one line the user sees.

/// Keep freed tensor-sized blocks (up to 32 MiB, glibc's maximum) in the heap instead of
/// unmapping them: the backward passes allocate and free many such buffers, and every freshly
/// mapped page is zeroed by the kernel on first touch (≈ 8% of the exact estimator's time when
/// profiled with `perf`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Fix the worker-thread count once, before any thread starts: candle 0.11 otherwise re-reads
/// the CPU topology from `/proc` on every matmul (`RAYON_NUM_THREADS` unset), which cost 12% of
/// the top-K estimator's time on the SmolLM2 shape. The value is candle's own default (physical
/// cores), so candle's kernels run as before; rayon's pool (faer's products) follows it. A
/// `RAYON_NUM_THREADS` the user set is left alone.
pub fn pin_thread_count() {
    #[cfg(feature = "candle")]
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", backend_candle::default_threads().to_string());
    }
}

/// The error and its causes on one line, without repeating a cause its parent already quotes.
pub fn one_line(e: &anyhow::Error) -> String {
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

/// A clap usage error on one line: its first line without `error: `, and the possible values
/// when clap lists them.
pub fn usage_error_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
    let first = first.trim_start_matches("error: ");
    let hint = text
        .lines()
        .find(|l| l.contains("possible values"))
        .map(|l| format!(" ({})", l.trim().trim_start_matches('[').trim_end_matches(']')))
        .unwrap_or_default();
    format!("{first}{hint}")
}
