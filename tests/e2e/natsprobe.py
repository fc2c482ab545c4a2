"""What a NATS server lets one identity do, asked from inside a host's namespace.

``python -m tests.e2e.natsprobe [--seed FILE --inbox PREFIX] URL SUBJECT...`` connects
with that NKey seed and inbox prefix (none: anonymously), subscribes to each subject, and
prints one JSON line: ``{"connected": bool, "error": str | null, "refused": {subject:
bool}}`` — ``refused`` is whether the server answered the subscription with a permissions
violation (nats-py reports it to the error callback; the connection stays up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import nats

from tests.e2e.netns import ROOT, Host, run

PATIENCE = 2
"""Seconds a refusal has to arrive after the subscriptions were flushed (one round trip)."""


def violation(subject: str) -> str:
    """How nats-py words the server's refusal of a subscription (lower case)."""
    return f'permissions violation for subscription to "{subject.lower()}"'


async def probe(url: str, seed: str | None, inbox: str | None, subjects: list[str]) -> Any:
    errors: list[str] = []
    arrived = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())
        arrived.set()

    options: dict[str, Any] = {}
    if seed:
        options["nkeys_seed"] = seed
    if inbox:
        options["inbox_prefix"] = inbox
    try:
        nc = await nats.connect(
            url,
            name="swarmfly-probe",
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=3,
            **options,
        )
    except Exception as exc:  # the server's -ERR on CONNECT, e.g. Authorization Violation
        return {"connected": False, "error": str(exc), "refused": {}}
    try:
        for subject in subjects:
            await nc.subscribe(subject)
        await nc.flush(timeout=PATIENCE)
        # Wait for every refusal, or the patience: a subject the server accepts never gets
        # one (the -ERR comes before the flush's PONG, so this waits only for its callback).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        while not all(any(violation(s) in e for e in errors) for s in subjects):
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
        await nc.flush(timeout=PATIENCE)
        refused = {s: any(violation(s) in e for e in errors) for s in subjects}
        return {"connected": nc.is_connected, "error": None, "refused": refused}
    finally:
        await nc.close()


def probe_from(
    host: Host, url: str, subjects: list[str], seed: Path | None = None, inbox: str | None = None
) -> dict[str, Any]:
    """Run the probe on ``host`` (in its namespace) and return what it printed."""
    identity = ["--seed", str(seed), "--inbox", inbox or ""] if seed else []
    command = host.wrap(sys.executable, "-m", "tests.e2e.natsprobe", *identity, url, *subjects)
    out = run(*command, cwd=ROOT)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.natsprobe")
    parser.add_argument("url")
    parser.add_argument("--seed", help="NKey user seed file (default: connect anonymously)")
    parser.add_argument("--inbox", help="inbox prefix of the identity")
    parser.add_argument("subject", nargs="*")
    args = parser.parse_args()
    result = asyncio.run(probe(args.url, args.seed, args.inbox or None, args.subject))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
