"""Safe tensor-file IO: damaged safetensors files, pickle refusal, atomic writes, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct

import pytest
import torch

from estable.checkpoints import io
from estable.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 8, generator=g),
        "a.bias": torch.randn(8, generator=g).half(),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.randn(3, generator=g).bfloat16(),
    }


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "model.safetensors"
    io.write_safetensors(path, _tensors(), {"format": "test"})
    return path


def _raw_file(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_round_trip_bit_exact_with_metadata(good_file):
    loaded, meta = io.read_safetensors(good_file)
    assert meta == {"format": "test"}
    ref = _tensors()
    assert loaded.keys() == ref.keys()
    for k in ref:
        assert loaded[k].dtype == ref[k].dtype
        assert torch.equal(loaded[k], ref[k]), k


@pytest.mark.parametrize("where", ["length", "header", "data_start", "data_middle", "last_byte"])
def test_truncated_file_is_explained(good_file, where):
    blob = good_file.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    cut = {
        "length": 5,
        "header": 8 + n // 2,
        "data_start": 8 + n,
        "data_middle": 8 + n + (len(blob) - 8 - n) // 2,
        "last_byte": len(blob) - 1,
    }[where]
    good_file.write_bytes(blob[:cut])
    with pytest.raises(CheckpointError, match="truncated") as info:
        io.read_safetensors(good_file)
    assert "model.safetensors" in str(info.value)
    if where.startswith("data") or where == "last_byte":
        assert "tensor data" in str(info.value)


def test_truncation_message_uses_human_sizes(tmp_path):
    # 2 MB of declared data, 1 MB present: the message reads like "says 2 MB ... has 1 MB".
    path = tmp_path / "big.safetensors"
    _raw_file(path, {"x": {"dtype": "U8", "shape": [2_000_000], "data_offsets": [0, 2_000_000]}}, b"\0" * 1_000_000)
    with pytest.raises(CheckpointError, match=r"header says 2 MB of tensor data, the file has 1 MB"):
        io.read_safetensors(path)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        io.read_safetensors(path)
    # A plausible length but a non-JSON header.
    path.write_bytes(struct.pack("<Q", 16) + b"\xff" * 16 + b"\0" * 8)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        io.read_safetensors(path)


def test_overlapping_offsets(tmp_path):
    path = tmp_path / "overlap.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _raw_file(path, header, b"\0" * 12)
    with pytest.raises(CheckpointError, match="overlap") as info:
        io.read_safetensors(path)
    assert "overlap.safetensors" in str(info.value)


def test_offsets_past_end_of_file(tmp_path):
    path = tmp_path / "past.safetensors"
    _raw_file(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="past.safetensors.*truncated.*'a'"):
        io.read_safetensors(path)


def test_offsets_inconsistent_with_dtype_and_shape(tmp_path):
    path = tmp_path / "shape.safetensors"
    _raw_file(path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"shape.safetensors.*'a'.*F32 x shape \[3\] needs 12"):
        io.read_safetensors(path)


def test_unknown_dtype_and_gap(tmp_path):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2)
    with pytest.raises(CheckpointError, match="unknown or unsupported dtype 'Q4'"):
        io.read_safetensors(path)
    _raw_file(path, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="gap of 2 bytes before tensor 'a'"):
        io.read_safetensors(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        io.read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        io.read_safetensors(tmp_path)


# ------------------------------------------------------------------ pickles


class _Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _write_evil(path, target, *, torch_zip: bool) -> None:
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": _Evil(str(target))}
    if torch_zip:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.parametrize("torch_zip", [True, False])
@pytest.mark.parametrize("allow", [True, False])
def test_malicious_pickle_runs_no_code(tmp_path, torch_zip, allow):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    _write_evil(path, target, torch_zip=torch_zip)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="evil.ckpt") as info:
        io.load_tensors(path, allow_pickle=allow)
    assert not target.exists(), "loading the pickle ran its code"
    if not allow:
        assert "allow_pickle=True" in str(info.value) and "--allow-pickle" in str(info.value)
    else:
        assert "safe" in str(info.value)
        assert "weights_only" not in str(info.value) and "Re-running" not in str(info.value)  # torch's advice
        assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_refused_without_opt_in(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        io.load_tensors(path)


def test_benign_ckpt_with_state_dict_loads_with_opt_in(tmp_path):
    path = tmp_path / "model.ckpt"
    sd = {"model.w": torch.randn(3, 2), "model.b": torch.randn(2).half()}
    torch.save({"state_dict": sd, "global_step": 1234, "epoch": 3}, path)
    loaded, meta = io.load_tensors(path, allow_pickle=True)
    assert meta == {}
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert torch.equal(loaded[k], sd[k])


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.gguf'"):
        io.load_tensors(path)


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_leaves_no_temporary_file(tmp_path, good_file):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    io.write_safetensors(good_file, {"x": torch.ones(3)})  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert io.read_safetensors(good_file)[0].keys() == {"x"}


def test_atomic_write_gives_the_usual_permissions_and_takes_long_names(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        io.write_safetensors(tmp_path / "m.safetensors", {"x": torch.ones(2)})
        assert ((tmp_path / "m.safetensors").stat().st_mode & 0o777) == 0o644  # not the writer's owner-only 0600
    finally:
        os.umask(umask)
    long = tmp_path / ("y" * 240 + ".safetensors")  # 252 bytes: a temporary name with all of it would not fit
    io.write_safetensors(long, {"x": torch.ones(2)})
    assert io.read_safetensors(long)[0].keys() == {"x"} and sorted(p.name for p in tmp_path.iterdir()) == \
        sorted([long.name, "m.safetensors"])


def test_interrupted_write_keeps_previous_file(tmp_path, good_file, monkeypatch):
    before = good_file.read_bytes()

    def crash(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"partial data")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write

    monkeypatch.setattr(io, "_save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        io.write_safetensors(good_file, {"x": torch.ones(1000)})
    assert good_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_write_handles_shared_and_strided_tensors(tmp_path):
    base = torch.randn(4, 6)
    tensors = {"w": base, "tied": base, "t": base.t(), "row": base[1]}
    path = tmp_path / "shared.safetensors"
    io.write_safetensors(path, tensors)
    loaded, _ = io.read_safetensors(path)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k


# ------------------------------------------------------------------ hashes


def test_sha256_and_short_hash(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert io.sha256_file(path) == expected
    assert io.short_hash(path) == expected[:10]


def test_human_bytes():
    assert io.human_bytes(1_600_000_000) == "1.6 GB"
    assert io.human_bytes(812_000_000) == "812 MB"
    assert io.human_bytes(999) == "999 bytes"
    assert io.human_bytes(1_234) == "1.23 kB"


def test_malicious_payload_is_real(tmp_path):
    # Control for the test above: an unrestricted unpickler does run the payload.
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    _write_evil(path, target, torch_zip=False)
    with open(path, "rb") as f:
        pickle.load(f)
    assert target.exists()


def test_cached_sha256_remembers_large_files_and_notices_a_rewrite(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "sha256.json"
    monkeypatch.setenv("ESTABLE_HASH_CACHE", str(cache))
    monkeypatch.setattr(io, "HASH_CACHE_MIN_BYTES", 1000)
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(b"x" * 999)
    big.write_bytes(b"a" * 5000)
    assert io.cached_sha256(small) == hashlib.sha256(b"x" * 999).hexdigest()
    assert not cache.exists()  # below the size that is worth remembering
    first = io.cached_sha256(big)
    assert first == hashlib.sha256(b"a" * 5000).hexdigest()
    entries = json.loads(cache.read_text())
    assert list(entries) == [str(big.resolve())] and entries[str(big.resolve())]["sha256"] == first
    # A remembered hash is used without reading the file: a planted one comes back while the stamp matches.
    entries[str(big.resolve())]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    assert io.cached_sha256(big) == "0" * 64
    with open(big, "r+b") as f:  # the same size, written again: new times, so hashed again
        f.write(b"b")
    os.utime(big, ns=(1, 1))
    assert io.cached_sha256(big) == hashlib.sha256(b"b" + b"a" * 4999).hexdigest()
    cache.write_text("{not json")  # a damaged cache is ignored and rewritten
    assert io.cached_sha256(big) == hashlib.sha256(b"b" + b"a" * 4999).hexdigest()
    assert json.loads(cache.read_text())[str(big.resolve())]["sha256"] == hashlib.sha256(b"b" + b"a" * 4999).hexdigest()
    monkeypatch.setenv("ESTABLE_HASH_CACHE", "")  # off
    cache.unlink()
    assert io.cached_sha256(big) == hashlib.sha256(b"b" + b"a" * 4999).hexdigest() and not cache.exists()


def test_cached_sha256_still_hashes_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ESTABLE_HASH_CACHE", str(blocker / "sha256.json"))  # its folder is a file
    monkeypatch.setattr(io, "HASH_CACHE_MIN_BYTES", 10)
    big = tmp_path / "big.bin"
    big.write_bytes(b"z" * 100)
    assert io.cached_sha256(big) == hashlib.sha256(b"z" * 100).hexdigest()
    with pytest.raises(CheckpointError, match="no such file"):
        io.cached_sha256(tmp_path / "missing.bin")
