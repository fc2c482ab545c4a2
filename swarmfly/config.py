"""One typed configuration, built once: defaults <- TOML file <- SWARMFLY_* environment <- flags.

No other module reads the environment; the object is passed down.

About 800 lines, on purpose: every section's keys, their types and ranges, and the one
loader that checks them and names where a bad value came from (file, variable, flag) are
read together, and docs/configuration.md is held to this one module by a test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    import ssl

T = TypeVar("T")
log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
"""The URL schemes nats-py connects with; a URL without one is ``nats://``."""


def parse_size(value: str | int | float) -> int:
    """'8MiB', '8M', '512k', 1024 -> bytes; binary and decimal units both accepted."""
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (bytes, or with a unit: 512k, 100MiB, 1.5GB)")
    number, unit, binary = match.groups()
    base = 1024 if binary or unit == "" else 1000
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * base**power)


@dataclass
class NatsConfig:
    servers: list[str] = field(default_factory=list)
    """Empty: use the cluster that `swarmfly up` recorded in the state dir."""
    prefix: str = "swarmfly"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    """File holding the token, read again at every (re)connect: a Kubernetes service-account
    token the kubelet renews (the auth callout checks it; swarmfly.callout)."""
    creds: str | None = None
    """Path of a .creds file: a user JWT and its NKey seed (operator mode)."""
    nkeys_seed: str | None = None
    """Path of a file holding an NKey user seed (``SU…``)."""
    tls_ca: str | None = None
    """CA the servers' certificates are checked with; any TLS setting makes TLS required."""
    tls_cert: str | None = None
    tls_key: str | None = None
    """The client certificate's key, when ``tls_cert`` does not hold it too."""
    tls_hostname: str | None = None
    """Name the servers' certificates must carry, when the URLs name them otherwise (by
    address, or through a load balancer)."""
    inbox_prefix: str | None = None
    """Subject prefix of this client's reply inboxes (default ``_INBOX``): with per-role
    permissions each role may subscribe only to its own (``_INBOX_peer``, …). In a storage
    or peer service ``{host_id}`` stands for its host id (``_INBOX_peer_{host_id}``, where
    the auth callout gives each host its own)."""


@dataclass
class CalloutConfig:
    """`swarmfly callout`: NATS identities from Kubernetes service-account tokens."""

    issuer_seed: str | None = None
    """File holding the account NKey seed (``SA…``) that signs the users it lets in; its
    public key is the ``issuer`` of nats-server's ``auth_callout``."""
    jwks: str | None = None
    """The cluster's token-signing keys: a JWKS file, or an https:// URL such as
    ``https://kubernetes.default.svc/openid/v1/jwks``."""
    jwks_ca: str | None = None
    """CA of the JWKS URL (in a pod: the service account's ``ca.crt``)."""
    jwks_token_file: str | None = None
    """Bearer token for the JWKS URL (in a pod: the service account's ``token``)."""
    token_issuer: str | None = None
    """The tokens' ``iss`` (the API server's --service-account-issuer)."""
    audience: str = "swarmfly"
    """The ``aud`` a token must carry: a projected token made for swarmfly, not the pod's
    default API token."""
    peer: list[str] = field(default_factory=list)
    """Service accounts (``system:serviceaccount:NS:NAME``) that are peers, one per node."""
    storage: list[str] = field(default_factory=list)
    """Service accounts that are storage, one per pod."""
    scheduler: list[str] = field(default_factory=list)
    account: str = "$G"
    """The NATS account the users are placed in (the global one, unless accounts are set)."""


@dataclass
class SchedulerConfig:
    listen: str = "127.0.0.1"
    http_port: int = 0
    id: str | None = None
    """Stable across restarts (default: hostname + state dir): a restarted scheduler takes
    back its own partition leases at once instead of waiting for them to expire."""
    partitions: int = 16
    """Task partitions, each held by one scheduler through a lease in JetStream KV. Only
    where the bucket keeps no count yet: its count wins, and `swarmfly scheduler partitions
    N` changes it online; peers learn it from heartbeat replies."""
    lease: float = 6.0
    """Seconds a partition's lease lasts unrenewed: a dead scheduler's partitions move
    within about this long."""
    renew_interval: float = 2.0
    candidate_parents: int = 4
    """Parents offered per decision, the task's seed among them; twice as many to a child
    behind the swarm (``core.LAGGARD_SHARE``)."""
    acyclic: bool = False
    """Parents form a DAG, as in Dragonfly: no peer is offered its own descendant. Off by
    default: peers trade pieces both ways, which finishes swarms about twice as fast."""
    heartbeat_interval: float = 5.0
    host_ttl: float = 15.0
    seed_timeout: float = 30.0
    evaluator: str = "default"
    api_token_file: str | None = None
    """File holding the token the dashboard and API ask for (default: ``api-token`` in the
    state dir, made on first start); several schedulers behind one address share one."""


@dataclass
class HostConfig:
    """What ``[peer]`` and ``[storage]`` both set: each is a host in the swarm, whose settings
    (``services.peer.host.HostSettings``) are derived from its section."""

    host_id: str | None = None
    listen: str = "0.0.0.0"
    advertise_ip: str | None = None
    upload_port: int = 0
    upload_rate: int = 0
    upload_slots: int = 64
    idc: str = ""
    location: str = ""
    cache_quota: int = 0
    """Bytes of cached tasks; 0: no quota. Above cache_high of it, least recently used
    tasks are evicted down to cache_low."""
    cache_high: float = 0.9
    cache_low: float = 0.7
    cache_ttl: float = 6 * 3600.0
    """Seconds a cached task may go unused (Dragonfly's default task expiry)."""
    disk_high: float = 0.95
    """Share of the state dir's filesystem in use (by anything) above which cached tasks
    are evicted, least recently used first, down to disk_low; 0: off."""
    disk_low: float = 0.85
    gc_interval: float = 60.0


@dataclass
class PeerConfig(HostConfig):
    upload: bool = True
    """Serve pieces to other peers; false: a leech (Dragonfly's disableShared), which
    downloads, uploads nothing and is never offered as a parent."""
    download_rate: int = 0
    concurrency: int = 16
    per_parent: int = 4
    piece_timeout: float = 30.0
    strategy: str = "rarest-first"
    piece_spans: bool = False
    """One trace span per piece transfer; off: one span per download phase."""
    output_roots: list[str] = field(default_factory=list)
    """Directories ``peer.<host>.download`` over NATS may write under; none: it writes
    nowhere (`swarmfly get` uses the local socket, which writes as its caller)."""
    socket: str | None = None
    """The local socket `swarmfly get` reaches the peer at (default ``<state dir>/peer.sock``)."""
    socket_group: str | None = None
    """A group whose members may use the local socket too (mode 0660); default: only the
    peer's own user (0600)."""


@dataclass
class OriginsConfig:
    """What origins services read (docs/configuration.md#origins); link-local and cloud
    metadata addresses are denied whatever this says."""

    allow: list[str] = field(default_factory=list)
    """Set: only origins matching an entry are read."""
    deny: list[str] = field(default_factory=list)


@dataclass
class StorageConfig(HostConfig):
    upload_slots: int = 256
    origin_concurrency: int = 4
    lend_pieces: bool = True
    """While its uplink is full, let waiting peers read pieces of a new task from the origin
    themselves (each piece is still read once), and take them from the swarm afterwards."""
    lend_sole: bool = True
    """Lend a task's sole child (the only one asking for a tenth of a second, with the file's
    digest known) the whole file, in order, and take the copy from it afterwards: one get
    reads the origin directly and hashes every byte once (bench/single.py: ratio_fast 2.6 ->
    1.39). Its cost: the child registers what it read only once it is done (it has no digest
    of each piece to report), so when the task's partition moves and its seed leaves
    meanwhile, the next seed may read some of those pieces from the origin again. Off: the
    seed reads every piece and serves it."""
    copies: int = 1
    """Storage instances that hold each preheated task: its home, and as replicas the next
    in rendezvous order, which take it from the swarm. The scheduler asks the first replica
    when the home goes, and it holds the task already: no origin read."""
    cache_ttl: float = 7 * 24 * 3600.0
    """The cluster's cache keeps tasks longer than a peer does."""
    handover_timeout: float = 30.0
    """Seconds a stopping (SIGTERM) instance spends at most handing its complete tasks over
    to their homes among the instances that stay, which take them from it through the swarm
    (0: none; its cached tasks are read from the origin again when next asked for)."""
    handover_concurrency: int = 4
    """Tasks a stopping instance hands over at once."""


@dataclass
class ProxyConfig:
    enabled: bool = True
    """Run the registry mirror and HTTP proxy with the peer (as dfdaemon does)."""
    listen: str = "127.0.0.1"
    """Loopback unless told otherwise: the proxy speaks for this host's clients only."""
    port: int | None = None
    """None: 65001 (Dragonfly's proxy port) when free, else any free port, so several peers
    on one machine start side by side; 0: any free port."""
    registries: list[str] = field(default_factory=lambda: ["https://registry-1.docker.io"])
    """Upstream registries the mirror forwards to (no others); the first is the default."""
    rules: list[str] = field(default_factory=list)
    """HTTP proxy mode: URLs matching one of these regexes go through the swarm."""
    hosts: list[str] = field(default_factory=list)
    """HTTP proxy mode: ``[http[s]://]host[:port]`` entries (the host an fnmatch pattern, e.g.
    ``*.example.com``) that requests and CONNECT tunnels may go to besides the registries'
    own host and port; no port means 80 for http and 443 for https and CONNECT, ``:*`` any
    port; ``*:*`` makes an open forward proxy, sensible on loopback only."""


@dataclass
class HttpConfig:
    """Bounds of every HTTP server a process runs (scheduler, upload servers, proxy)."""

    header_timeout: float = 10.0
    """Seconds a new connection has to send a whole request head."""
    idle_timeout: float = 20.0
    """Seconds a keep-alive connection may wait for its next request."""
    max_connections: int = 4096
    """Connections per server, at most a quarter of the process's file descriptors."""
    max_per_address: int = 256
    """Connections per server from one client address."""
    capabilities: bool = True
    """Upload servers serve a task's pieces only to a holder of a capability the schedulers
    signed for it (docs/security.md); false opens the data plane to whoever reaches it."""


@dataclass(frozen=True)
class Tracing:
    """What the standard ``OTEL_*`` variables ask of swarmfly's tracing (read here, as every
    variable is; the OpenTelemetry SDK reads the exporter's own, endpoint and headers)."""

    exporters: tuple[str, ...] = ("otlp",)
    """``OTEL_TRACES_EXPORTER``: ``otlp`` (over HTTP), ``console``, or both."""
    service_name: str | None = None
    """``OTEL_SERVICE_NAME``; None: ``swarmfly-<service>``."""
    protocol: str = ""
    """``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (or ``OTEL_EXPORTER_OTLP_PROTOCOL``)."""


def _default_state_dir() -> Path:
    """This user's state dir (platformdirs'). Imported only when no state dir is given, as
    are the TOML parser and difflib when needed: every `swarmfly get` loads this module, and
    the three cost it a tenth of its start-up."""
    import platformdirs

    return Path(platformdirs.user_state_dir("swarmfly"))


@dataclass
class Config:
    state_dir: Path = field(default_factory=_default_state_dir)
    log_level: str | None = None
    """One of ``LOG_LEVELS``; None: the command's own, INFO for a service, WARNING for a
    get (whose in-process peer would say at INFO what a service does)."""
    tracing: Tracing | None = None
    """Set when the standard OTEL_* variables ask for an exporter (OTLP); None: off."""
    disable_plugins: list[str] = field(default_factory=list)
    """Plugins (entry-point names) not to load: SWARMFLY_DISABLE_PLUGINS=name,..."""
    nats: NatsConfig = field(default_factory=NatsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    origins: OriginsConfig = field(default_factory=OriginsConfig)
    callout: CalloutConfig = field(default_factory=CalloutConfig)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each plugin's own settings, the file's ``[plugins.<entry-point name>]`` tables, as
    given: the plugin host checks each against its plugin's settings class (``settings_of``)."""

    def nats_options(self) -> dict[str, Any]:
        """Auth and TLS options for nats-py, checked here: a mistake is a ValueError naming the
        setting, not a client that retries forever (or hangs, on a creds file without a JWT)."""
        return nats_client_options(self.nats)


def nats_client_options(n: NatsConfig) -> dict[str, Any]:
    """The nats-py options of ``[nats]``; raises ValueError on a setting that cannot work.
    Messages name settings and paths, never a secret or a file's content."""
    methods = [
        name
        for name, value in (
            ("user", n.user),
            ("token", n.token),
            ("token_file", n.token_file),
            ("creds", n.creds),
            ("nkeys_seed", n.nkeys_seed),
        )
        if value
    ]
    if len(methods) > 1:
        raise ValueError(f"[nats]: one way to authenticate, not {' and '.join(methods)}")
    if n.password and not n.user:
        raise ValueError("[nats] password needs a user")
    if n.tls_key and not n.tls_cert:
        raise ValueError("[nats] tls_key needs tls_cert (the client certificate it belongs to)")
    options: dict[str, Any] = {}
    if n.user:
        options["user"], options["password"] = n.user, n.password
    if n.token:
        options["token"] = n.token
    if n.token_file:
        _read_setting("token_file", n.token_file)
        options["token"] = TokenFile(Path(n.token_file).expanduser())
    if n.creds:
        text = _read_setting("creds", n.creds)
        if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
            raise ValueError(
                f"[nats] creds: {n.creds} is not a NATS .creds file (user JWT and seed)"
            )
        options["user_credentials"] = str(Path(n.creds).expanduser())
    if n.nkeys_seed:
        _check_user_seed(n.nkeys_seed, _read_setting("nkeys_seed", n.nkeys_seed))
        options["nkeys_seed"] = str(Path(n.nkeys_seed).expanduser())
    if n.tls_ca or n.tls_cert or n.tls_hostname:
        options["tls"] = _tls_context(n)
    if n.tls_hostname:
        options["tls_hostname"] = n.tls_hostname
    if n.inbox_prefix:
        if not _INBOX_PREFIX.fullmatch(n.inbox_prefix):
            raise ValueError(
                "[nats] inbox_prefix: subject tokens of letters, digits, '_', '-' and '$',"
                " separated by '.', no wildcards"
            )
        options["inbox_prefix"] = n.inbox_prefix
    return options


_INBOX_PREFIX = re.compile(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*")


def _read_setting(name: str, path: str) -> str:
    try:
        return Path(path).expanduser().read_text(errors="replace")
    except OSError as exc:
        raise ValueError(f"[nats] {name}: cannot read {path}: {exc.strerror or exc}") from None


def _check_user_seed(path: str, text: str) -> None:
    import nkeys  # nats-py's own dependency for NKeys (the nats-py[nkeys] extra)

    seed = text.strip()
    try:
        nkeys.from_seed(bytearray(seed.encode()))
        valid = seed.startswith("SU")
    except Exception:  # nkeys raises its own errors and binascii's: all mean "not a seed"
        valid = False
    if not valid:
        raise ValueError(f"[nats] nkeys_seed: {path} does not hold an NKey user seed (SU…)")


def _tls_context(n: NatsConfig) -> ssl.SSLContext:
    import ssl  # here: `swarmfly get` loads this module on a path that never needs it

    def no_passphrase() -> str:
        raise ValueError(
            f"[nats] tls_key: {n.tls_key or n.tls_cert} is encrypted; give an unencrypted key"
        )

    try:
        context = ssl.create_default_context(cafile=_expand(n.tls_ca))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"[nats] tls_ca: cannot load {n.tls_ca}: {exc}") from None
    if n.tls_cert:
        try:
            context.load_cert_chain(
                str(Path(n.tls_cert).expanduser()), _expand(n.tls_key), no_passphrase
            )
        except (OSError, ssl.SSLError) as exc:
            which = f"{n.tls_cert} and {n.tls_key}" if n.tls_key else n.tls_cert
            raise ValueError(f"[nats] tls_cert: cannot load {which}: {exc}") from None
    return context


class TokenFile:
    """``[nats] token_file``, which nats-py calls at every connect. The kubelet replaces a
    projected token at 80% of its life; the session the callout granted ends with the old
    one, so a renewed file is the signal to reconnect before then (Bus)."""

    def __init__(self, path: Path) -> None:
        self.path, self.sent = path, ""

    def __call__(self) -> str:
        self.sent = self.read()
        return self.sent

    def read(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError as exc:  # nats-server refuses the empty token; the cause is logged
            log.warning("[nats] token_file: %s: %s", self.path, exc.strerror)
            return ""

    def renewed(self) -> bool:
        current = self.read()
        return bool(current) and current != self.sent


def _expand(path: str | None) -> str | None:
    return str(Path(path).expanduser()) if path else None


DERIVED = frozenset({"tracing"})
"""Fields no file, variable or flag sets: tracing follows the standard ``OTEL_*`` variables."""
FILE_ONLY = frozenset({"plugins"})
"""Fields only the file sets: a plugin's table of its own settings."""

OTHER_VARIABLES = frozenset({"SWARMFLY_CONFIG", "SWARMFLY_REQUIRE_E2E", "SWARMFLY_SCREENSHOT_DIR"})
"""``SWARMFLY_*`` variables that are not settings: the file's path, and the test suite's."""


def setting_names() -> set[str]:
    """Every ``SWARMFLY_*`` variable the configuration reads (deployment files are checked
    against it)."""
    names = set()
    defaults = Config(state_dir=Path())  # one, of any state dir: only its sections are read
    for section in fields(Config):
        default = getattr(defaults, section.name)
        if dataclasses.is_dataclass(default):
            names |= {f"SWARMFLY_{section.name}_{f.name}".upper() for f in fields(default)}
        elif section.name not in DERIVED | FILE_ONLY:
            names.add(f"SWARMFLY_{section.name}".upper())
    return names


MIN_RATE = 128 * 1024
"""The slowest download rate a request or setting may give (bytes/s; 0 is no limit): twice
the rate a parent requires a child to read a piece at (``ratelimit.MIN_SEND_RATE``), so one
piece in flight is never cut off. Below it a piece takes hours; a lower figure is a mistake
(a unit left off), not a limit anyone means."""
_SIZE_FIELDS = {"upload_rate", "download_rate", "cache_quota"}
_AT_LEAST_ONE = {
    "upload_slots",
    "concurrency",
    "per_parent",
    "candidate_parents",
    "partitions",
    "origin_concurrency",
    "copies",
    "handover_concurrency",
    "max_connections",
    "max_per_address",
}
_POSITIVE = {
    "lease",
    "renew_interval",
    "heartbeat_interval",
    "host_ttl",
    "piece_timeout",
    "header_timeout",
    "idle_timeout",
    "gc_interval",
}
"""Seconds that must pass for anything to happen: 0 would spin, or expire everything at once."""
_SHARES = {"cache_high", "cache_low", "disk_high", "disk_low"}
_PORTS = {"upload_port", "http_port", "port"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_FLAGS = {
    ("nats", "servers"): "--nats",
    ("proxy", "listen"): "--proxy-listen",
    ("proxy", "port"): "--proxy-port",
    ("proxy", "registries"): "--registry",
    ("proxy", "enabled"): "--no-proxy",
}
"""The CLI's flags whose names are not the setting's own (``--upload-port``)."""


@dataclass(frozen=True)
class _Source:
    """Where values come from, so an error names the setting as its user wrote it: a file's
    ``[section] key``, the variable, or the flag."""

    kind: str
    """``file``, ``environment`` or ``flags``."""
    path: str = ""

    @property
    def text(self) -> bool:
        """Values arrive as strings (a variable; a flag's words) rather than TOML's types."""
        return self.kind != "file"

    def name(self, section: str | None, key: str) -> str:
        if self.kind == "environment":
            return "SWARMFLY_" + (f"{section}_{key}" if section else key).upper()
        if self.kind == "flags":
            return _FLAGS.get((section or "", key), "--" + key.replace("_", "-"))
        return f"{self.path}: " + (f"[{section}] {key}" if section else key)


def _number(kind: str, value: Any, text: bool) -> int | float:
    """``value`` as the int or float a field holds; ValueError in words otherwise."""
    whole = kind.startswith("int")
    if text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value) if whole else float(value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int or (isinstance(value, float) and not whole):
        return cast(int | float, value)
    raise ValueError(f"expected {'a whole number' if whole else 'a number'}, got {value!r}")


def _checked(key: str, value: int | float) -> int | float:
    """Ranges a setting must be in to mean anything."""
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    if key in _AT_LEAST_ONE and value < 1:
        raise ValueError(f"must be at least 1, got {value!r}")
    if key in _POSITIVE and value <= 0:
        raise ValueError(f"must be above 0 seconds, got {value!r}")
    if key in _SHARES and not 0 <= value <= 1:
        raise ValueError(f"must be a share between 0 and 1, got {value!r}")
    if key in _PORTS and not 0 <= value <= 65535:
        raise ValueError(f"must be a port from 0 to 65535, got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if key == "download_rate" and 0 < value < MIN_RATE:
        raise ValueError(f"must be 0 (no limit) or at least {MIN_RATE // 1024}KiB, got {value!r}")
    return value


def _coerce(kind: Any, value: Any, key: str, text: bool) -> Any:
    """``value`` as the field's type, or ValueError saying what was expected: a wrong type
    is never taken for something else (``acyclic = "maybe"`` is not false)."""
    kind = str(kind)
    if key in _SIZE_FIELDS:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a size such as 8MiB or a number of bytes, got {value!r}")
        return _checked(key, parse_size(value))
    if kind.startswith("list"):
        if text and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"expected a list of strings, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if kind in ("int", "int | None", "float"):
        return _checked(key, _number(kind, value, text))
    if kind == "Path":
        if isinstance(value, str | Path):
            return Path(value).expanduser()
        raise ValueError(f"expected a path, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _apply(
    target: Any, values: Mapping[str, Any], source: _Source, section: str | None = None
) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        if section is None and key in DERIVED:
            raise ValueError(
                f"{source.name(section, key)}: not a setting; the standard OTEL_* variables"
                " (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT) turn tracing on"
            )
        if key not in known:
            where = (
                f"flags: {f'[{section}] ' if section else ''}{key}"  # a caller's mistake
                if source.kind == "flags"
                else source.name(section, key)
            )
            raise ValueError(f"{where}: unknown setting{_guess(key, known)}")
        current = getattr(target, key)
        if section is None and key in FILE_ONLY:
            setattr(target, key, _plugin_tables(value, source))
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"{source.path or source.kind}: [{key}] must be a table")
            _apply(current, value, source, key)
        elif value is not None:
            try:
                coerced = _coerce(known[key].type, value, key, source.text)
                check = _VALUES.get((section, key))
                setattr(target, key, coerced if check is None else check(coerced))
            except ValueError as exc:
                raise ValueError(f"{source.name(section, key)}: {exc}") from None


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(
            f"expected {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}, got {value!r}"
        )
    return level


def _nats_servers(urls: list[str]) -> list[str]:
    """The URLs with their schemes checked: nats-py would take ``foo://bar`` for a host named
    ``foo`` and retry it until the deadline. The scheme alone is named: a URL may hold a
    password."""
    checked = []
    for url in urls:
        scheme, sep, rest = url.partition("://")
        if sep and scheme.lower() not in NATS_SCHEMES:
            raise ValueError(
                f"unknown scheme {scheme + sep!r}; a NATS URL starts with"
                f" {', '.join(s + '://' for s in NATS_SCHEMES[:-1])} or {NATS_SCHEMES[-1]}://"
            )
        checked.append(f"{scheme.lower()}://{rest}" if sep else url)
    return checked


_VALUES: dict[tuple[str | None, str], Callable[[Any], Any]] = {
    (None, "log_level"): _log_level,
    ("nats", "servers"): _nats_servers,
}
"""Settings whose values are checked beyond their type, by section (None: the top level)."""


def _plugin_tables(value: Any, source: _Source) -> dict[str, dict[str, Any]]:
    where = f"{source.path or source.kind}: [plugins]"
    if source.kind != "file":
        raise ValueError(f"{where}: plugin settings are set in the configuration file only")
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(table, Mapping) for name, table in value.items()
    ):
        raise ValueError(f"{where} must hold one table per plugin: [plugins.<name>]")
    return {name: dict(table) for name, table in value.items()}


def settings_of(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """An instance of the dataclass ``cls`` from a table of settings, each value checked
    against its field's type as swarmfly's own are (bool, int, float, str, list of str, Path;
    no value taken for another type); unknown keys and wrong types are ValueErrors naming
    ``where`` and the key. Fields left out keep their defaults."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    known = {f.name: f for f in fields(cls) if f.init}
    given: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where} {key}: unknown setting{_guess(key, known)}")
        kind = known[key].type  # a string under ``from __future__ import annotations``
        try:
            given[key] = _coerce(getattr(kind, "__name__", kind), value, key, text=False)
        except ValueError as exc:
            raise ValueError(f"{where} {key}: {exc}") from None
    try:
        return cls(**given)
    except TypeError as exc:  # a field without a default was left out
        raise ValueError(f"{where}: {exc}") from None


def _guess(word: str, choices: Iterable[str], cutoff: float = 0.65, prefix: str = "") -> str:
    """A close setting, as a hint: of the three closest, one of as many words first.
    ``prefix``, common to the word and every choice, is left out of the comparison: beside
    ``SWARMFLY_`` any two names look alike."""
    word = word.removeprefix(prefix)
    bare = [c.removeprefix(prefix) for c in choices]
    import difflib

    close = difflib.get_close_matches(word, bare, n=3, cutoff=cutoff)
    words = word.count("_")
    close.sort(key=lambda name: name.count("_") != words)  # stable: closeness otherwise
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _check_together(config: Config) -> None:
    """Settings that only make sense together."""
    for name in ("peer", "storage"):
        node = getattr(config, name)
        if node.cache_low > node.cache_high:
            raise ValueError(
                f"[{name}] cache_low ({node.cache_low}) is above cache_high ({node.cache_high})"
            )
        if node.disk_high and node.disk_low > node.disk_high:
            raise ValueError(
                f"[{name}] disk_low ({node.disk_low}) is above disk_high ({node.disk_high})"
            )


SECTIONS = ("nats", "scheduler", "peer", "storage", "proxy", "http", "origins", "callout")


def _from_env(env: Mapping[str, str], warn: Callable[[str], None]) -> dict[str, Any]:
    """SWARMFLY_STATE_DIR, SWARMFLY_NATS_SERVERS, SWARMFLY_PEER_UPLOAD_RATE, ...; a variable
    that is none of them (``SWARMFLY_PEERS_CONCURRENCY``) is warned about, not ignored."""
    out: dict[str, Any] = {}
    names = setting_names()
    for name, value in sorted(env.items()):
        if not name.startswith("SWARMFLY_") or name in OTHER_VARIABLES:
            continue
        if name not in names:
            hint = _guess(name, names, 0.75, prefix="SWARMFLY_")
            warn(f"{name} is not a swarmfly setting{hint}: ignored")
            continue
        key = name.removeprefix("SWARMFLY_").lower()
        section, _, rest = key.partition("_")
        if section in SECTIONS:
            out.setdefault(section, {})[rest] = value
        else:
            out[key] = value
    return out


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Config:
    """Build the configuration; ``flags`` is nested like the TOML file, None values ignored.
    A value that cannot work is a ValueError naming the setting where it was given; a
    ``SWARMFLY_*`` variable that is no setting goes to ``warn`` (default: the log), one line
    each."""
    env = os.environ if env is None else env
    env_values = _from_env(env, warn or _log_warning)
    flag_values = dict(flags or {})
    state_dir = flag_values.get("state_dir") or env_values.get("state_dir")
    config = Config(state_dir=Path(state_dir).expanduser()) if state_dir else Config()
    path = config_file or env.get("SWARMFLY_CONFIG")
    candidate = Path(path) if path else config.state_dir / "swarmfly.toml"
    if path or candidate.is_file():
        _apply(config, _read_file(candidate), _Source("file", str(candidate)))
    _apply(config, env_values, _Source("environment"))
    config.tracing = _tracing(env)
    _apply(config, flag_values, _Source("flags"))
    _check_together(config)
    return config


def _tracing(env: Mapping[str, str]) -> Tracing | None:
    """On when the OTEL_* variables ask for an exporter, unless OTEL_SDK_DISABLED."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "")
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if exporter.lower() in ("", "none") and not endpoint:
        return None
    names = tuple(n.strip().lower() for n in (exporter or "otlp").split(",") if n.strip())
    return Tracing(
        exporters=names or ("otlp",),
        service_name=env.get("OTEL_SERVICE_NAME") or None,
        protocol=env.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        ),
    )


def _log_warning(message: str) -> None:
    log.warning("%s", message)


def _read_file(path: Path) -> dict[str, Any]:
    """The TOML file's tables; ValueError naming the file when it is missing or not TOML.
    PermissionError goes on as it is: the CLI tells a user behind a 0700 state dir what to
    do about it."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except PermissionError:
        raise
    except OSError as exc:
        raise ValueError(f"configuration file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"configuration file {path} is not valid TOML: {exc}") from None
