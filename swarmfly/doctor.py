"""`swarmfly doctor`: is it working on this host? One command for the question Dragonfly's,
Spegel's and Kraken's users ask most.

It checks, in the order a pull depends on them: the container runtimes' configuration
(whatever is installed) points at this host's mirror, the mirror answers, NATS and the
schedulers answer, this peer's upload server answers at the address other hosts are given,
other peers reach it there (asked to probe it: ``peer.{host_id}.reach``), and a probe pulled
through the swarm arrives, with its bytes from the origin against those from peers. Each
check is ok, warn, fail or skip; any fail is the verdict ``problems`` and exit status
``EXIT_PROBLEMS``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import time
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from swarmfly.config import Config
from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.httpheaders import http_url
from swarmfly.nodeinit import REGISTRY_TABLES, dotted

Status = Literal["ok", "warn", "fail", "skip"]
EXIT_PROBLEMS = 7
"""Exit status when a check failed: apart from every error code's (README, "Exit codes")."""
HTTP_TIMEOUT = 5.0
"""Seconds an HTTP check waits: each answers at once when it works."""
REACH_ASKED = 3
"""Other peers asked to probe this host's upload server: enough to tell one host's firewall
from this host's, few enough that a doctor run is no load."""
REACH_TIMEOUT = 3.0
"""Seconds each of them may take for its probe (``peer.{host_id}.reach``)."""
REACH_WAIT = 8.0
"""Seconds the doctor waits for their answers: the probe, their scheduler look-up, NATS."""
DEFAULT_CERTS = "/etc/containerd/certs.d"


@dataclass(frozen=True)
class Paths:
    """The runtime configuration files looked at; flags move them (tests use temp dirs)."""

    containerd: Path = Path("/etc/containerd/config.toml")
    crio: Path = Path("/etc/containers/registries.conf")
    docker: Path = Path("/etc/docker/daemon.json")
    k3s: Path = Path("/etc/rancher/k3s/registries.yaml")
    crio_dir: Path = Path("/etc/crio")
    """CRI-O's own configuration (crio.conf, crio.conf.d): registries.conf alone is no sign
    of CRI-O, since podman, skopeo and buildah read it too."""


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    details: dict[str, Any] = field(default_factory=dict)


# -- the runtimes' configuration (files only: no daemon is asked) --------------------------


def host_port(url: str) -> tuple[str, int] | None:
    """``host, port`` of a URL or of a bare ``host:port`` (CRI-O's locations have no scheme)."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    scheme = parts.scheme or "http"
    return parts.hostname, port or (443 if scheme == "https" else 80)


def _same(url: str, mirror: str) -> bool:
    ours = host_port(mirror)
    return ours is not None and host_port(url) == ours


def check_containerd(path: Path, mirror: str) -> Check:
    """containerd reads ``hosts.toml`` only where ``config_path`` points (the classic mistake
    is a hosts.toml written and config_path never set); the mirror must be a ``[host]`` of
    ``_default`` or of the registries pulled."""
    if not path.is_file():
        return Check("containerd", "skip", f"{path} absent: containerd is not configured here")
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return Check("containerd", "fail", f"cannot read {path}: {exc}")
    # The CRI registry table of the file's version, as node init finds it (no version: 1).
    version = document.get("version", 1)
    keys = REGISTRY_TABLES.get(version if isinstance(version, int) else 2, REGISTRY_TABLES[2])
    registry: Any = document
    for key in keys:
        registry = registry.get(key, {}) if isinstance(registry, Mapping) else {}
    where = f"[{dotted(keys)}]"
    config_path = registry.get("config_path") if isinstance(registry, Mapping) else None
    if not config_path:
        return Check(
            "containerd",
            "fail",
            f"{path}: config_path is not set in {where}, so containerd reads no hosts.toml"
            f' and pulls bypass the mirror; set config_path = "{DEFAULT_CERTS}"',
        )
    if registry.get("mirrors"):
        return Check(
            "containerd",
            "fail",
            f"{path}: [{dotted(keys)}.mirrors] is set beside config_path, which containerd's CRI"
            " plugin refuses: it does not load, and no pod starts; move the mirrors to"
            f" hosts.toml files under {str(config_path).split(':')[0]}",
        )
    found: list[str] = []
    for folder in str(config_path).split(":"):
        for hosts in sorted(Path(folder).glob("*/hosts.toml")):
            try:
                hosts_table = tomllib.loads(hosts.read_text()).get("host", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                return Check("containerd", "fail", f"cannot read {hosts}: {exc}")
            if any(_same(url, mirror) for url in hosts_table):
                found.append(hosts.parent.name)
    details = {"config_path": str(config_path), "registries": found}
    if not found:
        return Check(
            "containerd",
            "fail",
            f"no hosts.toml under {config_path} names the mirror {mirror}"
            f' (add [host."{mirror}"] to {config_path.split(":")[0]}/_default/hosts.toml)',
            details,
        )
    which = "every registry" if "_default" in found else ", ".join(found)
    return Check(
        "containerd", "ok", f"config_path {config_path}: the mirror serves {which}", details
    )


def crio_installed(crio_dir: Path, env: Mapping[str, str]) -> bool:
    """CRI-O's configuration directory, or its binary on ``PATH``."""
    return crio_dir.is_dir() or shutil.which("crio", path=env.get("PATH", "")) is not None


def check_crio(
    path: Path, mirror: str, installed: bool = True, crio_dir: Path = Paths.crio_dir
) -> Check:
    """``installed``: CRI-O is here (``crio_installed`` looked at ``crio_dir``); else
    registries.conf is another tool's, and no runtime of this host reads it."""
    if not path.is_file():
        return Check("cri-o", "skip", f"{path} absent")
    if not installed:
        return Check(
            "cri-o",
            "skip",
            f"CRI-O is not installed (no {crio_dir}, no crio on PATH): {path} is for podman,"
            " skopeo or buildah",
        )
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return Check("cri-o", "fail", f"cannot read {path}: {exc}")
    mirrored = [
        str(registry.get("prefix") or registry.get("location") or "?")
        for registry in document.get("registry", [])
        if any(_same(str(m.get("location", "")), mirror) for m in registry.get("mirror", []))
    ]
    if not mirrored:
        return Check("cri-o", "warn", f"{path}: no [[registry.mirror]] is the mirror {mirror}")
    return Check("cri-o", "ok", f"{path}: the mirror serves {', '.join(mirrored)}")


def check_docker(path: Path, mirror: str) -> Check:
    """Docker uses ``registry-mirrors`` for Docker Hub only; a daemon proxy must leave the
    mirror out (``no-proxy``), or Docker asks the proxy for it."""
    if not path.is_file():
        return Check("docker", "skip", f"{path} absent")
    try:
        document = json.loads(path.read_text() or "{}")
    except (OSError, ValueError) as exc:
        return Check("docker", "fail", f"cannot read {path}: {exc}")
    if not any(_same(str(url), mirror) for url in document.get("registry-mirrors", [])):
        return Check("docker", "warn", f"{path}: registry-mirrors does not name {mirror}")
    proxies = document.get("proxies", {})
    proxy = proxies.get("https-proxy") or proxies.get("http-proxy")
    if proxy and not _bypassed(mirror, str(proxies.get("no-proxy", ""))):
        return Check(
            "docker", "fail", f"{path}: the daemon asks {proxy} for the mirror; add it to no-proxy"
        )
    return Check("docker", "ok", f"{path}: registry-mirrors has the mirror (Docker Hub pulls)")


def check_k3s(path: Path, mirror: str) -> Check:
    """By text: the mirror's URL under ``mirrors:`` (no YAML parser at run time)."""
    if not path.is_file():
        return Check("k3s", "skip", f"{path} absent")
    try:
        text = path.read_text()
    except OSError as exc:
        return Check("k3s", "fail", f"cannot read {path}: {exc.strerror}")
    if "mirrors:" in text and mirror.rstrip("/") in text:
        return Check("k3s", "ok", f"{path}: a mirror endpoint is {mirror}")
    return Check("k3s", "warn", f"{path}: no mirrors endpoint is {mirror}")


def _bypassed(mirror: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (curl's and Go's syntax) leaves the mirror's host out."""
    where = host_port(mirror)
    if where is None:
        return False
    host = where[0]
    for entry in (e.strip() for e in no_proxy.split(",")):
        name = entry.lstrip(".").split(":")[0]
        if entry == "*" or (name and (host == name or host.endswith("." + name))):
            return True
    return False


def check_proxy_env(env: Mapping[str, str], mirror: str) -> Check:
    """HTTP_PROXY without the mirror in NO_PROXY sends clients' mirror requests to the proxy
    (the runtimes' systemd units often carry these variables too)."""
    proxy = next(
        (env[n] for n in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy") if env.get(n)),
        None,
    )
    if proxy is None:
        return Check("proxy-env", "skip", "no HTTP(S)_PROXY set")
    if _bypassed(mirror, env.get("NO_PROXY", env.get("no_proxy", ""))):
        return Check("proxy-env", "ok", "NO_PROXY leaves the mirror out of the HTTP proxy")
    return Check(
        "proxy-env",
        "warn",
        f"HTTP(S)_PROXY is {proxy} and NO_PROXY does not name the mirror's host: clients with"
        " these variables reach the mirror through that proxy",
    )


def runtime_checks(paths: Paths, mirror: str, env: Mapping[str, str]) -> list[Check]:
    checks = [
        check_containerd(paths.containerd, mirror),
        check_crio(paths.crio, mirror, crio_installed(paths.crio_dir, env), paths.crio_dir),
        check_docker(paths.docker, mirror),
        check_k3s(paths.k3s, mirror),
    ]
    present = [c for c in checks if c.status != "skip"]
    if not present:
        checks.append(
            Check("runtimes", "skip", "no container runtime configuration here (files only)")
        )
    elif not any(c.status == "ok" for c in present):
        names = ", ".join(c.name for c in present)
        checks.append(
            Check("runtimes", "fail", f"no runtime here pulls through the mirror ({names})")
        )
    return [*checks, check_proxy_env(env, mirror)]


# -- the cluster -----------------------------------------------------------------------------


async def _health(url: str) -> str | None:
    """None when ``url``/healthz says ok; else why not, in words."""
    import aiohttp

    target = f"{url.rstrip('/')}/healthz"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as session,
            session.get(target, allow_redirects=False) as response,
        ):
            body = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return connect_error_in_words(exc, target, seconds=HTTP_TIMEOUT)
    try:
        ok = json.loads(body).get("ok") is True
    except (ValueError, AttributeError):
        ok = False
    return None if response.status == 200 and ok else f"{target} answered {response.status}"


def _ours(services: list[dict[str, Any]], name: str, host_id: str | None) -> dict[str, Any]:
    """The metadata of service ``name`` of this host."""
    for service in services:
        if service["name"] == name and service["metadata"].get("host_id") == host_id:
            return dict(service["metadata"])
    return {}


async def cluster_checks(
    config: Config, mirror: str | None, within: float
) -> tuple[list[Check], str, str | None]:
    """NATS, schedulers, the mirror and this peer's upload server: the checks, the mirror's
    URL (given, else this host's proxy as discovery lists it, else the configured one) and
    this host's peer id (None: no peer service runs on this state dir)."""
    from swarmfly.cluster import local_peer
    from swarmfly.status import gather

    host_id = local_peer(config.state_dir)
    checks: list[Check] = []
    try:
        status = await gather(config, within=within)
    except SwarmflyError as exc:
        status = None
        checks.append(Check("nats", "fail", exc.message))
    services = status["services"] if status else []
    mirror = mirror or _ours(services, "proxy", host_id).get("url") or _configured(config)
    reason = await _health(mirror)
    checks.insert(
        0,
        Check("mirror", "fail", reason)
        if reason
        else Check("mirror", "ok", f"{mirror} answers", {"url": mirror}),
    )
    if status is None:
        checks += [Check(n, "skip", "needs NATS") for n in ("scheduler", "upload", "reach")]
        return checks, mirror, host_id
    names = sorted({str(s["name"]) for s in services})
    checks.append(
        Check(
            "nats", "ok", f"{len(services)} services answer ({', '.join(names)})", {"names": names}
        )
    )
    problem = status.get("error")
    hosts = {h["id"]: h for h in status["hosts"]}
    checks.append(
        Check("scheduler", "fail", problem)
        if problem
        else Check(
            "scheduler", "ok", f"the schedulers know {status.get('host_count', len(hosts))} hosts"
        )
    )
    if problem:
        checks += [Check(n, "skip", "needs a scheduler") for n in ("upload", "reach")]
    else:
        listed_all = status.get("host_count", len(hosts)) <= len(hosts)
        upload = await _upload_check(config, host_id, hosts, listed_all)
        checks.append(upload)
        checks.append(await reach_check(config, host_id, hosts, services, within))
    return checks, mirror, host_id


def _configured(config: Config) -> str:
    return http_url(config.proxy.listen, config.proxy.port or 65001)


async def _upload_check(
    config: Config, host_id: str | None, hosts: dict[str, dict[str, Any]], known: bool
) -> Check:
    """The upload server answers at the address the schedulers give other hosts, asked from
    here (``reach_check`` asks other hosts). ``known``: the schedulers listed every host, so
    one missing is one they do not hear from."""
    if host_id is None:
        return Check(
            "upload", "skip", f"no peer service runs with the state dir {config.state_dir}"
        )
    host = hosts.get(host_id)
    if host is None:
        return (
            Check(
                "upload",
                "fail",
                f"the schedulers do not know this host {host_id!r}: its heartbeats do not"
                " reach them",
            )
            if known
            else Check("upload", "skip", "the schedulers listed their most recent hosts only")
        )
    reason = await _health(str(host["address"]))
    if reason:
        return Check("upload", "fail", f"this peer's advertised address does not answer: {reason}")
    where = host_port(str(host["address"]))
    reach = (
        "loopback: only this machine reaches it"
        if where is not None and _loopback(where[0])
        else "the address other hosts use"
    )
    return Check("upload", "ok", f"{host['address']} answers ({reach})")


def reach_candidates(
    host_id: str, hosts: dict[str, dict[str, Any]], services: list[dict[str, Any]]
) -> list[str]:
    """Other live peers that can be asked to probe this host: a peer service answers for
    them and the schedulers hear them; the most recently heard first, ``REACH_ASKED``."""
    running = {
        str(s["metadata"].get("host_id"))
        for s in services
        if s["name"] == "peer" and s["metadata"].get("host_id") not in (None, host_id)
    }
    live = sorted(running & set(hosts), key=lambda h: (float(hosts[h].get("seen_s", 0)), h))
    return live[:REACH_ASKED]


async def reach_check(
    config: Config,
    host_id: str | None,
    hosts: dict[str, dict[str, Any]],
    services: list[dict[str, Any]],
    within: float,
) -> Check:
    """Other peers reach this host's upload server: up to ``REACH_ASKED`` of them are asked
    (``peer.{host_id}.reach``) to GET its ``/healthz`` at the address the schedulers list,
    which each looks up itself. ok when one reached it; fail when those that probed could
    not (named, with what each saw); skip without another live peer to ask."""
    if host_id is None or host_id not in hosts:
        return Check("reach", "skip", "needs this host's peer listed by the schedulers")
    asked = reach_candidates(host_id, hosts, services)
    if not asked:
        return Check(
            "reach",
            "skip",
            "no other live peer to ask: whether other hosts reach this upload server is"
            " checked once another peer runs",
        )
    import asyncio  # here: the CLI builds its parser from this module on every command

    from swarmfly.cluster import connect
    from swarmfly.contracts import messages

    try:
        bus = await connect(config, "swarmfly-doctor", within=within)
    except SwarmflyError as exc:
        return Check("reach", "fail", exc.message)
    request = messages.ReachRequest(host_id, timeout_s=REACH_TIMEOUT)
    try:
        answers = await asyncio.gather(
            *(
                bus.request(messages.REACH, request, timeout=REACH_WAIT, host_id=other)
                for other in asked
            ),
            return_exceptions=True,
        )
    finally:
        await bus.close()
    return reach_verdict(hosts[host_id]["address"], asked, answers)


def reach_verdict(address: str, asked: list[str], answers: list[Any]) -> Check:
    """The ``reach`` check of what each asked peer answered: a ``ReachReply``, or the
    SwarmflyError of one that could not probe at all (then it tells nothing of reach)."""
    reached, failed, unasked = [], [], []
    seen: list[dict[str, Any]] = []
    for other, answer in zip(asked, answers, strict=True):
        if isinstance(answer, Exception):  # SwarmflyError, or NATS lost in the meantime
            why = answer.message if isinstance(answer, SwarmflyError) else repr(answer)
            unasked.append(f"{other} could not probe ({why})")
            seen.append({"host_id": other, "ok": None, "error": why})
        elif isinstance(answer, BaseException):
            raise answer
        elif answer.ok:
            reached.append(other)
            seen.append({"host_id": other, "ok": True, "seconds": answer.seconds})
        else:
            failed.append(f"{other}: {answer.error}")
            seen.append({"host_id": other, "ok": False, "error": answer.error})
    details = {"address": address, "asked": seen}
    if reached:
        line = f"{address} is reached from {', '.join(reached)}"
        if failed:
            line += f"; not from {'; '.join(failed)}"
        return Check("reach", "ok", line, details)
    if failed:
        line = f"other hosts cannot reach this upload server at {address}: {'; '.join(failed)}"
        return Check("reach", "fail", line + "".join(f"; {u}" for u in unasked), details)
    line = f"no other peer could probe {address}: {'; '.join(unasked)}"
    return Check("reach", "warn", line, details)


async def probe_check(config: Config, url: str | None, within: float, timeout: float) -> Check:
    """Pull ``url`` as `swarmfly get` does (this host's peer over its socket, else NATS),
    into a temporary file, and say where its bytes came from."""
    if not url:
        return Check("probe", "skip", "give --probe URL to pull a small file through the swarm")
    import tempfile  # here: the CLI builds its parser from this module on every command

    from swarmfly.get import GetRequest, get_async

    with tempfile.TemporaryDirectory(prefix="swarmfly-doctor-") as folder:
        request = GetRequest(url, Path(folder) / "probe", {}, timeout=timeout)
        started = time.monotonic()
        try:
            summary = await get_async(config, request, within=within)
        except TimeoutError:
            return Check("probe", "fail", f"{url}: not pulled in {timeout:g}s")
        except SwarmflyError as exc:
            return Check("probe", "fail", f"{url}: {exc.message}")
    details = {k: summary[k] for k in ("content_length", "bytes_origin", "bytes_p2p", "via")}
    size, origin, p2p = summary["content_length"], summary["bytes_origin"], summary["bytes_p2p"]
    where = (
        "all from this host's cache"
        if origin == 0 and p2p == 0
        else f"{_size(origin)} from the origin, {_size(p2p)} from peers"
    )
    line = f"{_size(size)} in {time.monotonic() - started:.1f}s via {summary['via']}: {where}"
    if summary["via"] == "in-process":
        return Check(
            "probe", "warn", f"no peer service answered; pulled in this process: {line}", details
        )
    if origin == 0 and p2p == 0:  # this host had it: nothing about the swarm was tried
        return Check(
            "probe", "warn", f"{line}; probe a URL this host has not cached to try the swarm",
            details,
        )  # fmt: skip
    return Check("probe", "ok", line, details)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- the report --------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def verdict(self) -> str:
        failed = [c.name for c in self.checks if c.status == "fail"]
        warned = [c.name for c in self.checks if c.status == "warn"]
        passed = sum(c.status == "ok" for c in self.checks)
        ok = f"{passed} check{'' if passed == 1 else 's'} ok"
        if failed:
            return f"problems: {', '.join(failed)} failed ({ok})"
        if warned:
            return f"healthy, with warnings: {', '.join(warned)} ({ok})"
        return f"healthy ({ok})"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "verdict": self.verdict, "checks": [asdict(c) for c in self.checks]}

    def render(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{c.status:<4}  {c.name:<{width}}  {c.message}" for c in self.checks]
        return "\n".join([*lines, f"verdict: {self.verdict}"])


async def diagnose(
    config: Config,
    paths: Paths,
    *,
    mirror: str | None = None,
    probe: str | None = None,
    within: float = 10.0,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> Report:
    """Every check, in the order a pull depends on them; the probe only with NATS up."""
    cluster, mirror_url, _ = await cluster_checks(config, mirror, within)
    checks = [*runtime_checks(paths, mirror_url, os.environ if env is None else env), *cluster]
    if any(c.name == "nats" and c.status == "fail" for c in checks):
        checks.append(Check("probe", "skip", "needs NATS"))
    else:
        checks.append(await probe_check(config, probe, within, timeout))
    return Report(checks)
