"""core.paths' atomic writes: what a block that succeeds or raises leaves at the destination and beside it."""
import pytest

from core.paths import atomic_file, atomic_folder, write_atomic


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_folder_puts_the_whole_folder_in_place_or_nothing(tmp_path):
    dest = tmp_path / "deep" / "out"
    with atomic_folder(dest) as tmp:                                  # parents made, a hidden sibling
        assert tmp.parent == dest.parent and tmp.name.startswith(".out.tmp-") and not dest.exists()
        (tmp / "a").write_text("1")
    assert names(dest) == ["a"] and names(dest.parent) == ["out"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(dest, replace=True) as tmp:
            (tmp / "b").write_text("2")
            raise KeyboardInterrupt
    assert names(dest) == ["a"] and names(dest.parent) == ["out"]   # the old folder, no temporary one


def test_atomic_folder_replaces_refuses_or_keeps_an_existing_folder(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("0")
    with pytest.raises(OSError):                                      # not asked to replace: the rename fails
        with atomic_folder(dest) as tmp:
            (tmp / "new").write_text("1")
    assert names(dest) == ["old"] and names(tmp_path) == ["out"]
    with atomic_folder(dest, keep=lambda d: (d / "old").is_file()) as tmp:   # complete already: kept
        (tmp / "new").write_text("1")
    assert names(dest) == ["old"] and names(tmp_path) == ["out"]
    with atomic_folder(dest, replace=True) as tmp:
        (tmp / "new").write_text("1")
    assert names(dest) == ["new"] and names(tmp_path) == ["out"]


def test_atomic_file_renames_on_success_and_removes_on_failure(tmp_path):
    dest = tmp_path / "x.safetensors"
    with atomic_file(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.safetensors.tmp-")
        tmp.write_bytes(b"one")
    with pytest.raises(ValueError):
        with atomic_file(dest) as tmp:
            tmp.write_bytes(b"two")
            raise ValueError
    assert dest.read_bytes() == b"one" and names(tmp_path) == ["x.safetensors"]
    write_atomic(tmp_path / "y.json", "{}")
    assert (tmp_path / "y.json").read_text() == "{}" and names(tmp_path) == ["x.safetensors", "y.json"]
