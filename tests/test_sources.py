"""Sources: local paths, the mirror, the download cache (against a server on 127.0.0.1), hf: datasets."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmstages.data.sources import cache_path, download, local_paths, parse_hf, resolve_sources
from llmstages.errors import UserError
from llmstages.store import Store

BODY = bytes(range(256)) * 400  # 102,400 bytes, not text: the bytes must come back exactly
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; honours Range; can fail with a status or cut a response short."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path in server.status:
            self.send_error(server.status[self.path])
            return
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = server.cut_after.pop(self.path, None)
        self.wfile.write(payload if cut is None else payload[:cut])  # a cut response: the server "dies" mid-file

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.status, httpd.cut_after, httpd.requests = {}, {}, {}, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv("LLMSTAGES_DATA", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_download_once_then_cached(server, tmp_path):
    server.files["/data/corpus.bin"] = BODY
    store = Store(tmp_path / "store")
    url = server.url + "/data/corpus.bin"
    [first] = resolve_sources([url], [BODY_SHA], [], store)
    assert first.path == cache_path(url, store) and first.path.read_bytes() == BODY
    assert first.sha256 == BODY_SHA and first.url == url and not first.mirror
    [again] = resolve_sources([url], [BODY_SHA], [], store)
    assert again.path == first.path
    assert len(server.requests) == 1  # the second resolve used the cache
    assert not list(first.path.parent.glob("*.part"))


def test_wrong_checksum_is_an_error_and_the_file_is_not_kept(server, tmp_path):
    server.files["/x.txt"] = BODY
    store = Store(tmp_path / "store")
    url = server.url + "/x.txt"
    with pytest.raises(UserError, match=f"sha256 mismatch: expected {'0' * 64}, got {BODY_SHA}"):
        resolve_sources([url], ["0" * 64], [], store)
    folder = cache_path(url, store).parent
    assert not [p for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_server_error_mid_file_keeps_the_partial_file_and_the_next_run_resumes(server, tmp_path):
    server.files["/big.bin"] = BODY
    server.cut_after["/big.bin"] = 30_000
    store = Store(tmp_path / "store")
    url = server.url + "/big.bin"
    with pytest.raises(UserError, match=r"interrupted after 30,000 of 102,400 bytes.*partial file is kept"):
        resolve_sources([url], [BODY_SHA], [], store)
    dest = cache_path(url, store)
    part = dest.with_name(dest.name + ".part")
    assert not dest.exists() and part.stat().st_size == 30_000
    [src] = resolve_sources([url], [BODY_SHA], [], store)
    assert server.requests[-1] == ("/big.bin", "bytes=30000-")  # resumed with a Range request
    assert src.path.read_bytes() == BODY and not part.exists()


def test_resume_with_a_bad_partial_file_fails_the_checksum_and_deletes_it(server, tmp_path):
    server.files["/f.bin"] = BODY
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="sha256 mismatch"):
        download(server.url + "/f.bin", dest, sha256=BODY_SHA)
    assert not dest.exists() and not dest.with_name("f.bin.part").exists()
    assert download(server.url + "/f.bin", dest, sha256=BODY_SHA) == BODY_SHA  # a clean retry works
    assert dest.read_bytes() == BODY


def test_complete_partial_file_is_accepted_on_416(server, tmp_path):
    server.files["/f.bin"] = BODY
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(BODY)
    assert download(server.url + "/f.bin", dest, sha256=BODY_SHA) == BODY_SHA
    assert dest.read_bytes() == BODY


def test_http_error_status(server, tmp_path):
    server.status["/gone.txt"] = 500
    with pytest.raises(UserError, match=r"download failed: HTTP 500"):
        resolve_sources([server.url + "/gone.txt"], [""], [], Store(tmp_path / "store"))


def test_unreachable_host_names_the_mirror_location(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSTAGES_DATA", str(tmp_path / "mirror"))
    url = "http://127.0.0.1:9/nothing-listens-here/corpus.txt"
    with pytest.raises(UserError) as err:
        resolve_sources([url], [""], ["books/corpus.txt"], Store(tmp_path / "store"))
    assert "cannot download" in err.value.message
    assert str(tmp_path / "mirror" / "books" / "corpus.txt") in err.value.hint


def test_mirror_is_used_before_any_download(server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "held-in.txt").write_text("a held-in cut of the original\n")
    (mirror / "corpus.txt").write_text("by file name\n")
    monkeypatch.setenv("LLMSTAGES_DATA", str(mirror))
    store = Store(tmp_path / "store")
    # An explicit mirror entry; its hash differs from the pinned one of the original, which is fine.
    [named] = resolve_sources([server.url + "/orig.txt"], ["f" * 64], ["sub/held-in.txt"], store)
    assert named.mirror and named.path == mirror / "sub" / "held-in.txt"
    assert named.sha256 == hashlib.sha256(b"a held-in cut of the original\n").hexdigest()
    assert named.manifest_entry()["pinned_sha256"] == "f" * 64
    # No entry: the URL's file name is looked up.
    [by_name] = resolve_sources([server.url + "/dir/corpus.txt"], [], [], store)
    assert by_name.path == mirror / "corpus.txt"
    assert server.requests == []


def test_url_without_sha256_downloads_and_says_so(server, tmp_path):
    from io import StringIO

    from rich.console import Console

    server.files["/a.txt"] = b"hello\n"
    out = StringIO()
    [src] = resolve_sources([server.url + "/a.txt"], [], [], Store(tmp_path / "store"),
                            console=Console(file=out, width=300))
    assert src.sha256 == hashlib.sha256(b"hello\n").hexdigest()
    assert "no sha256" in out.getvalue() and src.sha256 in out.getvalue()


def test_local_file_folder_glob_and_data_root(tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.jsonl", "sub/c.csv", "notes.md", ".hidden.txt"):
        (tmp_path / "d" / name).write_text("x\n")
    monkeypatch.chdir(tmp_path)
    assert local_paths("d/b.txt") == [Path("d/b.txt")]
    assert [p.name for p in local_paths("d")] == ["a.jsonl", "b.txt", "c.csv"]  # sorted, data files only
    assert [p.name for p in local_paths("d/**/*.csv")] == ["c.csv"]
    with pytest.raises(UserError, match="no such file, folder or matching glob"):
        local_paths("missing.txt")
    monkeypatch.setenv("LLMSTAGES_DATA", str(tmp_path / "d"))
    assert local_paths("sub/c.csv") == [tmp_path / "d" / "sub" / "c.csv"]  # not in the cwd: the mirror


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no data files in this folder"):
        local_paths(str(tmp_path / "empty"))


def test_parse_hf():
    assert parse_hf("hf:org/name") == ("org/name", "train")
    assert parse_hf("hf:org/name:validation") == ("org/name", "validation")
    assert parse_hf("hf:/some/local/folder:test") == ("/some/local/folder", "test")


def test_hf_source_is_exported_once_to_parquet(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["one", "two"], "label": ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    store = Store(tmp_path / "store")
    [src] = resolve_sources(["hf:someone/tiny:test"], [], [], store)
    assert calls == [("someone/tiny", "test")]
    assert src.path.suffix == ".parquet" and src.display == "hf:someone/tiny:test"
    import pyarrow.parquet as pq
    assert pq.read_table(src.path).to_pylist() == [{"text": "one", "label": "a"}, {"text": "two", "label": "b"}]
    mtime = src.path.stat().st_mtime_ns
    [again] = resolve_sources(["hf:someone/tiny:test"], [], [], store)
    assert again.path == src.path and again.path.stat().st_mtime_ns == mtime and again.sha256 == src.sha256


def test_hf_source_from_a_local_folder_offline(tmp_path, monkeypatch, capfd):
    """`datasets.load_dataset` on a local folder of jsonl files: no network involved, and none of the
    progress bars `datasets` draws on its own ("Generating train split", "Creating parquet")."""
    import datasets

    datasets.enable_progress_bars()  # as a fresh process has them

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)  # read at import time
    folder = tmp_path / "local_set"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    [src] = resolve_sources([f"hf:{folder}:train"], [], [], Store(tmp_path / "store"))
    import pyarrow.parquet as pq
    assert pq.read_table(src.path).column("text").to_pylist() == ["alpha", "beta"]
    out, err = capfd.readouterr()
    assert "%|" not in out + err and "Generating" not in out + err and "it/s" not in out + err


def test_hf_load_failure_is_a_user_error(tmp_path, monkeypatch):
    import datasets

    def broken(*args, **kwargs):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(UserError, match="hf:nobody/nothing: cannot load the dataset"):
        resolve_sources(["hf:nobody/nothing"], [], [], Store(tmp_path / "store"))
