"""`pysource`: the Python source of every installed package (site-packages) and of the standard library, offline.

The standard library alone is a few million tokens; a machine with torch and its friends installed holds hundreds
of MB of Python. Installed trees repeat themselves (vendored copies, the same module shipped by two packages, a
backport of a stdlib module), and a copy on both sides of the train/eval split would leak held-out text into
training. So the source yields every distinct file once (compared lower-cased with whitespace collapsed, as the
`dedup_exact` step does): the split, which assigns whole documents, then has no document on both sides. Near
copies are the `dedup_near` step's job.
"""

from __future__ import annotations

import hashlib
import os
import site
import sys
import sysconfig
from pathlib import Path

from pydantic import BaseModel, Field, PositiveInt

from hyloom.data import DataError, document, file_fingerprint
from hyloom.plugins.data.dedup import normalise
from hyloom.plugins.data.sources import TEST_FOLDERS

SKIPPED = {"__pycache__", ".git"}
PACKAGE_FOLDERS = ("site-packages", "dist-packages")


class PysourceConfig(BaseModel):
    """Python source files of installed packages and the standard library, one document per distinct .py file."""

    paths: list[str] | None = Field(None, description="folders (or .py files) to read; null: every site-packages "
                                    "or dist-packages folder on sys.path, plus the standard library (see stdlib)")
    stdlib: bool = Field(True, description="with paths null: read the standard library too; false leaves out the "
                         "stdlib and every copy of a stdlib file, so a `stdlib` source beside this one (e.g. the "
                         "filler of passkey/niah examples) shares no document with it")
    include_tests: bool = Field(False, description="also read test folders (test, tests, idle_test)")
    max_bytes: PositiveInt = Field(400_000_000, description="take distinct files (in the source's order) while "
                                   "their sizes add up to at most this")
    max_file_bytes: PositiveInt = Field(1_000_000, description="skip larger files (generated tables, bundled data)")


def package_folders() -> list[Path]:
    """The site-packages / dist-packages folders on sys.path (and the site module's), existing, without repeats."""
    candidates = list(sys.path) + list(site.getsitepackages()) + [site.getusersitepackages()]
    seen, out = set(), []
    for entry in candidates:
        path = Path(entry or ".").resolve()
        if path.name in PACKAGE_FOLDERS and path.is_dir() and path not in seen:
            seen.add(path)
            out.append(path)
    return out


def _key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


def _order(doc_id: str) -> bytes:
    """A fixed pseudo-random order: a byte budget then samples every package, not the alphabetically first."""
    return hashlib.blake2b(doc_id.encode(), digest_size=8).digest()


class PysourceSource:
    def __init__(self, cfg: PysourceConfig, stdlib_root: str | Path | None = None):
        self.cfg = cfg
        self.stdlib_root = Path(stdlib_root or sysconfig.get_paths()["stdlib"]).resolve()
        if cfg.paths is not None:
            self.roots = [Path(p).expanduser().resolve() for p in cfg.paths]
            missing = [str(p) for p in self.roots if not p.exists()]
            if missing:
                raise DataError(f"data.source (pysource) paths: {', '.join(missing)} does not exist")
        else:
            self.roots = ([self.stdlib_root] if cfg.stdlib else []) + package_folders()
        self._candidates: list[tuple[str, Path]] | None = None
        self._files: list[tuple[str, Path]] | None = None

    def _walk(self, root: Path, label: str, skip_packages: bool) -> list[tuple[str, Path]]:
        """(document id, path) of the .py files under root; the stdlib walk skips its own site-packages."""
        if root.is_file():
            return [(f"{label}/{root.name}", root)] if root.suffix == ".py" else []
        skipped = SKIPPED | (set() if self.cfg.include_tests else TEST_FOLDERS)
        if skip_packages:
            skipped |= set(PACKAGE_FOLDERS)
        found = []
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = [s for s in subfolders if s not in skipped]
            for name in names:
                if name.endswith(".py"):
                    path = Path(folder) / name
                    found.append((f"{label}/{path.relative_to(root).as_posix()}", path))
        return found

    def candidates(self) -> list[tuple[str, Path]]:
        """Every .py file of the roots that is a regular file within max_file_bytes, in the source's order."""
        if self._candidates is None:
            labels: dict[str, int] = {}
            found = []
            for root in self.roots:
                is_stdlib = root == self.stdlib_root
                label = "stdlib" if is_stdlib else root.name
                labels[label] = labels.get(label, 0) + 1
                if labels[label] > 1:  # two roots of one name (two site-packages): ids stay distinct
                    label = f"{label}#{labels[label]}"
                found += self._walk(root, label, skip_packages=is_stdlib)
            found = [(i, p) for i, p in found if p.is_file() and p.stat().st_size <= self.cfg.max_file_bytes]
            self._candidates = sorted(found, key=lambda item: (_order(item[0]), item[0]))
        return self._candidates

    def files(self) -> list[tuple[str, Path]]:
        """The distinct files taken: candidates in order, copies of an earlier one (or, with stdlib false, of a
        stdlib file) skipped, while the budget lasts (a file that does not fit is skipped, not the end)."""
        if self._files is None:
            seen: set[bytes] = set()
            if self.cfg.paths is None and not self.cfg.stdlib:
                for _, path in self._walk(self.stdlib_root, "stdlib", skip_packages=True):
                    seen.add(_key(_read(path)))
            self._files, total = [], 0
            for doc_id, path in self.candidates():
                size = path.stat().st_size
                if total + size > self.cfg.max_bytes:
                    continue
                key = _key(_read(path))
                if key in seen:
                    continue
                seen.add(key)
                self._files.append((doc_id, path))
                total += size
        return self._files

    def fingerprint(self):
        # Paths, sizes and times of every candidate (not only the files taken: which copies are skipped depends
        # on their contents), and of the stdlib when its copies are left out.
        stdlib = [] if self.cfg.paths is not None or self.cfg.stdlib else \
            file_fingerprint(p for _, p in self._walk(self.stdlib_root, "stdlib", skip_packages=True))
        return {"files": file_fingerprint(p for _, p in self.candidates()), "stdlib_excluded": stdlib}

    def __iter__(self):
        for doc_id, path in self.files():
            yield document(_read(path), doc_id, "pysource")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
