"""Documents, the error type of the data pipeline, and helpers shared by data sources."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np


class DataError(Exception):
    """A data source, tier step, tokenizer or prepared folder cannot be used as configured."""


def document(text: str, id: str, source: str, **meta: Any) -> dict:
    """A document as every data source yields it: `{"text": str, "meta": {"id": ..., "source": ..., ...}}`."""
    return {"text": text, "meta": {"id": id, "source": source, **meta}}


def check_document(doc: Any, index: int) -> dict:
    """Catch a third-party source that yields something else early, with a message naming the document."""
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise DataError(f"document #{index} from the data source is not {{'text': str, 'meta': dict}}: {doc!r:.200}")
    if "ids" in doc:  # pre-tokenized: ids of the source's own vocabulary, written above the tokenizer's
        ids = np.asarray(doc["ids"])
        if ids.ndim != 1 or not ids.size or ids.dtype.kind not in "iu" or ids.min() < 0:
            raise DataError(f"document #{index} from the data source has `ids` that are not a non-empty list of "
                            f"non-negative integers: {doc['ids']!r:.200}")
    meta = doc.setdefault("meta", {})
    meta.setdefault("id", str(index))
    return doc


def files_under(path: str | Path, suffixes: Iterable[str], what: str) -> list[Path]:
    """`path` itself if it is a file, else every file below it ending in one of `suffixes`, sorted."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{what}: {root} does not exist")
    if root.is_file():
        return [root]
    suffixes = tuple(s.lower() for s in suffixes)
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not found:
        raise DataError(f"{what}: no {' / '.join('*' + s for s in suffixes)} files under {root}")
    return found


def file_fingerprint(paths: Iterable[Path]) -> list:
    """What identifies files' contents cheaply: path, size and modification time of each."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def stable_hash(obj: Any) -> str:
    """A hex digest of a JSON-able object that is the same in every process and on every machine."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def texts_hash(texts: Iterable[str]) -> str:
    """A digest of a sequence of texts (length-prefixed, so ['ab', 'c'] and ['a', 'bc'] differ)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
