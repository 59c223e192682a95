//! Downloading a hub model's files into the Hugging Face cache with `hf-hub`'s blocking client
//! (feature `download`). What to fetch and how to check it is decided in `hub.rs`; this module
//! only moves bytes and turns `hf-hub`'s errors into one-line [`CheckpointError`]s.
//!
//! The layout is the one every Hugging Face tool shares: `blobs/<etag>` (written as
//! `blobs/<etag>.part` first, appended to on resume), `snapshots/<commit>/<file>` a relative
//! symlink to the blob, `refs/<revision>` the commit.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{CheckpointError, Result};
use crate::hub::{progress_wanted, select_files, Announced, HubFiles, HubSettings};
use crate::resolve::{is_commit_hash, shard_names};

/// One download of one repository: what the messages name.
struct Ctx<'a> {
    repo_id: &'a str,
    revision: &'a str,
    endpoint: &'a str,
    cache: &'a Path,
    token_set: bool,
}

/// Download the files `repo_id` at `revision` needs into `cache` (see
/// [`crate::resolve_model`]): ask the hub which commit the revision is and which files it
/// holds, fetch the needed ones that the commit's snapshot lacks, check each against its
/// announced hash, and point `refs/<revision>` at the commit once all are there.
pub(crate) fn fetch(
    repo_id: &str,
    revision: &str,
    cache: &Path,
    settings: &HubSettings,
) -> Result<()> {
    let ctx = Ctx {
        repo_id,
        revision,
        endpoint: &settings.endpoint,
        cache,
        token_set: settings.token.is_some(),
    };
    let progress = progress_wanted() && std::io::stderr().is_terminal();
    let api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(progress)
        .with_user_agent("fs-checkpoint", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| ctx.api_error(None, e))?;
    let info = api
        .repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string()))
        .info()
        .map_err(|e| ctx.api_error(None, e))?;
    if !is_commit_hash(&info.sha) {
        return Err(ctx.download_error(format!(
            "{} answered that `{repo_id}` at revision `{revision}` is commit `{}`, not a commit \
             hash: check that HF_ENDPOINT names a Hugging Face Hub",
            ctx.endpoint,
            info.sha.escape_debug()
        )));
    }
    let commit = info.sha;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted = select_files(repo_id, &names).map_err(|m| ctx.download_error(m))?;
    if progress {
        eprintln!(
            "downloading {repo_id} @ {revision} (commit {commit}) from {} into {}",
            ctx.endpoint,
            cache.display()
        );
    }

    // Every file comes from the one commit the revision named when asked, even if the branch
    // moves meanwhile; hf-hub then writes `refs/<commit>`, which the cache does not need.
    let repo_dir = cache.join(Repo::model(repo_id.to_string()).folder_name());
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let commit_ref = repo_dir.join("refs").join(&commit);
    let commit_ref_existed = commit_ref.exists();
    let api_repo =
        api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, commit.clone()));
    let fetched = fetch_files(&ctx, &api_repo, &snapshot, &commit, &wanted, &names);
    if !commit_ref_existed {
        let _ = std::fs::remove_file(&commit_ref);
    }
    fetched?;
    if revision != commit {
        write_ref(&repo_dir.join("refs").join(revision), &commit)?;
    }
    Ok(())
}

fn fetch_files(
    ctx: &Ctx,
    repo: &ApiRepo,
    snapshot: &Path,
    commit: &str,
    wanted: &HubFiles,
    names: &[String],
) -> Result<()> {
    for file in &wanted.files {
        fetch_file(ctx, repo, snapshot, file)?;
    }
    let Some(index) = &wanted.index else { return Ok(()) };
    let shards = shard_names(&snapshot.join(index))?;
    if let Some(absent) = shards.iter().find(|s| !names.contains(s)) {
        return Err(ctx.download_error(format!(
            "{index} of `{}` (commit {commit}) names the shard {absent}, which the repository \
             does not hold: the upload is incomplete; pick another revision of the model",
            ctx.repo_id
        )));
    }
    for shard in &shards {
        fetch_file(ctx, repo, snapshot, shard)?;
    }
    Ok(())
}

/// Download `file` into the snapshot unless it is there, then check it.
fn fetch_file(ctx: &Ctx, repo: &ApiRepo, snapshot: &Path, file: &str) -> Result<()> {
    let pointer = snapshot.join(file);
    if pointer.is_file() {
        return Ok(());
    }
    // A link whose blob was deleted: hf-hub would fail to create the link again.
    if pointer.symlink_metadata().is_ok() {
        std::fs::remove_file(&pointer).map_err(|e| CheckpointError::io(&pointer, e))?;
    }
    let path = repo.download(file).map_err(|e| ctx.api_error(Some(file), e))?;
    if !path.starts_with(snapshot) {
        // hf-hub files it under the commit the response names (`X-Repo-Commit`).
        return Err(ctx.download_error(format!(
            "{} served {} from another commit than the one asked for (it landed in {}, not {}): \
             check that HF_ENDPOINT names a Hugging Face Hub",
            ctx.endpoint,
            ctx.what(Some(file)),
            path.display(),
            snapshot.display()
        )));
    }
    verify(ctx, &path, file)
}

/// Check a downloaded snapshot file against the hash its blob's name (the ETag) announces; on a
/// mismatch remove the blob and the snapshot link. A file that is not a link into `blobs/`
/// (hf-hub moves the blob instead where symlinks fail) or whose ETag is neither a sha256 nor a
/// git blob id cannot be checked and is kept.
fn verify(ctx: &Ctx, path: &Path, file: &str) -> Result<()> {
    let Ok(target) = std::fs::read_link(path) else { return Ok(()) };
    let blob = path.parent().map(|p| p.join(&target)).unwrap_or(target);
    let Some(etag) = blob.file_name().and_then(|n| n.to_str()) else { return Ok(()) };
    let Some(announced) = Announced::from_etag(etag) else { return Ok(()) };
    let actual = announced.hash_of(&blob)?;
    if actual == announced.hex() {
        return Ok(());
    }
    let _ = std::fs::remove_file(&blob);
    let _ = std::fs::remove_file(path);
    Err(CheckpointError::HashMismatch {
        repo_id: ctx.repo_id.to_string(),
        file: file.to_string(),
        algorithm: announced.algorithm(),
        expected: announced.hex().to_string(),
        actual,
    })
}

/// Write `refs/<revision>` (the revision may contain `/`) through a temporary file and a rename,
/// so a reader never sees half a commit id.
fn write_ref(path: &Path, commit: &str) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| CheckpointError::io(parent, e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, commit).map_err(|e| CheckpointError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CheckpointError::io(path, e)
    })
}

impl Ctx<'_> {
    fn download_error(&self, message: String) -> CheckpointError {
        CheckpointError::Download { repo_id: self.repo_id.to_string(), message }
    }

    /// `blobs/` of this repository in the cache, where partial downloads are kept.
    fn blobs(&self) -> PathBuf {
        self.cache.join(Repo::model(self.repo_id.to_string()).folder_name()).join("blobs")
    }

    /// "the model org/name" or "the model org/name at revision `v1`".
    fn model(&self) -> String {
        if self.revision == "main" {
            format!("model {}", self.repo_id)
        } else {
            format!("model {} at revision `{}`", self.repo_id, self.revision)
        }
    }

    /// "config.json of org/name" or "org/name".
    fn what(&self, file: Option<&str>) -> String {
        match file {
            Some(f) => format!("{f} of {}", self.repo_id),
            None => self.repo_id.to_string(),
        }
    }

    /// Turn one `hf-hub` error (while asking about the repository, or downloading `file`) into
    /// one line with the cause and the fix.
    fn api_error(&self, file: Option<&str>, e: ApiError) -> CheckpointError {
        let endpoint = self.endpoint;
        let what = self.what(file);
        let message = match e {
            ApiError::RequestError(e) => match *e {
                ureq::Error::Status(code, response) => {
                    let error_code = response.header("x-error-code").map(str::to_string);
                    self.status_message(file, code, error_code.as_deref())
                }
                ureq::Error::Transport(t) => self.transport_message(file, &t),
            },
            ApiError::TooManyRetries(inner) => return self.api_error(file, *inner),
            ApiError::IoError(io) if file.is_none() => format!(
                "{endpoint}'s answer about {what} is not the hub's ({io}): check that \
                 HF_ENDPOINT names a Hugging Face Hub"
            ),
            ApiError::IoError(io) if is_transfer_error(&io) => format!(
                "the download of {what} from {endpoint} broke off ({io}): re-run to resume it \
                 (what arrived is kept in {} as a .part file)",
                self.blobs().display()
            ),
            ApiError::IoError(io) => format!(
                "cannot store {what} in the Hugging Face cache at {} ({io}): make the directory \
                 writable and free space, or set HF_HUB_CACHE to another cache",
                self.cache.display()
            ),
            ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => format!(
                "{endpoint} did not answer like the Hugging Face Hub for {what} (header {h} \
                 missing or invalid): check HF_ENDPOINT and any proxy in between"
            ),
            ApiError::ParseIntError(_) => format!(
                "{endpoint} did not answer like the Hugging Face Hub for {what} (its \
                 Content-Range is not a size): check HF_ENDPOINT and any proxy in between"
            ),
            ApiError::InvalidResume => format!(
                "a partial download of {what} in {} is longer than the file: delete the .part \
                 files there and re-run",
                self.blobs().display()
            ),
            ApiError::LockAcquisition(lock) => format!(
                "another process is downloading {what} (it holds {}): wait for it to finish, \
                 then re-run",
                lock.display()
            ),
            #[allow(unreachable_patterns)]
            other => format!("cannot download {what} from {endpoint}: {other}"),
        };
        self.download_error(message)
    }

    fn status_message(&self, file: Option<&str>, code: u16, error_code: Option<&str>) -> String {
        let (repo, endpoint) = (self.repo_id, self.endpoint);
        let at = format!("HTTP {code} from {endpoint}");
        let token = match (self.token_set, code) {
            (false, _) => "no token is set",
            (true, 403) => {
                "the account of the token set (HF_TOKEN or the token file) has no access"
            }
            (true, _) => "the token set (HF_TOKEN or the token file) was refused",
        };
        match (code, error_code) {
            (_, Some("RevisionNotFound")) => format!(
                "the hub model {repo} has no revision `{}` ({at}): check the revision after `@` \
                 (a branch, tag or commit of the repository)",
                self.revision
            ),
            (_, Some("GatedRepo")) | (401 | 403, None) => format!(
                "the hub refused access to {} ({at}): the model is gated or private and {token}: \
                 accept its licence at {endpoint}/{repo} while logged in, then set HF_TOKEN to a \
                 read token of that account (or run `huggingface-cli login`)",
                self.what(file)
            ),
            (404, _) | (_, Some("EntryNotFound")) if file.is_some() => format!(
                "{} is listed by the hub but not served ({at}): re-run; if this recurs, the \
                 mirror HF_ENDPOINT names is incomplete",
                self.what(file)
            ),
            (404, _) | (_, Some("RepositoryNotFound")) => format!(
                "the hub has no {} ({at}): check the id (`org/name` as in the model page's \
                 address){}; a private model also needs HF_TOKEN",
                self.model(),
                if self.revision == "main" { "" } else { " and the revision" }
            ),
            (416, _) => format!(
                "the hub cannot resume {} ({at}): the partial download in {} is damaged; delete \
                 the .part files there and re-run",
                self.what(file),
                self.blobs().display()
            ),
            (429, _) => format!(
                "the hub is limiting this client's requests ({at}): wait a few minutes and \
                 re-run; logged-in requests (HF_TOKEN) get a higher limit"
            ),
            (500.., _) => format!(
                "the hub failed to serve {} ({at}): it is having trouble; re-run later",
                self.what(file)
            ),
            _ => format!(
                "unexpected answer for {} ({at}{}): check HF_ENDPOINT and the model id",
                self.what(file),
                error_code.map(|c| format!(", {c}")).unwrap_or_default()
            ),
        }
    }

    fn transport_message(&self, file: Option<&str>, t: &ureq::Transport) -> String {
        let (endpoint, what) = (self.endpoint, self.what(file));
        let detail = fs_traits::engine::one_line(&t.to_string());
        match t.kind() {
            ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => format!(
                "HF_ENDPOINT `{endpoint}` is not an http(s) address ({detail}): set it to the \
                 hub's address (https://huggingface.co or a mirror) or unset it"
            ),
            ureq::ErrorKind::Dns
            | ureq::ErrorKind::ConnectionFailed
            | ureq::ErrorKind::ProxyConnect
            | ureq::ErrorKind::InvalidProxyUrl
            | ureq::ErrorKind::ProxyUnauthorized => format!(
                "cannot reach {endpoint} to download {what} ({detail}): check the network, \
                 HF_ENDPOINT and any proxy (HTTPS_PROXY, ALL_PROXY); or work offline: put the \
                 model in the cache at {} (`huggingface-cli download {}` where the hub is \
                 reachable) and set HF_HUB_OFFLINE=1",
                self.cache.display(),
                self.repo_id
            ),
            ureq::ErrorKind::Io if file.is_some() => format!(
                "the download of {what} from {endpoint} broke off ({detail}): re-run to resume \
                 it (what arrived is kept in {} as a .part file)",
                self.blobs().display()
            ),
            _ => format!(
                "{endpoint} did not answer like the Hugging Face Hub for {what} ({detail}): \
                 check HF_ENDPOINT and any proxy in between, or re-run"
            ),
        }
    }
}

/// An I/O error of the transfer (the connection), not of the local disk.
fn is_transfer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    !matches!(
        e.kind(),
        PermissionDenied
            | ReadOnlyFilesystem
            | StorageFull
            | QuotaExceeded
            | FileTooLarge
            | NotFound
            | AlreadyExists
            | IsADirectory
            | NotADirectory
            | DirectoryNotEmpty
            | InvalidFilename
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(revision: &str, token_set: bool) -> Ctx<'_> {
        Ctx {
            repo_id: "org/name",
            revision,
            endpoint: "https://hub.example",
            cache: Path::new("/c"),
            token_set,
        }
    }

    #[test]
    fn status_messages_name_the_cause_and_the_fix() {
        let m = |c: &Ctx, file: Option<&str>, code: u16, ec: Option<&str>| {
            let m = c.status_message(file, code, ec);
            assert!(!m.contains('\n'), "{m}");
            m
        };
        let main = ctx("main", false);
        let m404 = m(&main, None, 404, None);
        assert!(
            m404.starts_with("the hub has no model org/name (HTTP 404 from https://hub.example)")
        );
        assert!(m404.contains("check the id") && !m404.contains("revision"), "{m404}");
        // The hub answers 401 + RepositoryNotFound for a missing repo without a token.
        let v = ctx("v2", false);
        let r = m(&v, None, 401, Some("RepositoryNotFound"));
        assert!(r.contains("no model org/name at revision `v2`") && r.contains("HF_TOKEN"), "{r}");
        let r = m(&v, None, 404, Some("RevisionNotFound"));
        assert!(r.contains("no revision `v2`"), "{r}");
        let g = m(&main, Some("config.json"), 401, Some("GatedRepo"));
        assert!(g.contains("config.json of org/name") && g.contains("no token is set"), "{g}");
        assert!(g.contains("https://hub.example/org/name") && g.contains("licence"), "{g}");
        let with_token = ctx("main", true);
        let g = m(&with_token, Some("config.json"), 403, Some("GatedRepo"));
        assert!(g.contains("has no access"), "{g}");
        let g = m(&with_token, None, 401, None);
        assert!(g.contains("was refused"), "{g}");
        let e = m(&main, Some("model.safetensors"), 404, Some("EntryNotFound"));
        assert!(e.contains("model.safetensors of org/name is listed"), "{e}");
        assert!(m(&main, Some("f"), 416, None).contains("delete the .part files"));
        assert!(m(&main, None, 429, None).contains("wait"));
        assert!(m(&main, None, 503, None).contains("re-run later"));
        assert!(m(&main, None, 418, Some("Teapot"))
            .contains("HTTP 418 from https://hub.example, Teapot"));
    }

    #[test]
    fn transfer_or_disk() {
        use std::io::{Error, ErrorKind};
        assert!(is_transfer_error(&Error::from(ErrorKind::UnexpectedEof)));
        assert!(is_transfer_error(&Error::from(ErrorKind::ConnectionReset)));
        assert!(is_transfer_error(&Error::other("tls alert")));
        assert!(!is_transfer_error(&Error::from(ErrorKind::StorageFull)));
        assert!(!is_transfer_error(&Error::from(ErrorKind::PermissionDenied)));
    }

    #[test]
    fn refs_are_written_whole() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("refs").join("pr").join("1");
        write_ref(&r, &"a".repeat(40)).unwrap();
        assert_eq!(std::fs::read_to_string(&r).unwrap(), "a".repeat(40));
        write_ref(&r, &"b".repeat(40)).unwrap();
        assert_eq!(std::fs::read_to_string(&r).unwrap(), "b".repeat(40));
        assert_eq!(std::fs::read_dir(r.parent().unwrap()).unwrap().count(), 1, "temporary left");
    }
}
