"""Which listed names `get --recursive` writes where: every class of name an origin could send
to leave the output directory is refused, with words that say which name and why."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from swarmfly import cli
from swarmfly.errors import SwarmflyError
from swarmfly.get.layout import plan, safe_path
from swarmfly.plugintypes import SourceEntry


def entries(*paths: str) -> list[SourceEntry]:
    return [SourceEntry(p, f"s3://b/{p}", size=1) for p in paths]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../escape", "'..' would climb out of the directory"),
        ("a/../../escape", "'..' would climb out of the directory"),
        ("/etc/passwd", "an absolute path"),
        ("a\\..\\b", "a backslash"),
        ("a\x00b", "a NUL byte"),
        ("a\nb", "a control character"),
        ("a//b", "an empty or '.' part"),
        ("./a", "an empty or '.' part"),
        ("", "an empty name"),
        ("x" * 256, "a part longer than 255 bytes"),
        ("é" * 128, "a part longer than 255 bytes"),  # 256 bytes in UTF-8
    ],
)
def test_a_name_that_could_leave_the_directory_is_refused(name: str, words: str) -> None:
    with pytest.raises(SwarmflyError, match="refusing the listing") as raised:
        plan(entries("good.bin", name), (), 100)
    assert raised.value.code == "bad_request"
    assert words in raised.value.message
    assert repr(name)[:40] in raised.value.message


def test_names_that_become_one_path_or_a_file_and_a_folder_are_refused() -> None:
    composed, decomposed = "caf\u00e9.txt", "cafe\u0301.txt"
    with pytest.raises(SwarmflyError, match="is the same path as"):
        plan(entries(composed, decomposed), (), 100)
    with pytest.raises(SwarmflyError, match=r"below 'a', a file"):
        plan(entries("a", "a/b"), (), 100)
    with pytest.raises(SwarmflyError, match=r"below 'a', a file"):
        plan(entries("a/b", "a"), (), 100)  # listed in either order


def test_more_files_than_max_files_is_refused_not_cut_short() -> None:
    listed = entries(*(f"f{i}" for i in range(11)))
    with pytest.raises(SwarmflyError, match=r"11 files, more than --max-files 10") as raised:
        plan(listed, (), 10)
    assert raised.value.code == "bad_request"
    assert len(plan(listed, (), 11)) == 11


def test_include_globs_select_by_the_path_below_the_url() -> None:
    listed = entries("config.json", "sub/tokenizer.json", "model.safetensors", "README.md")
    chosen = plan(listed, ("*.json", "*.safetensors"), 3)
    assert [p.path for p in chosen] == [
        PurePosixPath("config.json"),
        PurePosixPath("model.safetensors"),
        PurePosixPath("sub/tokenizer.json"),
    ]
    with pytest.raises(SwarmflyError, match="no file matching --include") as raised:
        plan(listed, ("*.bin",), 10)
    assert raised.value.code == "not_found"
    # A bad name that --include leaves out is never written, so it does not matter.
    assert len(plan(entries("ok.bin", "../x.txt"), ("*.bin",), 10)) == 1


def test_a_good_name_is_kept_as_its_layout() -> None:
    assert safe_path("a b/c%3F/d.bin") == PurePosixPath("a b", "c%3F", "d.bin")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["http://x/f", "-O", "f", "--include", "*.bin"], "--include needs -r/--recursive"),
        (["-r", "s3://b/p/", "-O", "d", "--digest", "sha256:" + "0" * 64], "--digest names one"),
        (["-r", "s3://b/p/", "-O", "d", "--max-files", "0"], "--max-files: '0': give 1 or more"),
        (["-r", "s3://b/p/", "-O", "d", "--max-files", "100001"], "--max-files takes at most"),
        (["-r", "s3://b/p/", "-O", "d", "--jobs", "65"], "--jobs at most 64"),
    ],
)
def test_flags_that_cannot_go_with_a_recursive_get_are_usage_errors(
    args: list[str], words: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = cli.main(["get", *args, "--state-dir", str(tmp_path), "--connect-timeout", "1"])
    assert code == 2
    assert words in capsys.readouterr().err
