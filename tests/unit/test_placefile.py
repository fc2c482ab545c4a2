"""``swarmfly.placefile``: a finished file to its output name, over an existing one only with
``overwrite``, never leaving a partial file at the name."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from swarmfly.errors import SwarmflyError
from swarmfly.placefile import exists_at, place_file


def made(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def test_without_overwrite_a_new_name_gets_the_file_and_an_existing_one_stays(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    place_file(made(tmp_path, ".tmp1", b"new"), str(out), overwrite=False)
    assert out.read_bytes() == b"new"
    with pytest.raises(SwarmflyError, match=r"/out exists \(it appeared during the download\)"):
        place_file(made(tmp_path, ".tmp2", b"newer"), str(out), overwrite=False)
    assert out.read_bytes() == b"new"
    place_file(str(tmp_path / ".tmp2"), str(out), overwrite=True)
    assert out.read_bytes() == b"newer"


def test_in_an_open_folder_the_error_names_the_whole_path(tmp_path: Path) -> None:
    made(tmp_path, "out", b"there")
    made(tmp_path, ".tmp", b"new")
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SwarmflyError, match=f"^bad_request: {tmp_path}/out exists") as refused:
            place_file(".tmp", "out", overwrite=False, folder=folder, shown=str(tmp_path / "out"))
        assert refused.value.code == "bad_request" and refused.value.path == "data.output"
        assert exists_at("out", folder) and not exists_at("none", folder)
    finally:
        os.close(folder)
    assert (tmp_path / "out").read_bytes() == b"there"


def test_a_link_at_the_name_counts_as_there_and_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "target")
    with pytest.raises(SwarmflyError, match="exists"):
        place_file(made(tmp_path, ".tmp", b"new"), str(tmp_path / "out"), overwrite=False)
    assert not (tmp_path / "target").exists()


def test_where_hard_links_are_refused_a_rename_does_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAT and some network filesystems have no hard links: the name is checked, then the
    file renamed (a file made in between those two steps would be replaced)."""

    def no_links(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out"
    place_file(made(tmp_path, ".tmp", b"new"), str(out), overwrite=False)
    assert out.read_bytes() == b"new" and not (tmp_path / ".tmp").exists()
    with pytest.raises(SwarmflyError, match="/out exists: pass --overwrite"):
        place_file(made(tmp_path, ".tmp", b"newer"), str(out), overwrite=False)
    assert out.read_bytes() == b"new"


def test_a_path_that_cannot_be_looked_at_is_not_there(tmp_path: Path) -> None:
    made(tmp_path, "file", b"")
    assert not exists_at(str(tmp_path / "file" / "below"))
