//! The Slurm path end to end, on a real single-node Slurm cluster this test starts itself
//! (`tools/install_slurm.sh`, `tools/slurm_single_node.sh`: Debian's slurmctld, slurmd and munge,
//! a generated slurm.conf on 127.0.0.1, every daemon stopped by its pid at the end):
//!
//! The commands are the README's "Running on a cluster" block as written (paths, layers and the
//! task count replaced by the test's):
//!
//! 1. `examples/slurm/submit.sh 4`: an array of 4 `compute --mean-only --shard i/4` tasks over a
//!    40-document corpus and the dependent merge job; the merged mean equals one job's mean
//!    (exact sums: ≤ 1e-12 relative), and so does the README's merge by hand.
//! 2. The same array with task 2 held at a known point (`FISHER_STEIN_STOP_AFTER_SEQUENCE`,
//!    after its second document) and cancelled there with `scancel`: it stops on the SIGTERM with
//!    its accumulator checkpointed, the dependent merge is cancelled, task 2 resubmitted alone
//!    (the README's `FS_SHARDS=… sbatch --array=…` line) resumes — skipping the documents it had
//!    finished — and the merged mean is again the one-job mean.
//!
//! Where Slurm cannot be installed (no apt, no root) the test prints why and returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{model_with_word_tokenizer, ok, read_safetensors, rel, Arrays};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fisher-stein")
}

/// A running single-node cluster; stopped (daemons killed by their pid files) on drop.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Install Slurm if needed and start the daemons; `Err` says why Slurm is unavailable.
    fn start() -> Result<Cluster, String> {
        let install = Command::new(repo().join("tools/install_slurm.sh")).output().unwrap();
        if !install.status.success() {
            return Err(String::from_utf8_lossy(&install.stderr).trim().to_string());
        }
        let dir = tempfile::tempdir().unwrap();
        // Two free ports (controller, node daemon) for this cluster.
        let port = (|| {
            for _ in 0..50 {
                let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
                let p = l.local_addr().ok()?.port();
                if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                    return Some(p);
                }
            }
            None
        })()
        .expect("two free ports");
        let out = Command::new(repo().join("tools/slurm_single_node.sh"))
            .args(["start", dir.path().to_str().unwrap()])
            .env("SLURM_TEST_PORT", port.to_string())
            .output()
            .unwrap();
        let cluster = Cluster { dir };
        ok(&out);
        Ok(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", self.dir.path().join("slurm.conf"));
        c
    }

    /// `scontrol show job ID` (every task of an array).
    fn show_job(&self, id: &str) -> String {
        ok(&self.command("scontrol").args(["show", "job", id]).output().unwrap())
    }

    /// The `JobState` of every task of job `id`.
    fn states(&self, id: &str) -> Vec<String> {
        self.show_job(id)
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("JobState="))
            .map(str::to_string)
            .collect()
    }

    /// Wait until every task of job `id` has left the queue (the scheduler's own record: no
    /// task PENDING, RUNNING, SUSPENDED, …); returns the final states. The deadline bounds a
    /// hung cluster, it does not synchronise anything.
    fn wait_done(&self, id: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let states = self.states(id);
            let done =
                ["COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"];
            if !states.is_empty() && states.iter().all(|s| done.contains(&s.as_str())) {
                return states;
            }
            assert!(Instant::now() < deadline, "job {id} still {states:?} after 300 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("tools/slurm_single_node.sh"))
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status();
    }
}

/// Poll `path` until it contains `needle` (the event a test waits for), up to 300 s.
fn wait_for_line(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < deadline, "{} never said {needle:?}:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The merged mean equals the one-job mean: same counts and documents, sums and means within
/// 1e-12 relative.
fn assert_same_mean(merged: &Arrays, single: &Arrays, what: &str) {
    assert_eq!(merged["count"], single["count"], "{what}: counts");
    assert_eq!(merged["sequences"], single["sequences"], "{what}: documents");
    let sum = |r: &Arrays| -> Vec<f64> {
        r["fisher_sum"].1.iter().zip(&r["fisher_sum_lo"].1).map(|(h, l)| h + l).collect()
    };
    let e_sum = rel(&sum(merged), &sum(single));
    let e_mean = rel(&merged["fisher_mean"].1, &single["fisher_mean"].1);
    println!("{what}: merged vs one job, relative error of the sum {e_sum:.1e}, of the mean {e_mean:.1e}");
    assert!(e_sum <= 1e-12 && e_mean <= 1e-12, "{what}: {e_sum:.3e} {e_mean:.3e}");
}

#[test]
fn slurm_array_and_merge_equal_one_job_and_survive_a_cancelled_task() {
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(why) => {
            println!("SKIPPED: Slurm cannot be installed on this machine: {why}");
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("model");
    model_with_word_tokenizer(&model);
    // 40 documents of 3–12 words from a fixed xorshift stream.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let docs: Vec<String> = (0..40)
        .map(|_| {
            let words = 3 + next(10);
            (0..words).map(|_| format!("w{}", next(200))).collect::<Vec<_>>().join(" ")
        })
        .collect();
    let corpus = root.path().join("docs.txt");
    std::fs::write(&corpus, docs.join("\n") + "\n").unwrap();

    // The reference: one job over every document.
    let single = root.path().join("single");
    ok(&Command::new(bin())
        .args(["-q", "compute", "--model", model.to_str().unwrap()])
        .args(["--input", corpus.to_str().unwrap(), "--layers", "1,3", "--positions", "all"])
        .args(["--mean-only", "--output", single.to_str().unwrap()])
        .output()
        .unwrap());
    let single = read_safetensors(&single.join("mean.safetensors"));

    // The README's block: the export line, then submit, merge by hand, resubmit one task.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block: String = readme
        .lines()
        .skip_while(|l| *l != "### Running on a cluster")
        .skip_while(|l| *l != "```sh")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect::<Vec<_>>()
        .join("\n");
    let commands_for = |out: &Path| -> Vec<String> {
        let mut text = block.replace("\\\n", " ");
        let model_arg = format!("{:?}", model.to_str().unwrap());
        for (from, to) in [
            ("$PWD/target/release/fisher-stein", "@BIN@"),
            ("target/release/fisher-stein", "@BIN@"),
            ("\"$(tools/fetch_smollm2.sh)\"", model_arg.as_str()),
            ("FS_INPUT=docs.txt", &format!("FS_INPUT={}", corpus.display())),
            ("FS_LAYERS=10,20", "FS_LAYERS=1,3"),
            ("/scratch/fisher", out.to_str().unwrap()),
            ("submit.sh 8", "submit.sh 4"),
            ("FS_SHARDS=8", "FS_SHARDS=4"),
            ("--array=3", "--array=2"),
        ] {
            assert!(text.contains(from), "the README's cluster block no longer has {from:?}");
            text = text.replace(from, to);
        }
        text.replace("@BIN@", bin()).lines().map(str::to_string).collect()
    };
    // Run the export line and then line `k` of the block, in the repository, with `env`.
    let run = |out: &Path, k: usize, env: &[(&str, &str)]| -> String {
        let commands = commands_for(out);
        assert_eq!(commands.len(), 4, "{commands:?}");
        let mut c = cluster.command("bash");
        c.arg("-ec").arg(format!("{}\n{}", commands[0], commands[k])).current_dir(repo());
        for (key, value) in env {
            c.env(key, value);
        }
        ok(&c.output().unwrap())
    };
    let submit = |out: &Path, env: &[(&str, &str)]| -> (String, String) {
        let stdout = run(out, 1, env);
        let id = |what: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(what))
                .unwrap_or_else(|| panic!("submit.sh printed no {what:?}: {stdout}"))
                .trim()
                .to_string()
        };
        (id("array "), id("merge "))
    };
    let merged = |out: &Path| read_safetensors(&out.join("mean/mean.safetensors"));

    // 1. The array and its merge.
    let out = root.path().join("run1");
    let (array, merge) = submit(&out, &[]);
    assert_eq!(cluster.wait_done(&merge), ["COMPLETED"], "{}", cluster.show_job(&merge));
    assert!(cluster.wait_done(&array).iter().all(|s| s == "COMPLETED"));
    println!("--- scontrol show job {array}\n{}", cluster.show_job(&array));
    println!("--- scontrol show job {merge}\n{}", cluster.show_job(&merge));
    assert_same_mean(&merged(&out), &single, "array of 4, merge job");
    run(&out, 2, &[]);
    assert_same_mean(&merged(&out), &single, "array of 4, merged by hand");

    // 2. Task 2 (documents 2, 6, 10, …) holds after document 6, is cancelled there, and
    // is resubmitted alone.
    let out = root.path().join("run2");
    let (array, merge) = submit(&out, &[("FISHER_STEIN_STOP_AFTER_SEQUENCE", "6")]);
    let log = out.join("logs/task-2.log");
    wait_for_line(&log, "sequence 6: holding for SIGTERM");
    ok(&cluster.command("scancel").arg(format!("{array}_2")).output().unwrap());
    assert_eq!(cluster.wait_done(&format!("{array}_2")), ["CANCELLED"]);
    let text = wait_for_line(&log, "stopped by SIGTERM before sequence 10");
    assert!(text.contains("rerun with --resume"), "{text}");
    // The merge depended on every task succeeding: Slurm cancelled it.
    assert_eq!(cluster.wait_done(&merge), ["CANCELLED"], "{}", cluster.show_job(&merge));
    println!("--- scontrol show job {array} (task 2 cancelled)\n{}", cluster.show_job(&array));
    // sbatch says "Submitted batch job N".
    let resubmitted = run(&out, 3, &[]).split_whitespace().last().unwrap().to_string();
    assert_eq!(
        cluster.wait_done(&resubmitted),
        ["COMPLETED"],
        "{}",
        cluster.show_job(&resubmitted)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    for done in [2, 6] {
        assert!(
            text.contains(&format!("sequence {done}: fisher_seq_{done:06}"))
                && text.contains("skipped (--resume)"),
            "the resubmitted task did not skip document {done}:\n{text}"
        );
    }
    run(&out, 2, &[]);
    println!(
        "--- scontrol show job {resubmitted} (task 2 resubmitted)\n{}",
        cluster.show_job(&resubmitted)
    );
    assert_same_mean(&merged(&out), &single, "array of 4, task 2 cancelled and resubmitted");
}
