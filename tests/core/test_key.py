import os
import stat

import numpy as np
import pytest
import torch

from sdb_core.protect.key import (
    SealError,
    blend,
    generate_key,
    load_or_create_master_key,
    new_master_key,
    random_keys,
    seal,
    unseal,
)


def test_generated_key_is_fresh_and_in_the_pixel_range():
    k1 = generate_key((1, 8, 8), (0.5,), (0.25,))
    k2 = generate_key((1, 8, 8), (0.5,), (0.25,))
    assert k1.shape == (1, 8, 8) and not torch.equal(k1, k2)
    pixels = (k1 * 0.25 + 0.5) * 255
    assert pixels.min() >= -1e-4 and pixels.max() <= 255 + 1e-4
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)


def test_blend_is_the_convex_mix():
    x, k = torch.ones(2, 1, 4, 4), torch.zeros(1, 4, 4)
    assert torch.allclose(blend(x, k, 0.5), torch.full((2, 1, 4, 4), 0.5))
    keys = random_keys(2, (1, 4, 4), (0.0,), (1.0,), generator=torch.Generator().manual_seed(0))
    assert blend(x, keys, 0.9).shape == (2, 1, 4, 4)


def test_seal_round_trip_and_refusals():
    master, key = new_master_key(), generate_key((3, 4, 4), (0.5,) * 3, (0.2,) * 3)
    blob = seal(key, master, aad=b"ctx")
    assert np.array_equal(unseal(blob, master, aad=b"ctx"), key.numpy())
    assert key.numpy().tobytes() not in blob
    with pytest.raises(SealError, match="wrong master key"):
        unseal(blob, new_master_key(), aad=b"ctx")
    with pytest.raises(SealError, match="altered"):
        unseal(blob, master, aad=b"other")
    flipped = bytearray(blob)
    flipped[-5] ^= 1
    with pytest.raises(SealError, match="altered"):
        unseal(bytes(flipped), master, aad=b"ctx")
    with pytest.raises(SealError, match="not a sealed"):
        unseal(b"garbage", master)
    with pytest.raises(SealError, match="32 bytes"):
        seal(key, b"short")


def test_master_key_file_created_private_and_stable(tmp_path):
    path = tmp_path / "sub" / "master.key"
    k = load_or_create_master_key(path)
    assert len(k) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_master_key(path) == k
    path.write_text("not hex")
    with pytest.raises(SealError, match="not hex"):
        load_or_create_master_key(path)


def test_a_master_key_created_by_many_at_once_is_read_whole_by_all(tmp_path):
    """A server and its workers starting together on a first start: each one creates the key file or reads the one
    another created, whole (created in place, a reader could find it empty and stop: 'not hex')."""
    import threading

    from sdb_core.protect.seal import load_or_create_master_key

    def one(path, start, keys, errors):
        start.wait()
        try:
            keys.append(load_or_create_master_key(path))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    for round_ in range(30):
        path = tmp_path / f"r{round_}" / "master.key"
        start, keys, errors = threading.Barrier(8), [], []
        threads = [threading.Thread(target=one, args=(path, start, keys, errors)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(set(keys)) == 1, (round_, errors)
        assert oct(path.stat().st_mode & 0o777) == "0o600" and [p.name for p in path.parent.iterdir()] == ["master.key"]
