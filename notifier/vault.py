"""Secrets at rest: webhook header values and signing secrets are sealed with Fernet.

Fernet (from ``cryptography``) is authenticated encryption with key rotation (``MultiFernet``):
the first key seals, every key opens. Keys come from ``NOTIFIER_SECRET_KEYS``; on the embedded
default one is made once in ``data_dir/secret.key`` (readable by its owner only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from notifier.embedded import private_folder
from notifier.errors import NotifierError

__all__ = ["Vault", "VaultError", "mask", "mask_url", "vault_for"]


class VaultError(NotifierError):
    """A sealed value could not be opened with any configured key."""


class Vault:
    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("a vault needs at least one key")
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])

    def seal(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken as exc:
            raise VaultError("a sealed secret does not open with NOTIFIER_SECRET_KEYS") from exc


def _key_file(data_dir: Path) -> str:
    path = data_dir / "secret.key"
    if not path.exists():
        private_folder(data_dir)
        # O_EXCL: of two processes starting together, one writes the key and the other reads it.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(Fernet.generate_key().decode())
    for _ in range(100):
        key = path.read_text().strip()
        if key:
            return key
    raise VaultError(f"{path} is empty")


def vault_for(secret_keys: Sequence[str], data_dir: Path) -> Vault:
    """The configured keys, or the embedded default's key file."""
    return Vault(list(secret_keys) or [_key_file(data_dir)])


def mask(secret: str) -> str:
    """``****abcd``: enough to recognise a value, never enough to use it."""
    return "****" + secret[-4:] if len(secret) > 8 else "****"


def mask_url(url: str) -> str:
    """``url`` with its password shown as ``***``: a database, broker or Redis URL as it may be
    printed (terminals and their scrollback end up in logs and screenshots)."""
    parts = urlsplit(url)
    credentials, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
