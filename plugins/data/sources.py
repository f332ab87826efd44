"""Data sources: the Python standard library (offline, always there), and user files (jsonl, text, parquet).

Each source is iterable (documents in a fixed order) and has `fingerprint()`: the paths, sizes and
modification times of its files, which prepare hashes to find its cache without reading anything.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from pathlib import Path

from pydantic import BaseModel, Field, PositiveInt

from hyloom.data import DataError, document, file_fingerprint, files_under

# ---- stdlib ----------------------------------------------------------------------------------------------

ALWAYS_SKIPPED = {"site-packages", "dist-packages", "__pycache__"}
TEST_FOLDERS = {"test", "tests", "idle_test"}


class StdlibConfig(BaseModel):
    """The running interpreter's standard library, one document per .py file: a corpus that needs no download."""

    max_bytes: PositiveInt = Field(12_000_000, description="read files (in path order) while their sizes add up to "
                                   "at most this; the whole stdlib without tests is about 12 MB")
    include_tests: bool = Field(False, description="also read the test folders (test, tests, idle_test)")


class StdlibSource:
    def __init__(self, cfg: StdlibConfig, root: str | Path | None = None):
        self.cfg = cfg
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self._files: list[Path] | None = None

    def files(self) -> list[Path]:
        if self._files is None:
            skipped = ALWAYS_SKIPPED | (set() if self.cfg.include_tests else TEST_FOLDERS)
            found = []
            for folder, subfolders, names in os.walk(self.root):
                subfolders[:] = [s for s in subfolders if s not in skipped]
                found += [Path(folder) / n for n in names if n.endswith(".py")]
            found.sort(key=lambda p: p.relative_to(self.root).as_posix())
            # Fill the byte budget in path order, skipping a file that does not fit rather than stopping, so
            # one big file does not cut off everything after it.
            self._files, total = [], 0
            for path in found:
                size = path.stat().st_size
                if total + size <= self.cfg.max_bytes:
                    self._files.append(path)
                    total += size
        return self._files

    def fingerprint(self):
        return {"root": str(self.root), "files": file_fingerprint(self.files())}

    def __iter__(self):
        for path in self.files():
            text = path.read_text(encoding="utf-8", errors="replace")
            yield document(text, path.relative_to(self.root).as_posix(), "stdlib")


# ---- jsonl -----------------------------------------------------------------------------------------------

class JsonlConfig(BaseModel):
    """JSON Lines: one object a line, the text in one field."""

    path: str = Field(description="a .jsonl file, or a folder searched recursively for *.jsonl")
    text_field: str = Field("text", description="the field holding the document's text")
    id_field: str | None = Field(None, description="a field holding a document id (default: FILE:LINE)")


class JsonlSource:
    def __init__(self, cfg: JsonlConfig):
        self.cfg = cfg
        self.files = files_under(cfg.path, [".jsonl"], "data.source (jsonl) path")

    def fingerprint(self):
        return file_fingerprint(self.files)

    def __iter__(self):
        field = self.cfg.text_field
        for path in self.files:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{line_no}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{where}: not valid JSON ({exc})") from None
                    if not isinstance(row, dict) or field not in row:
                        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                        raise DataError(f"{where}: no {field!r} field (found: {keys}); set data.source.text_field")
                    text = row[field]
                    if text is None:  # an absent text is no document, not an error
                        continue
                    if not isinstance(text, str):
                        raise DataError(f"{where}: field {field!r} is a {type(text).__name__}, expected a string")
                    doc_id = str(row[self.cfg.id_field]) if self.cfg.id_field in row else f"{path.name}:{line_no}"
                    yield document(text, doc_id, "jsonl", path=str(path))


# ---- text ------------------------------------------------------------------------------------------------

class TextConfig(BaseModel):
    """Plain text files: one document per file, or per paragraph."""

    path: str = Field(description="a text file, or a folder searched recursively for files with these extensions")
    extensions: list[str] = Field([".txt", ".md", ".rst", ".text"], description="file name endings read in a folder")
    split_on_blank_lines: bool = Field(False, description="one document per blank-line-separated paragraph")
    encoding: str = Field("utf-8", description="text encoding; undecodable bytes become U+FFFD")


class TextSource:
    def __init__(self, cfg: TextConfig):
        self.cfg = cfg
        self.root = Path(cfg.path).expanduser()
        self.files = files_under(cfg.path, cfg.extensions, "data.source (text) path")

    def fingerprint(self):
        return file_fingerprint(self.files)

    def __iter__(self):
        for path in self.files:
            text = path.read_text(encoding=self.cfg.encoding, errors="replace")
            name = path.relative_to(self.root).as_posix() if path != self.root else path.name
            if not self.cfg.split_on_blank_lines:
                yield document(text, name, "text", path=str(path))
                continue
            paragraphs = [p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", text)]
            for k, paragraph in enumerate(p for p in paragraphs if p.strip()):
                yield document(paragraph, f"{name}#{k}", "text", path=str(path))


# ---- parquet ---------------------------------------------------------------------------------------------

class ParquetConfig(BaseModel):
    """Parquet files (needs pyarrow): one row a document."""

    path: str = Field(description="a .parquet file, or a folder searched recursively for *.parquet")
    text_field: str = Field("text", description="the column holding the document's text")
    id_field: str | None = Field(None, description="a column holding a document id (default: FILE:ROW)")
    batch_rows: PositiveInt = Field(4096, description="rows read at a time")


class ParquetSource:
    def __init__(self, cfg: ParquetConfig):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("data source 'parquet' needs pyarrow, which is not installed: "
                            "pip install pyarrow") from None
        self.cfg, self._pq = cfg, pq
        self.files = files_under(cfg.path, [".parquet"], "data.source (parquet) path")

    def fingerprint(self):
        return file_fingerprint(self.files)

    def __iter__(self):
        cfg = self.cfg
        for path in self.files:
            reader = self._pq.ParquetFile(path)
            names = reader.schema_arrow.names
            if cfg.text_field not in names:
                raise DataError(f"{path}: no {cfg.text_field!r} column (found: {', '.join(names)}); "
                                f"set data.source.text_field")
            columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field in names else [])
            row = 0
            for batch in reader.iter_batches(batch_size=cfg.batch_rows, columns=columns):
                texts = batch.column(0).to_pylist()
                ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
                for text, doc_id in zip(texts, ids):
                    if text is not None:
                        yield document(str(text), str(doc_id) if doc_id is not None else f"{path.name}:{row}",
                                       "parquet", path=str(path))
                    row += 1
