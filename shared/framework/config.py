"""Settings from the environment, validated once at start-up.

Server framework: the services' settings, each with its default and range (the database
URLs, DATABASE_READ_URL's among them, are read and checked by shared.persistence.db). A bad
value stops the process with one line naming the variable (exit code 2), never later in the
middle of a call.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Under the project's .data/, as the embedded database is (relative to the working
# directory: the project root for `make run`, a volume in a container).
DEFAULT_SIGNING_KEY_FILE = Path(".data/audit-signing-key.pem")
DEFAULT_WEBHOOK_SECRET_KEY_FILE = Path(".data/webhook-secret-key")


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable and the problem."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None  # set: clients must present a certificate signed by it


@dataclass(frozen=True)
class Settings:
    deploy_addr: str
    audit_addr: str
    shutdown_grace_s: float
    db_pool_size: int
    token_ttl_s: int
    tls: TlsFiles | None
    log_level: str
    # Off behind PgBouncer in transaction mode: asyncpg prepares unnamed statements.
    db_statement_cache: bool = True
    # With DATABASE_READ_URL: reads that opt in leave the replica while it lags more than
    # this behind the primary (None: however far; DATABASE_READ_MAX_LAG_S=0).
    db_read_max_lag_s: float | None = 30.0
    # Prometheus endpoint of each process; None: off, 0: any free port (logged).
    deploy_metrics_port: int | None = None
    audit_metrics_port: int | None = None
    # Refuse to start (exit 2) when the database role could alter the audit trail.
    require_protected_trail: bool = False
    # Held resources: a LogActions stream idle this long is ended; streams per caller;
    # an export whose reader takes nothing for this long is cancelled.
    audit_stream_idle_s: float = 30.0
    # A LogActions stream is one transaction, which holds back the sealing of every row
    # written after it began: it lasts at most this long.
    audit_stream_max_s: float = 300.0
    audit_streams_per_caller: int = 4
    export_reader_idle_s: float = 60.0
    # Failed logins allowed per (username, peer) and per peer in one window, and how
    # many password checks may wait for the hashing thread.
    login_failures_per_user: int = 5
    login_failures_per_peer: int = 30
    login_throttle_window_s: int = 900
    login_queue_max: int = 32
    # The proxies (nginx, a load balancer) whose `x-forwarded-for` names the caller;
    # empty: nobody's, every caller is the connection's address (shared.identity.actor).
    trusted_proxies: tuple[Network, ...] = ()
    # A change that weakens an environment policy takes effect this long after it was
    # asked for (one admin cannot switch production's protection off, deploy, and back).
    policy_weaken_delay_s: int = 86_400
    # The Ed25519 key that signs audit seals (PEM; made at first start when missing) and
    # how often the sealer runs (every replica tries; one at a time seals).
    audit_signing_key_file: Path = DEFAULT_SIGNING_KEY_FILE
    audit_seal_interval_s: float = 0.5
    # Webhooks: the key that encrypts their secrets in the database (made at first start
    # when missing), and the networks a receiver may be in (empty: any but link-local and
    # cloud metadata addresses, which are always refused).
    webhook_secret_key_file: Path = DEFAULT_WEBHOOK_SECRET_KEY_FILE
    webhook_allowed_networks: tuple[Network, ...] = ()
    # The first retry's delay of a webhook delivery (it doubles from there); lower in tests.
    webhook_retry_base_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        return cls(
            deploy_addr=reader.address("DEPLOY_SVC_ADDR", "[::]:50051"),
            audit_addr=reader.address("AUDIT_SVC_ADDR", "[::]:50052"),
            shutdown_grace_s=reader.number("SHUTDOWN_GRACE_S", 10.0, minimum=0.0),
            db_pool_size=reader.integer("DB_POOL_SIZE", 10, minimum=1, maximum=100),
            token_ttl_s=reader.integer("TOKEN_TTL_S", 43200, minimum=60, maximum=31_536_000),
            tls=reader.tls(),
            log_level=reader.log_level("LOG_LEVEL", "INFO"),
            db_statement_cache=db_statement_cache(env),
            db_read_max_lag_s=reader.number(
                "DATABASE_READ_MAX_LAG_S", 30.0, minimum=0.0, maximum=86_400.0
            )
            or None,
            deploy_metrics_port=reader.port("DEPLOY_METRICS_PORT"),
            audit_metrics_port=reader.port("AUDIT_METRICS_PORT"),
            require_protected_trail=reader.flag("REQUIRE_PROTECTED_TRAIL", False),
            audit_stream_idle_s=reader.number(
                "AUDIT_STREAM_IDLE_S", 30.0, minimum=0.1, maximum=90.0
            ),
            audit_stream_max_s=reader.number(
                "AUDIT_STREAM_MAX_S", 300.0, minimum=1.0, maximum=3600.0
            ),
            audit_streams_per_caller=reader.integer(
                "AUDIT_STREAMS_PER_CALLER", 4, minimum=1, maximum=1000
            ),
            export_reader_idle_s=reader.number(
                "EXPORT_READER_IDLE_S", 60.0, minimum=0.1, maximum=90.0
            ),
            login_failures_per_user=reader.integer(
                "LOGIN_FAILURES_PER_USER", 5, minimum=1, maximum=1000
            ),
            login_failures_per_peer=reader.integer(
                "LOGIN_FAILURES_PER_PEER", 30, minimum=1, maximum=100_000
            ),
            login_throttle_window_s=reader.integer(
                "LOGIN_THROTTLE_WINDOW_S", 900, minimum=1, maximum=86_400
            ),
            login_queue_max=reader.integer("LOGIN_QUEUE_MAX", 32, minimum=1, maximum=10_000),
            trusted_proxies=reader.networks("TRUSTED_PROXIES"),
            policy_weaken_delay_s=reader.integer(
                "POLICY_WEAKEN_DELAY_S", 86_400, minimum=0, maximum=31_536_000
            ),
            audit_signing_key_file=Path(
                reader.raw("AUDIT_SIGNING_KEY_FILE") or DEFAULT_SIGNING_KEY_FILE
            ),
            audit_seal_interval_s=reader.number(
                "AUDIT_SEAL_INTERVAL_S", 0.5, minimum=0.05, maximum=1.0
            ),
            webhook_secret_key_file=Path(
                reader.raw("WEBHOOK_SECRET_KEY_FILE") or DEFAULT_WEBHOOK_SECRET_KEY_FILE
            ),
            webhook_allowed_networks=reader.networks("WEBHOOK_ALLOWED_NETWORKS"),
            webhook_retry_base_s=reader.number(
                "WEBHOOK_RETRY_BASE_S", 1.0, minimum=0.01, maximum=1.0
            ),
        )


def env_flag(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """An on/off setting read outside Settings (SEED, which only `make run` reads)."""
    return _Reader(os.environ if env is None else env).flag(name, default)


def db_statement_cache(env: Mapping[str, str] | None = None) -> bool:
    """DB_STATEMENT_CACHE: 0 behind PgBouncer in transaction mode. Also read by the command
    lines, which connect as the services do but need none of their other settings."""
    return env_flag("DB_STATEMENT_CACHE", True, env)


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{name}={value} is out of range (must be {bound})")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "on", "yes"):
            return True
        if raw.lower() in ("0", "false", "off", "no"):
            return False
        raise ConfigError(f"{name}={raw!r} is not on or off (1/0, true/false)")

    def port(self, name: str) -> int | None:
        """A TCP port, or None when unset."""
        if self.raw(name) is None:
            return None
        return self.integer(name, 0, minimum=0, maximum=65535)

    def number(
        self, name: str, default: float, *, minimum: float, maximum: float = float("inf")
    ) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not minimum <= value <= maximum or value == float("inf"):
            bound = f">= {minimum}" if maximum == float("inf") else f"from {minimum} to {maximum}"
            raise ConfigError(f"{name}={raw} is out of range (must be {bound})")
        return value

    def address(self, name: str, default: str) -> str:
        """host:port, with IPv6 hosts in brackets ([::]:50051); port 0 picks a free port."""
        value = self.raw(name) or default
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{name}={value!r} is not host:port (e.g. [::]:50051)")
        return value

    def networks(self, name: str) -> tuple[Network, ...]:
        """Comma-separated IP addresses or CIDR networks (an address is its /32 or /128).

        Refused, naming the setting: anything that is not an address or network, a network
        with host bits set (`10.0.0.1/8`: a typo for `10.0.0.0/8` or for one address?), an
        IPv6 zone, and a /0, which would let every caller name its own address. An
        IPv4-mapped IPv6 network is kept as the IPv4 network it maps, since callers'
        addresses are compared in that canonical form (shared.framework.validation)."""
        raw = self.raw(name)
        if raw is None:
            return ()
        found: list[Network] = []
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue  # a trailing comma
            if "%" in item:
                raise ConfigError(f"{name}: {item!r} has an IPv6 zone; give the address alone")
            try:
                network = ipaddress.ip_network(item, strict=True)
            except ValueError as error:
                raise ConfigError(
                    f"{name}: {item!r} is not an IP address or network ({error})"
                ) from None
            if (
                isinstance(network, ipaddress.IPv6Network)
                and network.prefixlen >= 96
                and (mapped := network.network_address.ipv4_mapped) is not None
            ):
                network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
            if network.prefixlen == 0:
                raise ConfigError(
                    f"{name}: {item!r} trusts every address: any caller could name its own"
                )
            found.append(network)
        return tuple(found)

    def tls(self) -> TlsFiles | None:
        cert, key, ca = (self.raw(n) for n in ("TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA"))
        if cert is None and key is None:
            if ca is not None:
                raise ConfigError("TLS_CLIENT_CA needs TLS_CERT and TLS_KEY")
            return None
        if cert is None or key is None:
            raise ConfigError("TLS_CERT and TLS_KEY must be set together")
        paths = {"TLS_CERT": cert, "TLS_KEY": key, "TLS_CLIENT_CA": ca}
        for name, path in paths.items():
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"{name}={path!r} is not a readable file")
        return TlsFiles(Path(cert), Path(key), Path(ca) if ca else None)

    def log_level(self, name: str, default: str) -> str:
        value = (self.raw(name) or default).upper()
        if value not in logging.getLevelNamesMapping():
            raise ConfigError(f"{name}={value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
        return value
