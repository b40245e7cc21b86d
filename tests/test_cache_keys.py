"""Cache keys name what determines a value: a file's content, or, for a pass that
reads a sample of it, its identity; huggingface_hub's blobs by their own SHA-256."""

import hashlib
import os

from ewq.cache import file_digest, file_identity, key


def test_a_hub_blob_is_named_by_its_sha256_without_reading_it(tmp_path):
    body = b"weights" * 1000
    sha = hashlib.sha256(body).hexdigest()
    blob = tmp_path / "models--org--name" / "blobs" / sha
    blob.parent.mkdir(parents=True)
    blob.write_bytes(body)
    snap = tmp_path / "models--org--name" / "snapshots" / "abc" / "model.safetensors"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(blob)
    assert file_digest(snap) == sha == file_identity(snap)
    other = tmp_path / "copy.safetensors"
    other.write_bytes(body)
    assert file_digest(other) == sha  # a copy elsewhere: the same content key


def test_a_sampled_key_changes_when_the_file_is_rewritten(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 4096)
    doc = {"kind": "error", "sample": {"fraction": 0.02}}
    before = key(doc, [f], content=False)
    assert key(doc, [f], content=False) == before
    f.write_bytes(b"b" * 4096)  # same size, new content
    os.utime(f, ns=(1, 1))
    after = key(doc, [f], content=False)
    assert after != before
    assert key(doc, [f]) != after  # content and identity keys never collide
