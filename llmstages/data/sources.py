"""Where the data comes from: local files, folders and globs; http(s) URLs; `hf:` datasets.

Every source resolves to local files with a sha256, so a prepared dataset names exactly what it was
made from, and changed input gives a new fingerprint.

A URL is looked up, in this order:
  1. the local mirror, `$LLMSTAGES_DATA/<mirror entry, or the URL's file name>` (works offline; its
     own sha256 is recorded: a mirror may hold a different cut of the data than the URL, so it is
     not checked against the recipe's pinned hash);
  2. the download cache, `store/cache/downloads/<hash of the URL>/<file name>`;
  3. the network: downloaded into `<file>.part` (resumed with an HTTP Range request when a partial
     file is there), checked against the recipe's sha256, then renamed into place. A file with the
     wrong checksum is deleted, never used.

A relative local path that does not exist relative to the working directory is also looked up under
$LLMSTAGES_DATA. `hf:ORG/NAME[:split]` is loaded with `datasets.load_dataset` and exported once to a
Parquet file in the cache, which is then read like any local Parquet file; with data.streaming it is
read in the `datasets` streaming mode instead, row by row, without downloading the whole split.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from llmstages.errors import UserError
from llmstages.store import Store, hash_file, sha256_file

DATA_ENV = "LLMSTAGES_DATA"
# File extensions a folder source picks up when data.format is auto.
DATA_SUFFIXES = (".txt", ".text", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceFile:
    """One local file to read, and where it came from."""

    path: Path          # the file actually read
    display: str        # how messages name it (`display:line: reason`)
    sha256: str
    bytes: int
    url: str | None = None       # URL sources: the URL (the file is the mirror copy or the cache copy)
    mirror: bool = False         # found in $LLMSTAGES_DATA instead of downloading
    pinned_sha256: str = ""      # URL sources: the recipe's expected sha256 of the download
    hf: str | None = None        # hf: sources: the dataset reference
    streamed: bool = False       # hf: sources read with data.streaming: no local file, `path` is a placeholder

    def manifest_entry(self) -> dict:
        """This file as listed in a prepared dataset's manifest.json `sources`."""
        entry: dict = {"sha256": self.sha256, "bytes": self.bytes}
        if self.streamed:
            entry = {"hf": self.hf, "streamed": True}
        elif self.hf:
            entry.update(hf=self.hf, local=str(self.path))
        elif self.url:
            entry.update(url=self.url, local=str(self.path), mirror=self.mirror)
            if self.pinned_sha256:
                entry["pinned_sha256"] = self.pinned_sha256
        else:
            entry["path"] = str(self.path.resolve())
        return entry


def data_root() -> Path | None:
    """The local mirror folder ($LLMSTAGES_DATA), or None when unset."""
    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value).expanduser() if value else None


def resolve_sources(specs: list[str], sha256s: list[str], mirrors: list[str], store: Store, *,
                    fmt: str = "auto", console: Console | None = None, streaming: bool = False) -> list[SourceFile]:
    """All local files of `specs` (in order, each folder/glob sorted), downloading what is missing.

    `sha256s` and `mirrors` give one entry per spec ("" = none); shorter lists mean "" for the rest.
    With `streaming`, an hf: source is not downloaded: it is read row by row later
    (readers.read_hf_stream), and named by its reference alone (its content is not known in advance).
    """
    files: list[SourceFile] = []
    for i, spec in enumerate(specs):
        spec = spec.strip()
        pinned = sha256s[i].strip().lower() if i < len(sha256s) else ""
        mirror = mirrors[i].strip() if i < len(mirrors) else ""
        if not spec:
            raise UserError("data.source has an empty entry", hint="remove it or give a file, folder, URL or hf:NAME")
        if spec.startswith("hf:") and streaming:
            parse_hf(spec)  # a malformed reference fails now
            files.append(SourceFile(path=Path(spec), display=spec, sha256=hashlib.sha256(spec.encode()).hexdigest(),
                                    bytes=0, hf=spec, streamed=True))
        elif spec.startswith("hf:"):
            files.append(_hf_source(spec, store, console))
        elif re.match(r"https?://", spec, re.I):
            files += _url_source(spec, pinned, mirror, store, console, fmt)
        elif "://" in spec:
            raise UserError(f"{spec}: unsupported source scheme", hint="use a local path, http(s)://... or hf:ORG/NAME")
        else:
            files += [_local_file(p, str(p)) for p in local_paths(spec, fmt)]
    return files


def _local_file(path: Path, display: str) -> SourceFile:
    return SourceFile(path=path, display=display, sha256=sha256_file(path), bytes=path.stat().st_size)


# ---------------------------------------------------------------------------------------------------
# local files, folders, globs
# ---------------------------------------------------------------------------------------------------
def local_paths(spec: str, fmt: str = "auto") -> list[Path]:
    """The files a local spec names: a file, every data file in a folder, or a glob's matches.

    A relative spec that matches nothing here is tried again under $LLMSTAGES_DATA.
    """
    root = data_root()
    candidates = [Path(spec).expanduser()]
    if root is not None and not Path(spec).is_absolute():
        candidates.append(root / spec)
    for base in candidates:
        if any(ch in str(base) for ch in "*?["):  # a glob pattern
            found = sorted(Path(p) for p in glob.glob(str(base), recursive=True) if Path(p).is_file())
            if found:
                return found
        elif base.is_file():
            return [base]
        elif base.is_dir():
            found = _folder_files(base, fmt)
            if not found:
                raise UserError(f"{base}: no data files in this folder",
                                hint=f"expected files ending in {', '.join(DATA_SUFFIXES)} (or set data.format)")
            return found
    looked = " or ".join(str(c) for c in candidates)
    hint = f"set {DATA_ENV} to the folder that holds it" if root is None else "check the path"
    raise UserError(f"{spec}: no such file, folder or matching glob (looked for {looked})", hint=hint)


def _folder_files(folder: Path, fmt: str) -> list[Path]:
    """Data files under `folder`, sorted, skipping hidden ones; all files when the format is given."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if fmt != "auto" or path.suffix.lower() in DATA_SUFFIXES:
            found.append(path)
    return sorted(found)


# ---------------------------------------------------------------------------------------------------
# URLs: mirror, cache, download
# ---------------------------------------------------------------------------------------------------
def url_file_name(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name or "download"


def cache_path(url: str, store: Store) -> Path:
    """Where a URL's download lives in the store's cache (one folder per URL, the file keeps its name)."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return store.cache_dir() / "downloads" / key / url_file_name(url)


def _url_source(url: str, pinned: str, mirror: str, store: Store, console: Console | None,
                fmt: str) -> list[SourceFile]:
    root = data_root()
    if root is not None:
        candidate = root / (mirror or url_file_name(url))
        if candidate.is_file() or candidate.is_dir():
            paths = [candidate] if candidate.is_file() else _folder_files(candidate, fmt)
            return [SourceFile(path=p, display=str(p), sha256=sha256_file(p), bytes=p.stat().st_size,
                               url=url, mirror=True, pinned_sha256=pinned) for p in paths]
    dest = cache_path(url, store)
    if dest.is_file():
        digest = sha256_file(dest)
        if not pinned or digest == pinned:
            return [SourceFile(path=dest, display=str(dest), sha256=digest, bytes=dest.stat().st_size,
                               url=url, pinned_sha256=pinned)]
        _say(console, f"[yellow]cached {dest} does not match data.sha256; downloading it again[/yellow]")
        dest.unlink()
    where = f"{root / (mirror or url_file_name(url))}" if root is not None else f"${DATA_ENV}/{mirror or url_file_name(url)}"
    digest = download(url, dest, sha256=pinned, console=console, offline_hint=f"offline? put the file at {where}")
    if not pinned:
        _say(console, f"[yellow]{url}: no sha256 in the recipe; downloaded file has sha256 {digest} "
                      "(add it to data.sha256 to pin it)[/yellow]")
    return [SourceFile(path=dest, display=str(dest), sha256=digest, bytes=dest.stat().st_size, url=url,
                       pinned_sha256=pinned)]


def _say(console: Console | None, text: str) -> None:
    (console or Console(stderr=True)).print(text, highlight=False)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (two processes preparing the same data download it once)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, downloads still go through .part + rename
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download(url: str, dest: Path, *, sha256: str = "", console: Console | None = None, timeout: float = 60.0,
             offline_hint: str = "check the URL and the network") -> str:
    """Download `url` to `dest` through `dest.part`, resuming a partial file; return the file's sha256.

    A sha256 mismatch deletes the partial file and raises `UserError`; so does any HTTP error. A
    connection that breaks mid-file keeps the partial file, so the next call resumes it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if dest.is_file():  # another process finished it while we waited for the lock
            return sha256_file(dest)
        offset = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "llmstages"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only, checked above
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # nothing left to fetch: the partial file may be complete
                return _finish(part, dest, url, sha256, hash_file(part))
            raise UserError(f"{url}: download failed: HTTP {err.code} {err.reason}", hint=offline_hint) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"{url}: cannot download ({reason})", hint=offline_hint) from None
        with response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the Range request: start over
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            digest = hash_file(part) if offset else hashlib.sha256()
            got = offset
            with _progress(console, url, total, offset) as advance, open(part, "ab" if offset else "wb") as out:
                try:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                        advance(len(chunk))
                except (http.client.HTTPException, OSError) as err:
                    raise _interrupted(url, got, total, err) from None
            if total is not None and got < total:
                raise _interrupted(url, got, total, "the connection closed early")
        return _finish(part, dest, url, sha256, digest)


def _interrupted(url: str, got: int, total: int | None, why: object) -> UserError:
    of = f" of {total:,}" if total else ""
    return UserError(f"{url}: download interrupted after {got:,}{of} bytes ({why}); the partial file is kept",
                     hint="run the command again to resume the download")


def _finish(part: Path, dest: Path, url: str, sha256: str, digest: "hashlib._Hash") -> str:
    got = digest.hexdigest()
    if sha256 and got != sha256:
        part.unlink(missing_ok=True)
        raise UserError(f"{url}: sha256 mismatch: expected {sha256}, got {got}; the downloaded file was deleted",
                        hint="the file at the URL changed or is corrupt: check the URL and data.sha256")
    os.replace(part, dest)
    return got


@contextlib.contextmanager
def _progress(console: Console | None, url: str, total: int | None, done: int):
    """A transient byte progress bar for one download; yields `advance(n)`."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = console or Console(stderr=True)
    progress = Progress(TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), console=console, transient=True, disable=not console.is_terminal)
    with progress:
        task = progress.add_task(url_file_name(url), total=total, completed=done)
        yield lambda n: progress.advance(task, n)


# ---------------------------------------------------------------------------------------------------
# hf: datasets
# ---------------------------------------------------------------------------------------------------
def parse_hf(spec: str) -> tuple[str, str]:
    """`hf:ORG/NAME[:split]` -> (name, split); the split defaults to train."""
    rest = spec[3:].strip()
    name, sep, split = rest.rpartition(":")
    if not sep or "/" in split or not split:
        name, split = rest, "train"
    if not name:
        raise UserError(f"{spec}: give a dataset name, e.g. hf:ORG/NAME or hf:ORG/NAME:train")
    return name, split


def quiet_datasets():
    """`datasets`, imported with its own progress bars (and the hub's download bars) off: a prepare shows
    llmstages' progress only, and a log or a pipe gets no tqdm lines."""
    import datasets  # heavy; only hf: sources need it
    from huggingface_hub.utils import disable_progress_bars as hub_bars_off

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # "Generating train split" and similar notes
    hub_bars_off()
    return datasets


def _hf_source(spec: str, store: Store, console: Console | None) -> SourceFile:
    """Load a Hugging Face dataset split and export it once to Parquet in the cache."""
    datasets = quiet_datasets()
    name, split = parse_hf(spec)
    try:
        dataset = datasets.load_dataset(name, split=split, cache_dir=str(store.cache_dir() / "hf"))
    except Exception as err:  # datasets raises many types (hub, network, missing split, bad files)
        raise UserError(f"{spec}: cannot load the dataset ({type(err).__name__}: {err})",
                        hint="check the name and split; offline, use a local copy of the files as data.source") from None
    if not isinstance(dataset, datasets.Dataset):
        raise UserError(f"{spec}: not a single split ({type(dataset).__name__})", hint="name the split: hf:ORG/NAME:train")
    key = getattr(dataset, "_fingerprint", None) or hashlib.sha256(repr(dataset).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{split}")
    out = store.cache_dir() / "hf" / "exported" / f"{safe}-{key}.parquet"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        _say(console, f"exporting {spec} ({len(dataset):,} rows) to {out}")
        dataset.to_parquet(str(tmp))
        os.replace(tmp, out)
    return SourceFile(path=out, display=spec, sha256=sha256_file(out), bytes=out.stat().st_size, hf=spec)
