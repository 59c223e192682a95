//! `--model org/name` downloads from the Hugging Face Hub: here a loopback HTTP/1.1 server
//! (`std::net`, a thread per connection) that serves the hub's layout — `GET
//! /api/models/ORG/NAME/revision/REV` (commit + file list) and `GET /ORG/NAME/resolve/REV/FILE`
//! honouring `Range`, with `ETag` / `X-Linked-Etag` / `X-Repo-Commit` — for repositories made
//! from the `gpt2-tiny-b` fixture. `HF_ENDPOINT` points at it, `HF_HOME` / `HF_HUB_CACHE` at
//! temporary directories; nothing reaches the real hub. Every test records the requests the
//! server saw.

#![cfg(feature = "download")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use sha1::Digest;

mod common;

const TOKEN: &str = "hf_loopback_test_token";
const TEXT: &str = "w1 w2 w3 w4 w5 w6";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fisher-stein"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// `git hash-object`: sha1 of `blob LEN\0` + content.
fn git_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

/// One repository on the loopback hub.
struct Repo {
    commit: String,
    /// File name → (content, stored in LFS).
    files: BTreeMap<String, (Vec<u8>, bool)>,
    /// The bearer token its files need (a gated model); its file list is public, as on the hub.
    token: Option<String>,
}

/// One request the server saw.
#[derive(Clone, Debug)]
struct Request {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    log: Mutex<Vec<Request>>,
    /// A file whose next full transfer stops after half its bytes.
    cut_once: Mutex<Option<String>>,
    /// A file served with its last byte changed.
    corrupt: Mutex<Option<String>>,
}

/// The loopback hub: serves until [`Hub::stop`] (or drop).
struct Hub {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Hub {
    fn start(repos: BTreeMap<String, Repo>) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State { repos, ..State::default() });
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(&s, stream);
                });
            }
        });
        Hub { addr, state, stop, thread: Some(thread) }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Close the listening socket: later connections are refused.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    /// The files of `repo_id` requested through `resolve/` (metadata probes included).
    fn fetched(&self, repo_id: &str) -> Vec<String> {
        let prefix = format!("/{repo_id}/resolve/");
        self.requests()
            .iter()
            .filter_map(|r| r.path.strip_prefix(&prefix))
            .map(|rest| rest.split_once('/').map(|(_, f)| f.to_string()).unwrap_or_default())
            .collect()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answer one request (each connection carries one: `Connection: close`).
fn serve(state: &State, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    state.log.lock().unwrap().push(Request {
        path: path.clone(),
        range: range.clone(),
        auth: auth.clone(),
    });
    let mut out = stream;
    let reply = |out: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        out.write_all(head.as_bytes())?;
        out.write_all(body)?;
        out.flush()
    };
    let error = |out: &mut TcpStream, status: &str, code: &str| {
        reply(out, status, &[("X-Error-Code", code.to_string())], code.as_bytes())
    };

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo_id, rev)) = rest.split_once("/revision/") else {
            return error(&mut out, "404 Not Found", "RepositoryNotFound");
        };
        let Some(repo) = state.repos.get(repo_id) else {
            return error(&mut out, "404 Not Found", "RepositoryNotFound");
        };
        if rev != "main" && rev != repo.commit {
            return error(&mut out, "404 Not Found", "RevisionNotFound");
        }
        let siblings: Vec<_> =
            repo.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": repo_id, "sha": repo.commit, "siblings": siblings });
        let json = ("Content-Type", "application/json".to_string());
        return reply(&mut out, "200 OK", &[json], body.to_string().as_bytes());
    }
    // /ORG/NAME/resolve/REV/FILE
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return error(&mut out, "404 Not Found", "RepositoryNotFound");
    }
    let repo_id = format!("{}/{}", parts[0], parts[1]);
    let (rev, file) = (parts[3], parts[4]);
    let Some(repo) = state.repos.get(&repo_id) else {
        return error(&mut out, "404 Not Found", "RepositoryNotFound");
    };
    if let Some(t) = &repo.token {
        if auth.as_deref() != Some(&format!("Bearer {t}")) {
            return error(&mut out, "401 Unauthorized", "GatedRepo");
        }
    }
    if rev != "main" && rev != repo.commit {
        return error(&mut out, "404 Not Found", "RevisionNotFound");
    }
    let Some((content, lfs)) = repo.files.get(file) else {
        return error(&mut out, "404 Not Found", "EntryNotFound");
    };
    let mut headers = vec![
        ("X-Repo-Commit", repo.commit.clone()),
        ("ETag", format!("\"{}\"", git_sha1(content))),
    ];
    if *lfs {
        headers.push(("X-Linked-Etag", format!("\"{}\"", sha256(content))));
    }
    let mut body = content.clone();
    if state.corrupt.lock().unwrap().as_deref() == Some(file) {
        *body.last_mut().unwrap() ^= 0xff;
    }
    let n = body.len();
    let Some(range) = range else {
        return reply(&mut out, "200 OK", &headers, &body);
    };
    let spec = range.strip_prefix("bytes=").unwrap_or("");
    let (a, b) = spec.split_once('-').unwrap_or(("", ""));
    let start: usize = a.parse().unwrap_or(0);
    let end: usize = b.parse().map(|e: usize| e.min(n - 1)).unwrap_or(n - 1);
    if start >= n || start > end {
        headers.push(("Content-Range", format!("bytes */{n}")));
        return reply(&mut out, "416 Range Not Satisfiable", &headers, b"");
    }
    headers.push(("Content-Range", format!("bytes {start}-{end}/{n}")));
    let part = &body[start..=end];
    let mut cut = state.cut_once.lock().unwrap();
    if cut.as_deref() == Some(file) && start == 0 && end == n - 1 {
        *cut = None;
        // Announce the whole file, send half of it, hang up.
        let mut head = "HTTP/1.1 206 Partial Content\r\nConnection: close\r\n".to_string();
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {n}\r\n\r\n"));
        out.write_all(head.as_bytes())?;
        out.write_all(&part[..n / 2])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    drop(cut);
    reply(&mut out, "206 Partial Content", &headers, part)
}

/// The model every repository is made of: `gpt2-tiny-b` with a word-level tokenizer.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        common::model_with_word_tokenizer(t.path());
        t
    })
    .path()
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(model_dir().join(name)).unwrap()
}

/// The repositories: `org/tiny` (the model plus files that must never be fetched), `org/gated`
/// (its files need [`TOKEN`]), `org/sharded` (the weights in two shards and an index),
/// `org/binonly` (PyTorch weights only).
fn repos() -> BTreeMap<String, Repo> {
    let commit = |c: char| c.to_string().repeat(40);
    let file = |name: &str, lfs: bool| (name.to_string(), (read(name), lfs));
    let junk = |n: usize| (0..n).map(|i| (i * 7 % 256) as u8).collect::<Vec<u8>>();
    let tiny: BTreeMap<_, _> = [
        file("config.json", false),
        file("tokenizer.json", false),
        file("model.safetensors", true),
        ("README.md".into(), (b"# tiny\n".to_vec(), false)),
        (".gitattributes".into(), (b"*.bin filter=lfs\n".to_vec(), false)),
        ("pytorch_model.bin".into(), (junk(1 << 20), true)),
        ("vocab.json".into(), (b"{}".to_vec(), false)),
        ("merges.txt".into(), (b"#version: 0.2\n".to_vec(), false)),
    ]
    .into_iter()
    .collect();

    // Two shards: alternate tensors, and the index naming them.
    let weights = read("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut shards = BTreeMap::new();
    let mut weight_map = serde_json::Map::new();
    for k in 0..2 {
        let name = format!("model-0000{}-of-00002.safetensors", k + 1);
        let mine: Vec<_> = tensors.iter().skip(k).step_by(2).cloned().collect();
        for (t, _) in &mine {
            weight_map.insert(t.clone(), serde_json::json!(name));
        }
        shards.insert(name, (safetensors::serialize(mine, None).unwrap(), true));
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    let mut sharded: BTreeMap<_, _> =
        [file("config.json", false), file("tokenizer.json", false)].into_iter().collect();
    sharded.insert("model.safetensors.index.json".into(), (index.to_string().into_bytes(), false));
    sharded.extend(shards);

    let binonly = [file("config.json", false), ("pytorch_model.bin".into(), (junk(4096), true))];
    [
        ("org/tiny", Repo { commit: commit('a'), files: tiny.clone(), token: None }),
        ("org/gated", Repo { commit: commit('b'), files: tiny, token: Some(TOKEN.into()) }),
        ("org/sharded", Repo { commit: commit('c'), files: sharded, token: None }),
        (
            "org/binonly",
            Repo { commit: commit('d'), files: binonly.into_iter().collect(), token: None },
        ),
    ]
    .into_iter()
    .map(|(id, r)| (id.to_string(), r))
    .collect()
}

/// A child process with a clean hub environment: `HF_HOME` = `home` (so no real token file is
/// read), the endpoint given, no proxy, token, offline switch or other cache.
fn hub_cmd(home: &Path, endpoint: &str) -> Command {
    let mut c = bin();
    for v in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "XDG_CACHE_HOME",
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("HF_HOME", home).env("HOME", home).env("HF_ENDPOINT", endpoint);
    c
}

fn compute_args(model: &str, out: &Path) -> Vec<String> {
    ["compute", "--model", model, "--layer", "1", "--text", TEXT, "--positions", "all"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--output".to_string(), out.display().to_string(), "--force".to_string()])
        .collect()
}

/// The Fisher matrices of a results directory.
fn fisher(out: &Path) -> Vec<f64> {
    common::read_safetensors(&out.join("fisher.safetensors")).remove("fisher").unwrap().1
}

/// The same compute on the local model directory (once per test binary).
fn local_fisher() -> &'static [f64] {
    static F: OnceLock<Vec<f64>> = OnceLock::new();
    F.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("local");
        let o = bin().args(compute_args(model_dir().to_str().unwrap(), &out)).output().unwrap();
        common::ok(&o);
        fisher(&out)
    })
}

/// A failure: exit code 2, one line on stderr, no panic. Returns the line.
fn failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    stderr
}

/// Every file under `dir`, recursively (symlinks not followed).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries {
        let p = e.unwrap().path();
        if p.symlink_metadata().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn repo_dir(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

fn part_files(cache: &Path) -> Vec<PathBuf> {
    walk(cache).into_iter().filter(|p| p.extension().is_some_and(|e| e == "part")).collect()
}

/// (1) The first run downloads what the model needs — nothing else — and computes what the
/// local directory gives, bit for bit; (2) later runs use the cache without the network, also
/// with the server gone; `info` names the cache snapshot.
#[test]
fn downloads_only_what_is_needed_then_works_from_the_cache() {
    let mut hub = Hub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("run");
    let o = hub_cmd(home.path(), &hub.endpoint())
        .args(compute_args("org/tiny", &out))
        .output()
        .unwrap();
    common::ok(&o);
    assert_eq!(fisher(&out), local_fisher(), "downloaded model differs from the local one");

    // One question about the repository, then config, tokenizer and weights (each a metadata
    // probe `bytes=0-0` and the transfer); never README.md, .gitattributes, pytorch_model.bin,
    // nor vocab.json / merges.txt (tokenizer.json is there).
    let reqs = hub.requests();
    let api = "/api/models/org/tiny/revision/main";
    assert_eq!(reqs.iter().filter(|r| r.path == api).count(), 1, "{reqs:?}");
    let mut fetched = hub.fetched("org/tiny");
    fetched.sort();
    fetched.dedup();
    assert_eq!(fetched, ["config.json", "model.safetensors", "tokenizer.json"], "{reqs:?}");
    assert!(reqs.iter().all(|r| r.auth.is_none()), "a token was sent though none is set");

    // The standard cache layout under HF_HOME/hub, no partial file left.
    let cache = home.path().join("hub");
    let repo = repo_dir(&cache, "org/tiny");
    let commit = "a".repeat(40);
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), commit);
    assert!(!repo.join("refs").join(&commit).exists(), "stray refs/<commit>");
    let snap = repo.join("snapshots").join(&commit);
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        let link = std::fs::read_link(snap.join(f)).unwrap();
        assert!(link.starts_with("../../blobs"), "{f} -> {}", link.display());
        assert_eq!(std::fs::read(snap.join(f)).unwrap(), read(f), "{f}");
    }
    assert!(!snap.join("README.md").exists() && !snap.join("pytorch_model.bin").exists());
    assert!(part_files(&cache).is_empty(), "{:?}", part_files(&cache));

    // Cached: `info` asks nothing and names the snapshot.
    let n = hub.requests().len();
    let o = hub_cmd(home.path(), &hub.endpoint()).args(["info", "org/tiny"]).output().unwrap();
    let info = common::ok(&o);
    assert!(
        info.contains(&format!("HF cache: org/tiny @ main (commit {commit}), {}", snap.display())),
        "{info}"
    );
    assert_eq!(hub.requests().len(), n, "a cached model used the network");

    // (2) The server gone: the cache alone, online or offline.
    hub.stop();
    for offline in [None, Some("1")] {
        let out = home.path().join("again");
        let mut c = hub_cmd(home.path(), &hub.endpoint());
        if let Some(v) = offline {
            c.env("HF_HUB_OFFLINE", v);
        }
        common::ok(&c.args(compute_args("org/tiny", &out)).output().unwrap());
        assert_eq!(fisher(&out), local_fisher());
    }
}

/// (3) A transfer cut halfway fails with one line and keeps the `.part`; the next run resumes
/// it with a `Range: bytes=N-` (N > 0) and the result is right.
#[test]
fn an_interrupted_download_resumes() {
    let hub = Hub::start(repos());
    *hub.state.cut_once.lock().unwrap() = Some("model.safetensors".into());
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("run");
    let run = || {
        hub_cmd(home.path(), &hub.endpoint()).args(compute_args("org/tiny", &out)).output().unwrap()
    };
    let e = failure(&run());
    assert!(e.contains("model.safetensors of org/tiny") && e.contains("broke off"), "{e}");
    assert!(e.contains("re-run to resume"), "{e}");
    assert!(!out.exists());
    let cache = home.path().join("hub");
    let parts = part_files(&cache);
    assert_eq!(parts.len(), 1, "{parts:?}");
    let total = read("model.safetensors").len() as u64;
    let kept = std::fs::metadata(&parts[0]).unwrap().len();
    assert!(kept > 0 && kept < total, "kept {kept} of {total}");
    assert!(!repo_dir(&cache, "org/tiny").join("refs/main").exists());

    let before = hub.requests().len();
    common::ok(&run());
    assert_eq!(fisher(&out), local_fisher());
    let resumed: Vec<Request> = hub.requests()[before..]
        .iter()
        .filter(|r| r.path.ends_with("/model.safetensors"))
        .cloned()
        .collect();
    let want = format!("bytes={kept}-");
    assert!(resumed.iter().any(|r| r.range.as_deref() == Some(&want)), "{resumed:?}");
    assert!(
        !resumed.iter().any(|r| r.range.as_deref() == Some("bytes=0-")),
        "restarted from 0: {resumed:?}"
    );
    // Files already complete were not fetched again.
    assert!(!hub.requests()[before..].iter().any(|r| r.path.ends_with("/config.json")));
    assert!(part_files(&cache).is_empty());
}

/// (4) A file whose bytes do not hash to its ETag is rejected with one line naming it and both
/// hashes, and leaves nothing of itself in the cache: a git-stored file (sha1 blob id), then an
/// LFS file (sha256); once the server serves the right bytes, the next run succeeds.
#[test]
fn a_corrupt_download_is_rejected_and_removed() {
    let hub = Hub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let out = home.path().join("run");
    let run = || {
        hub_cmd(home.path(), &hub.endpoint()).args(compute_args("org/tiny", &out)).output().unwrap()
    };
    for (file, algorithm, expected) in [
        ("tokenizer.json", "git blob sha1", git_sha1(&read("tokenizer.json"))),
        ("model.safetensors", "sha256", sha256(&read("model.safetensors"))),
    ] {
        *hub.state.corrupt.lock().unwrap() = Some(file.into());
        let mut bad = read(file);
        *bad.last_mut().unwrap() ^= 0xff;
        let actual = if algorithm == "sha256" { sha256(&bad) } else { git_sha1(&bad) };
        let e = failure(&run());
        for needle in [file, "org/tiny", algorithm, &expected, &actual, "re-run"] {
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
        assert!(!out.exists());
        for p in walk(&cache) {
            if p.symlink_metadata().unwrap().is_file() {
                assert_ne!(std::fs::read(&p).unwrap(), bad, "corrupt copy kept at {}", p.display());
            }
        }
        let snap = repo_dir(&cache, "org/tiny").join("snapshots").join("a".repeat(40));
        assert!(snap.join(file).symlink_metadata().is_err(), "snapshot link to {file} kept");
        assert!(part_files(&cache).is_empty());
    }
    *hub.state.corrupt.lock().unwrap() = None;
    common::ok(&run());
    assert_eq!(fisher(&out), local_fisher());
}

/// (5) Missing and gated repositories, a repository without safetensors and an unreachable
/// endpoint are one-line errors with exit code 2 that say what to do; (8) the token reaches
/// the server as `Authorization: Bearer …`, from HF_TOKEN or from HF_HOME/token.
#[test]
fn missing_gated_and_unusable_repos_are_clear_errors() {
    let hub = Hub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let info = |id: &str, token: Option<&str>| {
        let mut c = hub_cmd(home.path(), &hub.endpoint());
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        c.args(["info", id]).output().unwrap()
    };
    let endpoint = hub.endpoint();

    let e = failure(&info("nobody/nothing", None));
    for needle in ["the hub has no model nobody/nothing", "HTTP 404", &endpoint, "check the id"] {
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
    let e = failure(&info("org/tiny@v9", None));
    assert!(e.contains("no revision `v9`") && e.contains("HTTP 404"), "{e}");

    let e = failure(&info("org/gated", None));
    for needle in ["org/gated", "HTTP 401", "gated", "no token is set", "licence", "HF_TOKEN"] {
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
    let e = failure(&info("org/gated", Some("hf_wrong")));
    assert!(e.contains("HTTP 401") && e.contains("was refused"), "{e}");
    let before = hub.requests().len();
    common::ok(&info("org/gated", Some(TOKEN)));
    let sent: Vec<Request> = hub.requests()[before..].to_vec();
    assert!(sent.len() >= 4, "{sent:?}");
    let bearer = format!("Bearer {TOKEN}");
    assert!(sent.iter().all(|r| r.auth.as_deref() == Some(&bearer)), "{sent:?}");

    // The token file `huggingface-cli login` writes, in a fresh cache.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let o = hub_cmd(other.path(), &endpoint).args(["info", "org/gated"]).output().unwrap();
    common::ok(&o);

    let before = hub.requests().len();
    let e = failure(&info("org/binonly", None));
    assert!(e.contains("no safetensors weights") && e.contains("pytorch_model.bin"), "{e}");
    assert!(hub.fetched("org/binonly").is_empty(), "{:?}", &hub.requests()[before..]);

    // Nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let o = hub_cmd(home.path(), &format!("http://{closed}"))
        .args(["info", "org/tiny"])
        .output()
        .unwrap();
    let e = failure(&o);
    for needle in ["cannot reach", "HF_HUB_OFFLINE=1", "huggingface-cli download org/tiny"] {
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
}

/// (6) HF_HUB_OFFLINE=1 with an empty cache: the not-in-cache message, and no request.
#[test]
fn offline_never_asks_the_hub() {
    let hub = Hub::start(repos());
    let home = tempfile::tempdir().unwrap();
    for value in ["1", "TRUE", "yes"] {
        let o = hub_cmd(home.path(), &hub.endpoint())
            .env("HF_HUB_OFFLINE", value)
            .args(compute_args("org/tiny", &home.path().join("run")))
            .output()
            .unwrap();
        let e = failure(&o);
        assert!(e.contains("is neither a local directory nor in the Hugging Face cache"), "{e}");
        assert!(e.contains("huggingface-cli download org/tiny"), "{e}");
    }
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

/// A sharded model: the index, then exactly the shards it names, into HF_HUB_CACHE (which wins
/// over HF_HOME); the result equals the single-file model's.
#[test]
fn sharded_weights_into_hf_hub_cache() {
    let hub = Hub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = home.path().join("run");
    let o = hub_cmd(home.path(), &hub.endpoint())
        .env("HF_HUB_CACHE", cache.path())
        .args(compute_args("org/sharded", &out))
        .output()
        .unwrap();
    common::ok(&o);
    assert_eq!(fisher(&out), local_fisher());
    let mut fetched = hub.fetched("org/sharded");
    fetched.sort();
    fetched.dedup();
    assert_eq!(
        fetched,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    let snap = repo_dir(cache.path(), "org/sharded").join("snapshots").join("c".repeat(40));
    assert!(snap.join("model-00002-of-00002.safetensors").is_file());
    assert!(!home.path().join("hub").exists(), "wrote to HF_HOME/hub despite HF_HUB_CACHE");
}
