"""Typed wire messages benchmark: what ``from_dict`` and ``to_dict`` cost per message, next to
reading the same fields from the decoded dict (what a handler does without types) and to the
decode and validation the bus pays on every message anyway.

No NATS, no services: bodies of register and reschedule (the contracts' examples), a piece
report of ``--pieces`` pieces (a child's: parent and cost per piece) and a schedule (register's
reply) are decoded once; each operation is then timed on them with ``timeit`` (best of
``--repeat``). ratio_dict: (from_dict + to_dict) / dict access, the price of the types;
ratio_decode: the same over orjson decode + validation (jsonschema-rs, what the bus runs), what
it adds to a message's handling. With fastjsonschema installed (``pip install fastjsonschema``;
not a dependency), ``fastjsonschema_us`` times the same schema with it, for the choice of
validator (``contracts/schema.py``): ratio_validator = fastjsonschema / jsonschema-rs.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import timeit
from collections.abc import Callable
from typing import Any

import orjson
from _common import Out, table

from swarmfly import contracts
from swarmfly.contracts import messages
from swarmfly.contracts.wire import Message

TASK_ID = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


def read_register(b: dict[str, Any]) -> tuple[Any, ...]:
    host, source = b["host"], b["source"]
    return (
        b["task_id"], b["peer_id"], b.get("digests_from"), host["id"], host["ip"], host["port"],
        host["type"], host.get("idc"), host.get("location"), host.get("upload_slots"),
        source["url"], source.get("headers"), source.get("digest"), source.get("piece_length"),
        b.get("pieces"), b.get("task"), b.get("seed"),
    )  # fmt: skip


def read_reschedule(b: dict[str, Any]) -> tuple[Any, ...]:
    bad = [(p["peer_id"], p["reason"]) for p in b.get("bad_parents", ())]
    return b["task_id"], b["peer_id"], b.get("digests_from"), b.get("blocklist"), bad


def read_pieces(b: dict[str, Any]) -> tuple[Any, ...]:
    pieces = [
        (p["number"], p.get("digest"), p.get("parent_id"), p.get("cost_ms")) for p in b["pieces"]
    ]
    lent = [(p["number"], p["peer_id"]) for p in b.get("lent", ())]
    return b["task_id"], b["peer_id"], b.get("digests_from"), b.get("task"), pieces, lent


def read_schedule(b: dict[str, Any]) -> tuple[Any, ...]:
    parents = [(p["peer_id"], p["host_id"], p["address"], p["type"]) for p in b["parents"]]
    task = b.get("task")
    content = (task["content_length"], task["piece_length"], task["piece_count"]) if task else None
    return b["action"], parents, content, b.get("retry_after_ms"), b.get("token")


def example(name: str, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = contracts.get(name).examples[0][kind]
    return body


def pieces_body(count: int) -> dict[str, Any]:
    pieces = [
        {"number": n, "parent_id": f"p{n % 7:024x}", "cost_ms": 80 + n % 50} for n in range(count)
    ]
    return {"task_id": TASK_ID, "peer_id": "pdf52d4a999d78cb670b82ece", "pieces": pieces}


def cases(pieces: int) -> list[tuple[str, str, dict[str, Any], Callable[..., Any]]]:
    """(label, contract, body, plain dict access) per timed body."""
    register = "scheduler.{partition}.register"
    return [
        ("register", register, example(register, "request"), read_register),
        (
            "reschedule",
            "scheduler.{partition}.reschedule",
            example("scheduler.{partition}.reschedule", "request"),
            read_reschedule,
        ),
        (f"pieces x{pieces}", "scheduler.{partition}.pieces", pieces_body(pieces), read_pieces),
        ("schedule (reply)", register, example(register, "reply"), read_schedule),
    ]


def per_call_us(call: Callable[[], object], repeat: int) -> float:
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def measure(pieces: int, repeat: int, out: Out) -> list[dict[str, Any]]:
    rows = []
    for label, name, body, read in cases(pieces):
        out.progress(f"timing {label}")
        rows.append({"body": label, **timings(name, label.endswith("(reply)"), body, read, repeat)})
    return rows


def timings(
    name: str, is_reply: bool, body: dict[str, Any], read: Callable[..., Any], repeat: int
) -> dict[str, Any]:
    contract, subject = contracts.get(name), messages.SUBJECTS[name]
    check = contract.validate_reply if is_reply else contract.validate_request
    assert check is not None
    cls: type[Message] = subject.reply if is_reply else subject.request
    raw = orjson.dumps(body)
    message = cls.from_dict(body)
    assert message.to_dict() == body, f"{name}: the round trip changed the body"
    from_us = per_call_us(lambda: cls.from_dict(body), repeat)
    to_us = per_call_us(message.to_dict, repeat)
    dict_us = per_call_us(lambda: read(body), repeat)
    decode_us = per_call_us(lambda: check(orjson.loads(raw)), repeat)
    compared = _fastjsonschema(contract.reply if is_reply else contract.request)
    if compared is not None:
        compared(body)
        rs_us = per_call_us(lambda: check(body), repeat)
        fj_us = per_call_us(lambda: compared(body), repeat)
        extra = {
            "validate_us": round(rs_us, 3),
            "fastjsonschema_us": round(fj_us, 3),
            "ratio_validator": round(fj_us / rs_us, 2),
        }
    else:
        extra = {}
    return {
        "bytes": len(raw),
        "decode_validate_us": round(decode_us, 3),
        "dict_access_us": round(dict_us, 3),
        "from_dict_us": round(from_us, 3),
        "to_dict_us": round(to_us, 3),
        "ratio_dict": round((from_us + to_us) / dict_us, 2),
        "ratio_decode": round((from_us + to_us) / decode_us, 2),
        **extra,
    }


def _fastjsonschema(schema: dict[str, Any] | None) -> Callable[[Any], Any] | None:
    """The schema compiled by fastjsonschema (as draft-07, the newest it implements), where
    it is installed."""
    try:
        import fastjsonschema  # type: ignore[import-not-found]
    except ImportError:
        return None
    assert schema is not None
    plain = copy.deepcopy(schema)
    plain.pop("$schema", None)
    compiled: Callable[[Any], Any] = fastjsonschema.compile(plain)
    return compiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pieces", type=int, default=64, help="pieces in the report (64)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure, best kept (5)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    out = Out(args.json)
    contracts.warm()
    rows = measure(args.pieces, args.repeat, out)
    headers = list(rows[0])
    out.say(table(headers, [[row[h] for h in headers] for row in rows]))
    out.say(
        "µs per message, best of --repeat; ratio_dict: (from_dict + to_dict) / dict access; "
        "ratio_decode: (from_dict + to_dict) / (orjson decode + schema validation)"
    )
    out.result({"python": sys.version.split()[0], "pieces": args.pieces, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
