"""The checkpoints of a run directory on disk: atomic, complete or ignored.

Layout: ``<run dir>/checkpoints/step_<N>/`` holds the files a checkpoint writer puts there
(:mod:`agents.experiment.resume`: ``model.zip``, ``replay_buffer.pkl``, ``state.pkl``) and
``MANIFEST.json``, written last (each file's size and SHA-256). The files go into
``checkpoints/.tmp-<step>-<pid>/``, which is renamed to ``step_<N>`` once complete; then the text
file ``checkpoints/latest`` is replaced atomically (write + ``os.replace``). A kill at any moment
leaves either the previous checkpoint or the new one as ``latest``; a folder without a complete
manifest is never loaded (loading falls back to the newest complete checkpoint). Before a resume
:meth:`CheckpointStore.verified_latest` also compares the checksums: a checkpoint whose files were
truncated or edited is reported and skipped for the previous complete one (or a fresh start).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

CKPT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "MANIFEST.json"
STATE_FILE = "state.pkl"
FORMAT_VERSION = 1


class CheckpointStore:
    """The checkpoints of one run directory (``<run dir>/checkpoints``)."""

    def __init__(self, run_dir: Path, keep: int = 1) -> None:
        self.root = Path(run_dir) / CKPT_DIR
        self.keep = max(int(keep), 1)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def cleanup_tmp(self) -> None:
        """Remove folders left by checkpoints that were interrupted."""
        if self.root.is_dir():
            for d in self.root.glob(".tmp-*"):
                shutil.rmtree(d, ignore_errors=True)
            for f in self.root.glob(f".{LATEST}.*"):
                f.unlink(missing_ok=True)

    @staticmethod
    def is_complete(d: Path) -> bool:
        """The manifest is there and every file it lists has its size (cheap; no checksums)."""
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            return manifest.get("format") == FORMAT_VERSION and all(
                (d / name).is_file() and (d / name).stat().st_size == _entry(entry)["size"]
                for name, entry in manifest["files"].items())
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return False

    @staticmethod
    def mismatch(d: Path) -> str | None:
        """What in ``d`` does not match its manifest (sizes, then SHA-256 checksums), or None."""
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} missing or unreadable"
        if manifest.get("format") != FORMAT_VERSION:
            return f"format {manifest.get('format')!r}, expected {FORMAT_VERSION}"
        for name, entry in files.items():
            entry, f = _entry(entry), d / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != entry["size"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
            if "sha256" in entry and _sha256(f) != entry["sha256"]:
                return f"{name} differs from its SHA-256 checksum"
        return None

    def verified_latest(self, report: Callable[[str], None]) -> Path | None:
        """The newest checkpoint that matches its manifest, checksums included (``latest`` first);
        each one that does not is reported with what falls back to it (or a fresh start)."""
        rejected: list[str] = []
        for d in self._candidates():
            problem = self.mismatch(d)
            if problem is None:
                if rejected:
                    report(f"{'; '.join(rejected)}: falling back to the previous complete checkpoint, {d.name}")
                return d
            rejected.append(f"checkpoint {d.name} does not match its manifest ({problem})")
        if rejected:
            report(f"{'; '.join(rejected)}; no other complete checkpoint: starting from scratch")
        return None

    def _candidates(self) -> Iterator[Path]:
        """Every checkpoint folder, complete or not: the one ``latest`` names first, then newest first."""
        if not self.root.is_dir():
            return
        try:
            pointed = (self.root / LATEST).read_text().strip()
        except OSError:
            pointed = ""
        folders = sorted((d for d in self.root.glob("step_*") if d.is_dir()), key=lambda d: d.name, reverse=True)
        yield from sorted(folders, key=lambda d: d.name != pointed)  # stable: newest first otherwise

    def steps(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((d for d in self.root.glob("step_*") if d.is_dir() and self.is_complete(d)),
                      key=lambda d: d.name)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to, else the newest complete one, else None."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except OSError:
            name = ""
        if name and "/" not in name and self.is_complete(self.root / name):
            return self.root / name
        done = self.steps()
        return done[-1] if done else None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write a checkpoint for ``step`` with ``write(folder)``, atomically; returns its folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{int(step):012d}"
        if self.is_complete(final):  # already saved at this step (e.g. preempted right after resuming)
            self._point(final.name)
            return final
        tmp = self.root / f".tmp-{int(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {"format": FORMAT_VERSION, "step": int(step), "files": files, "written_at": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # an incomplete leftover with the same name
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.root)
        self._point(final.name)
        self._prune(final)
        return final

    def _point(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        _fsync(self.root)

    def _prune(self, current: Path) -> None:
        old = [d for d in sorted(self.root.glob("step_*"), key=lambda d: d.name) if d != current]
        for d in old[: max(len(old) - (self.keep - 1), 0)]:
            shutil.rmtree(d, ignore_errors=True)


def _entry(entry: int | dict) -> dict:
    """A manifest's file entry: ``{"size", "sha256"}`` (older manifests: the size only)."""
    return entry if isinstance(entry, dict) else {"size": entry}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (best effort: not every file system supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_state(folder: Path, state: dict) -> None:
    """Pickle ``state`` (what SB3's ``save()`` leaves out) into ``folder/state.pkl``."""
    with open(Path(folder) / STATE_FILE, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)


def load_state(folder: Path) -> dict:
    with open(Path(folder) / STATE_FILE, "rb") as f:
        return pickle.load(f)
