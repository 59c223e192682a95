//! The documented commands cannot drift from the binary's flags: every `fisher-stein SUBCOMMAND …`
//! in a code block of README.md or docs/*.md names a subcommand the binary has and only flags that
//! subcommand accepts (its `--help`), and the README's synopsis lists every subcommand. (The
//! README's main command and worked example are also run as written, with their output compared:
//! `tests/workflows.rs`.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fisher-stein"))
}

/// The subcommands `fisher-stein --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let out = bin().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// The logical lines (continuations ending in `\` joined) of every fenced code block of `text`.
fn code_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                lines.push(std::mem::take(&mut pending));
            }
        }
    }
    lines
}

/// `(subcommand, flags)` of each `fisher-stein SUB …` invocation in `line` (several per line
/// when chained with `&&`, `|`, `;`); a `#` comment ends the line.
fn invocations(line: &str, subs: &[String]) -> Vec<(String, Vec<String>)> {
    let line = line.split(" # ").next().unwrap_or(line);
    let mut found = Vec::new();
    for part in line.split("&&").flat_map(|p| p.split(" | ")).flat_map(|p| p.split("; ")) {
        let words: Vec<&str> = part.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| w.ends_with("fisher-stein")) else { continue };
        let Some(sub) = words.get(at + 1).filter(|s| subs.iter().any(|c| c == *s)) else {
            continue;
        };
        let flags = words[at + 2..]
            .iter()
            .flat_map(|w| w.split('/'))
            .map(|w| w.trim_start_matches(['[', '(']))
            .filter(|w| w.starts_with('-') && w.len() > 1 && !w[1..].starts_with(char::is_numeric))
            .map(|w| {
                let w = w.split('=').next().unwrap();
                w.trim_end_matches(|c: char| !(c.is_alphanumeric() || c == '-')).to_string()
            })
            .collect();
        found.push((sub.to_string(), flags));
    }
    found
}

/// Whether `help` mentions `flag` as a whole word (`--layer` is not found in `--layers`).
fn mentions(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let next = help[i + flag.len()..].chars().next();
        let prev = help[..i].chars().next_back();
        !next.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
            && !prev.is_some_and(|c| c.is_alphanumeric() || c == '-')
    })
}

#[test]
fn documented_commands_use_only_flags_the_binary_has() {
    let subs = subcommands();
    let expected = ["compute", "inspect", "info", "bench", "merge", "edit", "steer", "report"];
    assert_eq!(subs, expected, "subcommands");
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let help = |sub: &str| {
        let out = bin().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
        String::from_utf8(out.stdout).unwrap()
    };
    let helps: Vec<(String, String)> = subs.iter().map(|s| (s.clone(), help(s))).collect();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for line in code_lines(&text) {
            for (sub, flags) in invocations(&line, &subs) {
                let help = &helps.iter().find(|(s, _)| *s == sub).unwrap().1;
                for flag in flags {
                    assert!(
                        mentions(help, &flag),
                        "{}: `fisher-stein {sub}` has no flag {flag}: {line}",
                        file.display()
                    );
                    checked += 1;
                }
            }
        }
    }
    // The docs' command blocks held 84 flags (2026-11-30); far fewer means the parser stopped
    // seeing them.
    assert!(checked >= 60, "only {checked} documented flags found");
    println!("{checked} documented flags checked in {} files", files.len());
    // The README's synopsis names every subcommand.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let synopsis: Vec<String> = readme
        .lines()
        .skip_while(|l| *l != "## The command line")
        .skip_while(|l| !l.starts_with("```"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(str::to_string)
        .collect();
    for sub in &subs {
        let prefix = format!("fisher-stein {sub} ");
        assert!(synopsis.iter().any(|l| l.starts_with(&prefix)), "README synopsis lacks {sub}");
    }
}

#[test]
fn the_flag_parser_sees_what_a_reader_sees() {
    let subs: Vec<String> = ["compute", "report", "merge"].map(String::from).to_vec();
    let line = "fisher-stein compute --model M --layer 3 [--top-k 3] -q --positions=all \
                && fisher-stein report /tmp/x # --not-a-flag";
    assert_eq!(
        invocations(line, &subs),
        [
            (
                "compute".to_string(),
                ["--model", "--layer", "--top-k", "-q", "--positions"].map(String::from).to_vec()
            ),
            ("report".to_string(), vec![]),
        ]
    );
    assert_eq!(
        invocations("fisher-stein merge DIR... --output DIR [--force] -q/--quiet", &subs)[0].1,
        ["--output", "--force", "-q", "--quiet"]
    );
    assert!(mentions("  --layer <K>  x", "--layer") && !mentions("  --layers <K>", "--layer"));
    assert!(!mentions("  --top-k-x", "--top-k"));
    assert_eq!(code_lines("a\n```sh\nx \\\n  y\nz\n```\nb"), ["x   y", "z"]);
}
