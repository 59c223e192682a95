"""`fisher_stein.load("org/name")` through the Hub: a loopback server (Python's http.server) that
serves the hub's layout for a repository made of the `gpt2-tiny-b` fixture — `GET
/api/models/ORG/NAME/revision/REV` and `GET /ORG/NAME/resolve/REV/FILE` with `Range`, `ETag`,
`X-Linked-Etag`, `X-Repo-Commit` — pointed at by `HF_ENDPOINT`. The download itself is the Rust
path `crates/cli/tests/hub.rs` tests in depth; here: the Python entry point reaches it, the
result equals the local directory's bit for bit, a second load needs no server, and offline with
an empty cache raises `FileNotFoundError` with the command line's message."""

import hashlib
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import fisher_stein
from conftest import FIXTURES

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {
    name: (FIXTURES / "gpt2-tiny-b" / name).read_bytes()
    for name in ["config.json", "model.safetensors"]
}
IDS = [15, 42, 7, 199, 3]


class Hub(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        Hub.seen.append(self.path)
        if self.path == "/api/models/org/tiny/revision/main":
            body = json.dumps(
                {"id": "org/tiny", "sha": COMMIT, "siblings": [{"rfilename": f} for f in FILES]}
            ).encode()
            return self.reply(200, {"Content-Type": "application/json"}, body)
        prefix = "/org/tiny/resolve/"
        if not self.path.startswith(prefix):
            return self.reply(404, {"X-Error-Code": "RepositoryNotFound"}, b"not found")
        rev, _, name = self.path[len(prefix) :].partition("/")
        if rev not in ("main", COMMIT) or name not in FILES:
            return self.reply(404, {"X-Error-Code": "EntryNotFound"}, b"not found")
        content = FILES[name]
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": '"%s"' % hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest(),
        }
        if name.endswith(".safetensors"):
            headers["X-Linked-Etag"] = '"%s"' % hashlib.sha256(content).hexdigest()
        rng = self.headers.get("Range")
        if rng is None:
            return self.reply(200, headers, content)
        start, _, end = rng.removeprefix("bytes=").partition("-")
        start, end = int(start or 0), min(int(end) if end else len(content) - 1, len(content) - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return self.reply(206, headers, content[start : end + 1])

    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Hub.seen = []
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()


def test_load_downloads_from_the_hub_then_works_offline(hub_env, tmp_path, monkeypatch):
    m = fisher_stein.load("org/tiny")
    assert m.info["origin"]["kind"] == "hub-cache" and m.info["origin"]["commit"] == COMMIT
    assert "/api/models/org/tiny/revision/main" in Hub.seen
    assert set(FILES) <= {p.rsplit("/", 1)[1] for p in Hub.seen if "/resolve/" in p}
    from_hub = m.fisher(tokens=IDS, layers=2, positions="all")
    local = fisher_stein.load(str(FIXTURES / "gpt2-tiny-b")).fisher(tokens=IDS, layers=2, positions="all")
    assert from_hub.fisher.tobytes() == local.fisher.tobytes()
    # The cache now holds it: no server, no network.
    hub_env.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = fisher_stein.load("org/tiny").fisher(tokens=IDS, layers=2, positions="all")
    assert again.fisher.tobytes() == local.fisher.tobytes()


def test_offline_with_an_empty_cache_is_file_not_found_with_the_cli_message(hub_env, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = subprocess.run(
        [str(cli), "compute", "--model", "org/tiny", "--layer", "0", "--tokens", "1",
         "--output", str(tmp_path / "never")],
        capture_output=True, text=True, check=False, env=dict(os.environ),
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError) as e:
        fisher_stein.load("org/tiny")
    assert str(e.value) == done.stderr.strip()[len("error: "):]
    assert Hub.seen == []
