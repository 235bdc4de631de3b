"""The model cache: where converted and quantized entries live, how an entry is built
(into a temporary sibling, then renamed into place), and which GGUF file an entry came from.
Shared by the GGUF conversion (loader.py) and the int4 entries (quantize.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

# Bytes of the GGUF file hashed for the cache key (with its size): enough to tell two files
# apart (the header holds the metadata and tensor table), cheap even for multi-GB files.
_HASH_PREFIX_BYTES = 1 << 20
# In a conversion entry: the GGUF file it was converted from (see record_source).
SOURCE_FILE = "specd_source.json"


def cache_root() -> Path:
    """$SPECD_CACHE_DIR, else ~/.cache/specd/models."""
    env = os.environ.get("SPECD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "specd" / "models"


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The cache entry for a GGUF file: <root>/<stem>-<hash of size + first MiB>."""
    h = hashlib.sha256(str(gguf_path.stat().st_size).encode())
    with open(gguf_path, "rb") as f:
        h.update(f.read(_HASH_PREFIX_BYTES))
    return cache_root() / f"{gguf_path.stem}-{h.hexdigest()[:16]}"


def build_cache_entry(
    target: Path, required: tuple[str, ...], build: Callable[[Path], None]
) -> Path:
    """Runs ``build(tmp)`` into a temporary sibling of ``target`` and renames it into place,
    unless ``target`` already holds every ``required`` file."""
    if all((target / f).is_file() for f in required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry should be readable like ~/.cache
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first: its entry is as good.
            if not all((target / f).is_file() for f in required):
                raise
            logger.info("cache entry %s appeared meanwhile; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def record_source(entry: Path, gguf_path: Path) -> None:
    """Notes in a conversion entry which GGUF file it came from: the runner hands on only the
    converted directory, and ``--quantization auto/int4`` go back to the file's raw 4-bit
    blocks (server/model/quantize.py). Entries made before this note get it on their next use.
    """
    marker = entry / SOURCE_FILE
    text = json.dumps({"gguf": str(gguf_path.resolve())})
    if marker.is_file() and marker.read_text() == text:
        return
    try:
        write_atomic(marker, text)
    except OSError as e:  # a read-only cache: served as before, just never int4 by `auto`
        logger.warning("cannot note the source of %s (%s); --quantization auto = none", entry, e)


def write_atomic(path: Path, text: str) -> None:
    """Writes a small file so that readers see the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file a conversion entry came from, if it still exists."""
    marker = Path(model_dir) / SOURCE_FILE
    if not marker.is_file():
        return None
    path = Path(json.loads(marker.read_text())["gguf"])
    return path if path.is_file() else None
