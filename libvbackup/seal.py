"""What leaves the host for a bucket: files cut into frames, each sealed with AES-256-GCM (pure).

Why authenticated encryption per frame, not qcow2's own LUKS encryption: LUKS in qcow2 is
AES-XTS, which hides the data but does not detect a changed or swapped cluster (it decrypts to
garbage that a restore would write), and our writer would have to encrypt qcow2 itself. GCM per
frame detects any change, and a frame is the unit of a ranged read, so a restore reads only
the frames holding the data it needs::

    plain file   | frame 0 (FRAME bytes) | frame 1 | ... | frame n-1 (shorter) |
    object       | nonce 12 | ciphertext | tag 16 | nonce | ciphertext | tag | ...

The associated data of each frame binds it to its place: the object's name (relative to the
bucket's prefix), its index and the number of frames. A frame moved to another place or
object, an object renamed, truncated, extended or swapped for another fails to open.

The nonce is derived from the key, the frame's place and its content (an HMAC of the place and
the frame's SHA-256, which the copy computes anyway for the file's digest: the same frame
sealed twice gives the same bytes, different frames never share a nonce). So a resumed upload
can tell a part the bucket already holds from a stale one by its ETag (the MD5 of its bytes)
without downloading it, and a point copied twice is the same objects twice.

Keys: the key file holds at least 32 bytes of secret (``head -c 32 /dev/urandom``); HKDF-SHA256
derives the encryption key, the nonce key and the key id from it. The key id is stored in the
bucket's header object so that a wrong key is refused before anything is read or written.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct

from .errors import UsageError, VerifyError

FRAME = 8 << 20  # plaintext bytes per frame; >= 5 MiB: every frame but the last is an S3 part
NONCE = 12
TAG = 16
OVERHEAD = NONCE + TAG
MIN_KEY = 32
SCHEME = "aes-256-gcm-frames"


class Tampered(VerifyError):
    """An object in the bucket does not open with the key: changed, swapped or truncated."""


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.digest(b"libvbackup-s3-v1", secret, "sha256")
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([i]), "sha256")
        out += block
        i += 1
    return out[:length]


def read_key_file(path: str) -> bytes:
    """The secret of a key file; a one-line error for anything wrong with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read key file {path}: {e.strerror}",
                         "create one with: (umask 077; head -c 32 /dev/urandom > FILE)") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(f"key file {path} is readable by others (mode {st.st_mode & 0o777:o})",
                             f"chmod 600 {path}")
        secret = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(secret) < MIN_KEY:
        raise UsageError(f"key file {path} holds {len(secret)} bytes; a key needs at least {MIN_KEY}",
                         "create one with: (umask 077; head -c 32 /dev/urandom > FILE)")
    return secret


class Sealer:
    """Seals and opens frames with one key."""

    encrypted = True

    def __init__(self, secret: bytes):
        # A C extension, loaded only when sealing. The streaming Cipher API, not AESGCM: it
        # writes into buffers we own (AESGCM takes and returns bytes only: two more copies of
        # every 8 MiB frame, and the memory of a copy with parts in flight).
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._cipher = lambda mode: Cipher(algorithms.AES(self._key), mode)
        self._gcm = modes.GCM
        self._key = _hkdf(secret, b"encryption")
        self._nonce_key = _hkdf(secret, b"nonce")
        self.key_id = _hkdf(secret, b"key id", 16).hex()

    @staticmethod
    def _aad(name: str, index: int, count: int) -> bytes:
        return b"libvbackup-frame-1\0" + name.encode() + b"\0" + struct.pack(">QQ", index, count)

    def seal(self, name: str, index: int, count: int, plain: bytes | memoryview,
             digest: bytes | None = None) -> bytes:
        """``digest``: the frame's SHA-256 if the caller has it (it is computed otherwise)."""
        aad = self._aad(name, index, count)
        digest = digest or hashlib.sha256(plain).digest()
        nonce = hmac.digest(self._nonce_key, aad + digest, "sha256")[:NONCE]
        enc = self._cipher(self._gcm(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        n = len(plain)
        out = bytearray(NONCE + n + 15 + TAG)  # update_into wants a block's room beyond the data
        view = memoryview(out)
        view[:NONCE] = nonce
        done = enc.update_into(plain, view[NONCE:NONCE + n + 15]) if n else 0
        enc.finalize()
        view[NONCE + done:NONCE + done + TAG] = enc.tag
        view.release()
        del out[NONCE + done + TAG:]
        return out

    def open(self, name: str, index: int, count: int, sealed: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(sealed) < OVERHEAD:
            raise Tampered(f"object {name} frame {index} is truncated")
        view = memoryview(sealed)
        n = len(sealed) - OVERHEAD
        try:
            dec = self._cipher(self._gcm(bytes(view[:NONCE]), bytes(view[NONCE + n:]))).decryptor()
            dec.authenticate_additional_data(self._aad(name, index, count))
            out = bytearray(n + 15)
            done = dec.update_into(view[NONCE:NONCE + n], out) if n else 0
            dec.finalize()
            del out[done:]
            return out
        except InvalidTag:
            raise Tampered(f"object {name} frame {index} does not open with the key: "
                           "it was changed, swapped or truncated in the bucket") from None


class Plain:
    """``--no-encrypt``: objects are the files themselves (standard qcow2 in the bucket); their
    SHA-256, kept in the point object, is what verify checks."""

    encrypted = False
    key_id = None

    def seal(self, name: str, index: int, count: int, plain: bytes | memoryview,
             digest: bytes | None = None) -> bytes:
        return bytes(plain)

    def open(self, name: str, index: int, count: int, sealed: bytes) -> bytes:
        return sealed


def frames(size: int) -> int:
    """How many frames a file of ``size`` bytes is cut into (an empty file is one empty frame)."""
    return max(1, -(-size // FRAME))


def sealed_size(size: int, encrypted: bool) -> int:
    """The object's size for a file of ``size`` bytes."""
    return size + (frames(size) * OVERHEAD if encrypted else 0)


def frame_span(index: int, encrypted: bool) -> int:
    """Where frame ``index`` starts in the object."""
    return index * (FRAME + (OVERHEAD if encrypted else 0))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
