"""A peer's Ed25519 identity: created once in the peerinfer home folder, kept with mode 0600.

The peer id is the first 160 bits of the SHA-256 of the raw public key, in hex, so anyone holding a
record can check that its id and key belong together. This is the only module that imports
``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peerinfer.errors import ConfigError

log = logging.getLogger(__name__)

PeerId = NewType("PeerId", str)
KEY_FILE = "peer_key.pem"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def peer_id_for(public_key: bytes) -> PeerId:
    """The id that belongs to a raw 32-byte Ed25519 public key."""
    return PeerId(hashlib.sha256(public_key).hexdigest()[:40])


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True only if ``signature`` is ``public_key``'s signature over ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Strict base64; raises ``ValueError`` on anything else."""
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True)
class PeerIdentity:
    """A private key and what is derived from it."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> PeerIdentity:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> PeerId:
        return peer_id_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def load_or_create_identity(home: Path) -> PeerIdentity:
    """The identity kept in ``home``; created there (mode 0600) on first start."""
    path = home / KEY_FILE
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            return _read_key(path)
        identity = PeerIdentity.generate()
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # O_EXCL: two workers starting at once on one home folder must not overwrite each other's key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
    except FileExistsError:
        return _read_key(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the peer key {path}: {exc.strerror}; set PEERINFER_HOME to a writable folder"
        ) from exc
    log.info("created peer identity %s in %s", identity.peer_id, path)
    return identity


def _read_key(path: Path) -> PeerIdentity:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("the peer key %s has mode %o; others can read it, run: chmod 600 %s", path, mode, path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the peer key {path}: {exc}; remove it to create a new identity") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the peer key {path} is not an Ed25519 key; remove it to create a new identity")
    return PeerIdentity(key)
