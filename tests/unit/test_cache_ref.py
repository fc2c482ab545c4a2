"""`swarmfly cache`'s words: TTLs, the ids the commands take, and the task of a reference,
which no URL's task can be (DESIGN §9: a digest alone reaches no origin's content)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from swarmfly.cache import ask, cache_task_id, digest_of, parse_id, parse_ttl, reference
from swarmfly.errors import SwarmflyError
from swarmfly.ids import task_id
from swarmfly.localproto import line

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("1h", 3600.0), ("7d", 604800.0),
     ("1.5h", 5400.0), ("365d", 365 * 86400.0), (" 2H ", 7200.0)],
)  # fmt: skip
def test_ttls_take_the_units_a_user_writes(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    ("text", "words"),
    [("", "not a duration"), ("soon", "not a duration"), ("-1h", "not a duration"),
     ("1w", "not a duration"), ("0s", "from 1s to 365d"), ("0.5", "from 1s to 365d"),
     ("366d", "from 1s to 365d"), ("1e9", "not a duration")],
)  # fmt: skip
def test_bad_ttls_are_refused_in_words(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_ttl(text)


def test_ids_are_a_digest_a_reference_or_a_task_id() -> None:
    assert parse_id(DIGEST) == {"digest": DIGEST}
    assert parse_id(DIGEST.upper().replace("SHA256", "sha256")) == {"digest": DIGEST}
    assert parse_id(reference(DIGEST)) == {"digest": DIGEST}
    assert parse_id("cd" * 32) == {"task_id": "cd" * 32}
    for bad in ("sha256:abc", "swarmfly:sha256:" + "g" * 64, "swarmfly:" + "ab" * 32, "x", ""):
        with pytest.raises(SwarmflyError, match="no cache") as refused:
            parse_id(bad)
        assert refused.value.code == "bad_request"


def test_a_reference_is_its_own_task() -> None:
    assert reference(DIGEST) == f"swarmfly:{DIGEST}"
    assert digest_of(reference(DIGEST)) == DIGEST
    tid = cache_task_id(DIGEST)
    assert tid == task_id(reference(DIGEST), digest=DIGEST)
    # Not the task of any URL naming the digest, nor of the digest shared across URLs.
    assert tid != task_id("https://example.com/f", digest=DIGEST)
    assert tid != task_id("https://r.example.com/v2/a/blobs/" + DIGEST, digest=DIGEST, shared=True)


def test_the_cache_commands_parse_as_documented() -> None:
    from swarmfly.cli import build_parser

    args = build_parser().parse_args(["cache", "import", "f.bin", "--ttl", "30m"])
    assert (args.ttl, args.replicas, args.connect_timeout, args.json) == (1800.0, 1, 10.0, False)
    args = build_parser().parse_args(["cache", "export", DIGEST, "-O", "out", "--no-progress"])
    assert (args.id, args.output, args.no_progress) == (DIGEST, "out", True)
    for what in ("stat", "rm"):
        assert build_parser().parse_args(["cache", what, DIGEST, "--json"]).json is True


def test_a_peer_that_refuses_before_reading_the_request_is_heard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer may answer (an empty file, say) and hang up before the request is all sent:
    the user reads the peer's reason, not the broken pipe of the write."""
    path = str(tmp_path / "peer.sock")
    answered = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)

        def refuse() -> None:
            conn, _ = server.accept()
            refusal = SwarmflyError("bad_request", "empty.bin is empty: nothing to import")
            conn.sendall(line(refusal.to_dict()))
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            answered.set()

        thread = threading.Thread(target=refuse)
        thread.start()
        real_send_fds = socket.send_fds

        def send_fds_late(*args: Any, **kwargs: Any) -> int:
            assert answered.wait(5)
            return real_send_fds(*args, **kwargs)

        monkeypatch.setattr(socket, "send_fds", send_fds_late)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            with pytest.raises(SwarmflyError) as raised:
                ask(path, {"op": "import"}, fd, 5.0)
        finally:
            os.close(fd)
            thread.join()
    assert (raised.value.code, raised.value.message) == (
        "bad_request",
        "empty.bin is empty: nothing to import",
    )
