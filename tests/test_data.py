"""Tests for the byte data layer: splits, cross-file reads, sampling, resume and errors."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bytelm import DataError
from bytelm.data import ByteDataset, WindowSampler, dataset, default_corpus_files, load_split
from bytelm.data import corpus as corpus_mod


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A directory of 40 small files of varied sizes, plus things that must be skipped."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    for i in range(40):
        size = int(rng.integers(1, 300))
        _write(root / f"sub{i % 3}" / f"f{i:02d}.bin", rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    _write(root / "empty.txt", b"")
    _write(root / ".hidden", b"secret")
    _write(root / ".git" / "objects" / "x", b"git object")
    return root


def _all_bytes(ds: ByteDataset) -> bytes:
    return ds.read(0, len(ds)).tobytes()


def test_dir_split_deterministic_disjoint_and_complete(corpus: Path):
    a_train, a_val, a_text = load_split([corpus], val_fraction=0.2)
    b_train, b_val, b_text = load_split([corpus], val_fraction=0.2)
    assert a_text == b_text
    assert a_train.paths == b_train.paths and a_val.paths == b_val.paths
    assert _all_bytes(a_train) == _all_bytes(b_train) and _all_bytes(a_val) == _all_bytes(b_val)

    expected = {p.resolve() for p in corpus.rglob("*") if p.is_file() and p.stat().st_size > 0
                and not any(part.startswith(".") for part in p.relative_to(corpus).parts)}
    assert len(expected) == 40
    train, val = set(a_train.paths), set(a_val.paths)
    assert not train & val
    assert train | val == expected
    assert len(a_train) + len(a_val) == sum(p.stat().st_size for p in expected)
    # The split is the documented hash rule, not an accident of ordering.
    for p in val:
        assert zlib.crc32(p.relative_to(corpus.resolve()).as_posix().encode()) / 2**32 < 0.2
    assert f"train: {len(train)} files" in a_text and f"val: {len(val)} files" in a_text
    assert "split by file, crc32 of path, 20%" in a_text


def test_dir_split_keeps_one_file_each_side(tmp_path: Path):
    for i in range(3):
        _write(tmp_path / f"{i}.txt", b"abc" * (i + 1))
    for frac in (1e-9, 1 - 1e-9):  # hashing alone would put all files on one side
        train, val, _ = load_split([tmp_path], val_fraction=frac)
        assert train.num_files >= 1 and val.num_files >= 1
        assert train.num_files + val.num_files == 3


def test_several_paths_split_by_file(tmp_path: Path, corpus: Path):
    extra = _write(tmp_path / "extra.txt", b"hello world")
    train, val, text = load_split([corpus, str(extra)], val_fraction=0.2)
    assert set(train.paths) | set(val.paths) >= {extra.resolve()}
    assert train.num_files + val.num_files == 41
    assert "split by file" in text


def test_tail_split_exact(tmp_path: Path):
    content = bytes(range(256)) * 4  # 1024 bytes
    f = _write(tmp_path / "one.bin", content)
    train, val, text = load_split([f], val_fraction=0.25)
    assert _all_bytes(train) == content[:768]
    assert _all_bytes(val) == content[768:]
    assert "split by tail" in text and "768" in text and "256" in text
    # A bare path (not in a list) and a directory holding one file split the same way.
    assert _all_bytes(load_split(str(f), val_fraction=0.25)[1]) == content[768:]
    assert _all_bytes(load_split([tmp_path], val_fraction=0.25)[0]) == content[:768]


def test_large_file_is_memmapped_not_copied(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dataset, "_MMAP_MIN_BYTES", 100)
    f = _write(tmp_path / "big.bin", bytes(1000))
    train, val, _ = load_split([f], val_fraction=0.1)
    # Both halves are views of one mapping of the file, not copies in RAM.
    assert isinstance(train.parts[0], np.memmap) and isinstance(val.parts[0], np.memmap)
    assert (len(train), len(val)) == (900, 100)


@pytest.mark.parametrize("separator", [None, 0, 255])
def test_read_across_file_boundaries(tmp_path: Path, separator):
    contents = [b"\x00\xffabc", b"d", b"efgh\x00", b"\xff" * 7]
    paths = [_write(tmp_path / f"{i}.bin", c) for i, c in enumerate(contents)]
    ds = ByteDataset.from_files(paths, separator=separator)
    joined = (b"" if separator is None else bytes([separator])).join(contents)
    assert len(ds) == len(joined) and ds.num_files == 4
    for start in range(len(joined)):
        for length in range(len(joined) - start + 1):
            got = ds.read(start, length)
            assert got.dtype == np.uint8 and got.tobytes() == joined[start:start + length]
    with pytest.raises(IndexError):
        ds.read(len(joined) - 1, 2)
    assert ds.describe() == f"4 files, {len(joined)} bytes"


def test_binary_bytes_round_trip(tmp_path: Path):
    content = bytes(range(256)) + bytes(range(255, -1, -1))
    f = _write(tmp_path / "bin.dat", content)
    ds = ByteDataset.from_files([f])
    assert ds.read(0, len(ds)).tobytes() == content
    batch = WindowSampler(ds, seq_len=len(content), batch_size=2, seed=0).next_batch()
    assert batch[0].tolist() == list(content) and batch.min() == 0 and batch.max() == 255


def _sampler_dataset(tmp_path: Path) -> ByteDataset:
    rng = np.random.default_rng(1)
    paths = [_write(tmp_path / f"{i}.bin", rng.integers(0, 256, 500, dtype=np.uint8).tobytes()) for i in range(4)]
    return ByteDataset.from_files(paths, separator=10)


def test_sampler_deterministic_and_windows_are_real(tmp_path: Path):
    ds = _sampler_dataset(tmp_path)
    a, b = WindowSampler(ds, 64, 8, seed=3), WindowSampler(ds, 64, 8, seed=3)
    batches = [a.next_batch() for _ in range(5)]
    for x in batches:
        assert x.shape == (8, 64) and x.dtype == torch.long
        assert x.equal(b.next_batch())
    assert not batches[0].equal(WindowSampler(ds, 64, 8, seed=4).next_batch())
    # Every row is a contiguous slice of the stream.
    stream = _all_bytes(ds)
    for row in batches[0].tolist():
        assert bytes(row) in stream


def test_sampler_covers_first_and_last_window(tmp_path: Path):
    f = _write(tmp_path / "a.txt", b"abcdef")
    rows = {bytes(r) for r in WindowSampler(ByteDataset.from_files([f]), 4, 64, seed=0).next_batch().tolist()}
    assert rows == {b"abcd", b"bcde", b"cdef"}  # uniform over all 3 valid starts, none past the end


def test_sampler_resume_equals_uninterrupted(tmp_path: Path):
    ds = _sampler_dataset(tmp_path)
    full = WindowSampler(ds, 32, 4, seed=7)
    expected = [full.next_batch() for _ in range(6)]

    first = WindowSampler(ds, 32, 4, seed=7)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    assert state["step"] == 3
    resumed = WindowSampler(ds, 32, 4, seed=999)  # the seed is overridden by the loaded state
    resumed.load_state_dict(state)
    for want in expected[3:]:
        assert resumed.next_batch().equal(want)
    assert resumed.step == 6


def test_rank_slices_concatenate_to_single_process_batch(tmp_path: Path):
    ds = _sampler_dataset(tmp_path)
    world, per_rank = 3, 4
    single = WindowSampler(ds, 16, per_rank * world, seed=5)
    ranks = [WindowSampler(ds, 16, per_rank, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(3):
        assert torch.cat([s.next_batch() for s in ranks]).equal(single.next_batch())


def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.parts)
    assert any(f.name == "os.py" for f in files)


def test_default_corpus_split_by_hash_is_balanced():
    # Only path names are used: the documented hash puts roughly val_fraction of the stdlib in validation.
    files = default_corpus_files()
    root = Path(corpus_mod.sysconfig.get_paths()["stdlib"])
    n_val = sum(corpus_mod._val_score(f.relative_to(root).as_posix()) < 0.05 for f in files)
    assert 0.02 * len(files) < n_val < 0.09 * len(files)


def test_error_missing_path(tmp_path: Path):
    with pytest.raises(DataError, match=r"does not exist: .*nope"):
        load_split([tmp_path / "nope"])


def test_error_empty_file(tmp_path: Path):
    f = _write(tmp_path / "empty.txt", b"")
    with pytest.raises(DataError, match=r"file is empty.*empty\.txt"):
        load_split([f])
    with pytest.raises(DataError, match=r"file is empty.*empty\.txt"):
        ByteDataset.from_files([f])


def test_error_directory_without_files(tmp_path: Path):
    d = tmp_path / "blank"
    _write(d / "empty.txt", b"")
    _write(d / ".hidden", b"not counted")
    with pytest.raises(DataError, match=r"no non-empty files.*blank"):
        load_split([d])


def test_error_shorter_than_window(tmp_path: Path):
    f = _write(tmp_path / "short.txt", b"x" * 100)
    train, val, _ = load_split([f], val_fraction=0.1)
    WindowSampler(train, 90, 1, seed=0)  # exactly one window fits
    with pytest.raises(DataError, match=r"train data .*short\.txt.* 90 bytes.*seq_len=91.*smaller --seq-len"):
        WindowSampler(train, 91, 1, seed=0)
    with pytest.raises(DataError, match=r"val data .* 10 bytes.*seq_len=64.*more data"):
        WindowSampler(val, 64, 1, seed=0)


@pytest.mark.parametrize("bad", [-1, 256, 1.5, True])
def test_error_bad_separator(tmp_path: Path, bad):
    f = _write(tmp_path / "a.txt", b"abc")
    with pytest.raises(DataError, match="separator must be a byte value in 0..255"):
        load_split([f], separator=bad)
    with pytest.raises(DataError, match="separator"):
        ByteDataset.from_files([f], separator=bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan")])
def test_error_bad_val_fraction(tmp_path: Path, bad):
    f = _write(tmp_path / "a.txt", b"abc")
    with pytest.raises(DataError, match=r"val_fraction must be in \(0, 1\)"):
        load_split([f], val_fraction=bad)


def test_error_no_default_corpus(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpus_mod.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(DataError, match=r"no Python standard library sources.*found under"):
        default_corpus_files()
