"""The keys that sign audit seals: files the service holds, never rows of the database
(whoever can write the database must not be able to add a key a verifier would trust).

AUDIT_SIGNING_KEY_FILE holds the current Ed25519 private key (PKCS #8 PEM). Retired
keys' public halves are kept beside it, in the directory `<key file>.retired/`, one
`<key_id>.pem` each, so that seals signed before a rotation still verify. Each PEM
file carries its dates as RFC 7468 explanatory text above the PEM block:

    key_id: 3f0c9a2b7d1e4c55
    created_at: 2026-11-30T15:00:00.000000Z
    retired_at: 2026-12-01T09:00:00.000000Z
    -----BEGIN PUBLIC KEY-----

`python -m audit_svc.signing_keys rotate` retires the current key and writes a new one;
running services pick it up at their next sealer run (they look at the file's stat).
`python -m audit_svc.signing_keys public` prints the public keys, for an auditor.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit_svc.sealing import key_id, time_text
from shared.framework.config import Settings
from shared.framework.key_files import write_new

log = logging.getLogger("relman.audit_svc")
ALGORITHM = "Ed25519"
_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)
_HEADER = re.compile(r"^([a-z_]+):\s*(\S+)\s*$", re.M)


class KeyFileError(RuntimeError):
    """A key file that cannot be used: the message names it and why."""


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    public_key: Ed25519PublicKey
    public_key_pem: str
    created_at: datetime | None
    retired_at: datetime | None


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _headers(text: str) -> dict[str, str]:
    before = text.split("-----BEGIN", 1)[0]
    return dict(_HEADER.findall(before))


def _time(headers: dict[str, str], name: str) -> datetime | None:
    """A date of the explanatory text; None when it is missing or not a date (it is only
    shown, never trusted)."""
    try:
        moment = datetime.fromisoformat(headers[name].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # a bare date: UTC


def read_public_keys(text: str) -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key among the PEM blocks of `text`, by its key_id (computed from
    the key, never taken from a header)."""
    keys = {}
    for match in _BLOCK.finditer(text):
        if match.group(1) != "PUBLIC KEY":
            continue
        key = serialization.load_pem_public_key(match.group(0).encode())
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError("a public key is not an Ed25519 key")
        keys[key_id(key)] = key
    return keys


@dataclass(frozen=True)
class Keyring:
    """The current private key and every public key the service knows (current first)."""

    current_key_id: str
    private_key: Ed25519PrivateKey
    keys: tuple[SigningKey, ...]

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {key.key_id: key.public_key for key in self.keys}


def retired_dir(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".retired")


def _private_file_text(private_key: Ed25519PrivateKey, created_at: datetime) -> str:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return f"key_id: {key_id(private_key.public_key())}\ncreated_at: {time_text(created_at)}\n{pem}"


def make_key_file(key_file: Path) -> str | None:
    """Makes a new signing key at `key_file` unless one is there; its key_id, or None."""
    private_key = Ed25519PrivateKey.generate()
    if write_new(key_file, _private_file_text(private_key, datetime.now(UTC)).encode()):
        return key_id(private_key.public_key())
    return None


def load_keyring(key_file: Path) -> Keyring:
    """The key file's private key and the public keys of the retired ones beside it."""
    try:
        text = key_file.read_text()
    except OSError as error:
        raise KeyFileError(f"AUDIT_SIGNING_KEY_FILE {key_file}: {error.strerror}") from None
    block = _BLOCK.search(text)
    try:
        private_key = serialization.load_pem_private_key(block.group(0).encode(), None)
    except (AttributeError, ValueError, TypeError):
        private_key = None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(
            f"AUDIT_SIGNING_KEY_FILE {key_file}: not an unencrypted Ed25519 private key (PEM)"
        )
    public_key = private_key.public_key()
    current = SigningKey(
        key_id(public_key),
        public_key,
        public_pem(public_key),
        _time(_headers(text), "created_at"),
        None,
    )
    retired = []
    folder = retired_dir(key_file)
    for path in sorted(folder.glob("*.pem")) if folder.is_dir() else ():
        try:
            retired_text = path.read_text()
            public_keys = read_public_keys(retired_text)
        except (OSError, ValueError, KeyFileError) as error:
            raise KeyFileError(f"retired key {path}: {error}") from None
        headers = _headers(retired_text)
        for found_id, key in public_keys.items():
            if found_id != current.key_id:
                retired.append(
                    SigningKey(
                        found_id,
                        key,
                        public_pem(key),
                        _time(headers, "created_at"),
                        _time(headers, "retired_at"),
                    )
                )
    retired.sort(key=lambda key: (key.created_at or datetime.min.replace(tzinfo=UTC), key.key_id))
    return Keyring(current.key_id, private_key, (current, *retired))


class KeyFile:
    """The service's view of AUDIT_SIGNING_KEY_FILE: made at first start when missing, read
    again whenever the file or its retired keys change (a rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple | None = None
        self._keyring: Keyring | None = None

    def _stamp(self) -> tuple:
        def stat(path: Path):
            try:
                found = path.stat()
            except FileNotFoundError:
                return None
            return (found.st_ino, found.st_mtime_ns, found.st_size)

        return (stat(self.path), stat(retired_dir(self.path)))

    def ensure(self, service: str) -> Keyring:
        """The keyring, making the key first if there is none (logged with its key_id);
        KeyFileError when neither works (the process stops with one line, exit 2)."""
        if not self.path.exists():
            try:
                made = make_key_file(self.path)
            except OSError as error:
                raise KeyFileError(
                    f"AUDIT_SIGNING_KEY_FILE {self.path}: cannot make a key there:"
                    f" {error.strerror or error}"
                ) from None
            if made:
                log.info(
                    "%s made an audit signing key %s at %s (AUDIT_SIGNING_KEY_FILE): keep it,"
                    " and give auditors its public key (ListAuditSigningKeys)",
                    service,
                    made,
                    self.path,
                )
        return self.keyring()

    def keyring(self) -> Keyring:
        """The keys as the files now say; when the files changed into something unusable
        (a rotation gone wrong), the keys read before, with an ERROR once per change."""
        stamp = self._stamp()
        if self._keyring is None or stamp != self._seen:
            try:
                keyring = load_keyring(self.path)
            except KeyFileError as error:
                if self._keyring is None:
                    raise
                log.error("%s: still signing with key %s", error, self._keyring.current_key_id)
            else:
                self._keyring = keyring
            self._seen = stamp
        return self._keyring


def rotate(key_file: Path) -> tuple[str, str]:
    """Retires the current key (its public half into `<key file>.retired/`) and writes a
    new one in its place; returns (old key_id, new key_id)."""
    old = load_keyring(key_file)
    current = old.keys[0]
    folder = retired_dir(key_file)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    created = f"created_at: {time_text(current.created_at)}\n" if current.created_at else ""
    (folder / f"{current.key_id}.pem").write_text(
        f"key_id: {current.key_id}\n{created}retired_at: {time_text(now)}\n{current.public_key_pem}"
    )
    private_key = Ed25519PrivateKey.generate()
    temporary = key_file.with_name(f".{key_file.name}.rotate.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(_private_file_text(private_key, now))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, key_file)
    return current.key_id, key_id(private_key.public_key())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m audit_svc.signing_keys",
        description="The audit signing keys of AUDIT_SIGNING_KEY_FILE.",
    )
    parser.add_argument("command", choices=("rotate", "public"))
    args = parser.parse_args(argv)
    key_file = Settings.from_env().audit_signing_key_file
    try:
        if args.command == "rotate":
            old, new = rotate(key_file)
            print(f"retired {old}; signing with {new}")
        else:
            for key in load_keyring(key_file).keys:
                sys.stdout.write(key.public_key_pem)
    except KeyFileError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
