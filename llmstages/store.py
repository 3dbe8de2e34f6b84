"""The on-disk store of prepared datasets and training runs, with atomic checkpoints.

    store/
      data/<name>/                prepared dataset (written by stages/prepare.py through `atomic_dir`)
      runs/<run>/recipe.yaml      the resolved recipe that ran
      runs/<run>/log.jsonl        one line per logged step / eval
      runs/<run>/best.json        which checkpoint is best, by which metric
      runs/<run>/step-000500/     a committed checkpoint (its files: checkpoint.py), MANIFEST written last

A checkpoint is written into a hidden temporary folder inside the run folder, every file is fsynced,
`MANIFEST` (sha256 and size of every other file) is written last, and the folder is renamed into
place. A folder without a valid MANIFEST does not exist for any reader, so a kill at any moment
leaves the previous checkpoints loadable and the partial one invisible. Pruning happens only after
a commit, and moves a folder out of sight (rename) before deleting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstages.errors import UserError

MANIFEST = "MANIFEST"
STEP_RE = re.compile(r"step-(\d{6,})$")
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a run is one folder under runs/


def default_root() -> Path:
    return Path(os.environ.get("LLMSTAGES_STORE", "store"))


def hash_file(path: Path, digest: "hashlib._Hash | None" = None, chunk: int = 1 << 20) -> "hashlib._Hash":
    """Feed the bytes of `path` into `digest` (a new sha256 when None) and return it."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest


def sha256_file(path: Path) -> str:
    return hash_file(path).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file + rename, so readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path) -> None:
    """Hash every file in `folder` (recursively) into MANIFEST, written and fsynced last."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync_file(path)
        rel = path.relative_to(folder).as_posix()
        lines.append(f"{sha256_file(path)}  {path.stat().st_size}  {rel}")
    manifest = folder / MANIFEST
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}, reverse=True):
        _fsync_dir(sub)


def read_manifest(folder: Path) -> dict[str, tuple[str, int]] | None:
    """MANIFEST as {relative path: (sha256, size)}, or None when it is missing or malformed."""
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    entries = {}
    for line in text.splitlines():
        parts = line.split("  ", 2)
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]) or not parts[1].isdigit():
            return None
        if Path(parts[2]).is_absolute() or ".." in Path(parts[2]).parts:  # names a file outside the folder
            return None
        entries[parts[2]] = (parts[0], int(parts[1]))
    return entries or None


def is_committed(folder: Path) -> bool:
    """Fast check: a MANIFEST whose files all exist with the recorded sizes."""
    entries = read_manifest(folder)
    if entries is None:
        return False
    for rel, (_, size) in entries.items():
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def verify(folder: Path) -> list[str]:
    """Full check of a committed folder: every file's sha256. Returns the problems (empty = valid)."""
    entries = read_manifest(folder)
    if entries is None:
        return [f"{folder}: no valid {MANIFEST} (an interrupted write, or not a checkpoint)"]
    problems = []
    for rel, (digest, size) in entries.items():
        path = folder / rel
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size or sha256_file(path) != digest:
            problems.append(f"{path}: contents do not match {MANIFEST} (corrupted or modified)")
    return problems


def manifest_fingerprint(folder: Path) -> str:
    """A short id of a committed folder's exact contents (sha256 of its MANIFEST)."""
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False, manifest: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `final`; on success write MANIFEST and rename it into place.

    On any exception (or a kill) the temporary folder is left out of sight and `final` is untouched.
    With `replace`, an existing `final` is moved aside and deleted only after the new one is in place.
    `manifest=False` is for folders other tools read (an export), which get no MANIFEST.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        yield tmp
        commit_dir(tmp, final, replace=replace, manifest=manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp: Path, final: Path, *, replace: bool = False, manifest: bool = True) -> None:
    """Write `tmp`'s MANIFEST (unless `manifest=False`) and rename it to `final` in one step.

    With `replace`, an existing `final` is moved aside and deleted only after the new one is in place.
    """
    if manifest:
        write_manifest(tmp)
    old = None
    if final.exists():
        if not replace:
            raise FileExistsError(f"{final} already exists")
        old = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:6]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a folder so that no reader ever sees it half-deleted: rename out of sight, then delete."""
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:6]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class RunInfo:
    name: str
    path: Path
    steps: list[int]
    best: dict | None
    last_log: dict | None


class Store:
    """Paths and queries over one store root."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    # --- layout ---------------------------------------------------------------------------------
    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def data_dir(self, name: str) -> Path:
        return self.root / "data" / name

    def cache_dir(self) -> Path:
        return self.root / "cache"

    # --- checkpoints ----------------------------------------------------------------------------
    def checkpoints(self, run: str) -> list[Path]:
        """Committed checkpoints of a run, oldest first. Partial ones are invisible."""
        folder = self.run_dir(run)
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if STEP_RE.fullmatch(p.name) and is_committed(p)]
        return sorted(found, key=lambda p: int(STEP_RE.fullmatch(p.name).group(1)))

    def latest(self, run: str) -> Path | None:
        found = self.checkpoints(run)
        return found[-1] if found else None

    def best(self, run: str) -> Path | None:
        info = self.read_best(run)
        if info:
            path = self.run_dir(run) / step_name(info["step"])
            if is_committed(path):
                return path
        return None

    def read_best(self, run: str) -> dict | None:
        try:
            info = json.loads((self.run_dir(run) / "best.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return info if isinstance(info, dict) and isinstance(info.get("step"), int) else None  # else corrupt

    def set_best(self, run: str, step: int, metric: str, value: float) -> None:
        write_json_atomic(self.run_dir(run) / "best.json", {"step": step, "metric": metric, "value": value})

    @contextlib.contextmanager
    def commit(self, run: str, step: int) -> Iterator[Path]:
        """Write a checkpoint atomically: `with store.commit(run, step) as tmp: <write files into tmp>`."""
        with atomic_dir(self.run_dir(run) / step_name(step), replace=True) as tmp:
            yield tmp

    def prune(self, run: str, keep_last: int) -> list[Path]:
        """Delete all but the newest `keep_last` checkpoints and the best one. Call only after a commit."""
        found = self.checkpoints(run)
        best = self.best(run)
        removed = []
        for path in found[:-keep_last] if keep_last > 0 else found:
            if best is not None and path == best:
                continue
            remove_dir(path)
            removed.append(path)
        return removed

    def clean_partial(self, run: str) -> None:
        """Remove temporary and trash folders left by a killed writer of this run."""
        folder = self.run_dir(run)
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)

    # --- lookup ---------------------------------------------------------------------------------
    def resolve(self, ref: str) -> Path:
        """A MODEL reference -> a committed checkpoint folder.

        Accepts a checkpoint folder, a run folder, a run name, and `run@best`, `run@latest`, `run@STEP`.
        A run name alone means its best checkpoint when it records one, else its latest.
        """
        path = Path(ref)
        if path.is_dir():
            if (path / MANIFEST).exists() or STEP_RE.fullmatch(path.name):
                if not is_committed(path):
                    raise UserError(f"{path}: not a committed checkpoint (no valid {MANIFEST}; "
                                    "an interrupted write?)", hint="use the run's newest complete checkpoint")
                return path
            if (path / "recipe.yaml").exists() or any(STEP_RE.fullmatch(p.name) for p in path.iterdir()):
                return self._pick(Store(path.parent.parent), path.name, None, ref)
        run, _, which = ref.partition("@")
        if not RUN_NAME_RE.fullmatch(run):
            raise UserError(f"{ref}: no such checkpoint folder or run",
                            hint="give a run name (`llmstages runs` lists them) or a checkpoint folder")
        return self._pick(self, run, which or None, ref)

    @staticmethod
    def _pick(store: "Store", run: str, which: str | None, ref: str) -> Path:
        if not store.run_dir(run).is_dir():
            known = [r.name for r in store.runs()]
            hint = f"runs in {store.root}: {', '.join(known)}" if known else f"the store {store.root} has no runs yet"
            raise UserError(f"{ref}: no run named {run!r} in the store {store.root}", hint=hint)
        if which is None:
            found = store.best(run) or store.latest(run)
        elif which == "best":
            found = store.best(run)
        elif which == "latest":
            found = store.latest(run)
        elif which.isdigit():
            found = store.run_dir(run) / step_name(int(which))
            found = found if is_committed(found) else None
        else:
            raise UserError(f"{ref}: after @ give best, latest or a step number")
        if found is None:
            steps = [int(STEP_RE.fullmatch(p.name).group(1)) for p in store.checkpoints(run)]
            if steps and which is not None and which.isdigit():
                raise UserError(f"{ref}: run {run!r} has no committed checkpoint at step {int(which)}",
                                hint=f"its checkpoints are at step{'s' if len(steps) > 1 else ''} "
                                     f"{', '.join(map(str, steps))}: e.g. {run}@{steps[-1]}")
            raise UserError(f"{ref}: run {run!r} has no committed checkpoint" + (f" for @{which}" if which else ""),
                            hint="train it first, or resume it with --resume")
        return found

    def runs(self) -> list[RunInfo]:
        root = self.root / "runs"
        if not root.is_dir():
            return []
        infos = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            steps = [int(STEP_RE.fullmatch(p.name).group(1)) for p in self.checkpoints(folder.name)]
            infos.append(RunInfo(folder.name, folder, steps, self.read_best(folder.name),
                                 last_log_line(folder / "log.jsonl")))
        return infos


def last_log_line(path: Path) -> dict | None:
    """The last complete JSON line of a log.jsonl (a line cut by a kill is skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                return record
    return None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
