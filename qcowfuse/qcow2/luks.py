"""LUKS encryption of qcow2 data clusters (crypt_method 2).

The full-disk-encryption header extension (docs/interop/qcow2.rst, "Full disk
encryption header pointer") names a host range holding a LUKS1 header (cryptsetup's
LUKS1 on-disk format): the cipher and its mode and IV generator, the hash of the key
derivation, a digest of the master key and eight key slots.  A slot holds the master
key split by the anti-forensic splitter into `stripes` pieces, encrypted with a key
derived from the passphrase by PBKDF2.  Unlocking tries every active slot, as QEMU
does; only the master key that matches the digest is taken.

Data clusters are encrypted per 512-byte sector, the IV generator fed the sector's
host offset / 512 (QEMU's crypt_physical_offset for LUKS), so the cipher sees host
bytes only: `SectorCipher.decrypt/encrypt(data, first_sector)` on whole sectors.
AES in XTS or CBC mode; IVs plain, plain64 or essiv.  Whole sectors at once: XTS
and CBC decryption are one AES-ECB pass over the buffer plus numpy for the tweaks
and chaining (no cipher context per sector); CBC encryption chains 32 passes, one
per block position, across all sectors.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, QcowError, UnsupportedError
from .format import SECTOR

if TYPE_CHECKING:
    import numpy as np

    from ..hostfile import HostFile
    from .header import Header

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_KEY_ENABLED = 0x00AC71F3
LUKS_DIGEST_SIZE = 20
LUKS_SLOTS = 8
LUKS_STRIPES = 4000  # the anti-forensic split every LUKS1 writer uses (cryptsetup, QEMU)
# magic, version, cipher_name, cipher_mode, hash_spec, payload_offset, key_bytes,
# mk_digest, mk_digest_salt, mk_digest_iter, uuid
_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
# active, iterations, salt, key_material_offset (sectors from the header), stripes
_SLOT = struct.Struct(">II32sII")
HEADER_BYTES = _HEADER.size + LUKS_SLOTS * _SLOT.size  # 592

# the extension: offset (u64) and length (u64) of the LUKS header area in the image file
_EXTENSION = struct.Struct(">QQ")

AES_KEY_BYTES = (16, 24, 32)
HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "md5")


@dataclass(frozen=True)
class KeySlot:
    active: bool
    iterations: int
    salt: bytes
    key_material_offset: int  # sectors from the start of the LUKS header
    stripes: int


@dataclass(frozen=True)
class LuksHeader:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: tuple[KeySlot, ...]

    @classmethod
    def parse(cls, data: bytes) -> LuksHeader:
        if len(data) < HEADER_BYTES or data[:6] != LUKS_MAGIC:
            raise FormatError("the encryption header is not a LUKS header")
        (_, version, cipher, mode, hash_spec, payload, key_bytes, digest, salt, iters,
         uuid) = _HEADER.unpack_from(data)
        if version != 1:
            raise UnsupportedError(f"LUKS version {version} (qcow2 images use LUKS1)")
        slots = tuple(KeySlot(active == LUKS_KEY_ENABLED, it, s, km, stripes)
                      for active, it, s, km, stripes in
                      (_SLOT.unpack_from(data, _HEADER.size + i * _SLOT.size) for i in range(LUKS_SLOTS)))

        def text(raw: bytes) -> str:
            return raw.split(b"\0", 1)[0].decode("ascii", "replace")
        return cls(text(cipher), text(mode), text(hash_spec), payload, key_bytes, digest, salt,
                   iters, text(uuid), slots)

    def describe(self) -> dict[str, object]:
        """The parameters, in the terms `qemu-img info` uses (format-specific "encrypt");
        also for ciphers and modes qcowfuse cannot decrypt (info needs no key)."""
        mode, ivgen, ivhash = split_mode(self.cipher_mode)
        return {
            "format": "luks",
            "cipher-alg": f"{self.cipher_name}-{self.key_bytes * 8 // (2 if mode == 'xts' else 1)}",
            "cipher-mode": mode,
            "ivgen-alg": ivgen,
            **({"ivgen-hash-alg": ivhash} if ivhash else {}),
            "hash-alg": self.hash_spec,
            "payload-offset": self.payload_offset * SECTOR,
            "master-key-iters": self.mk_digest_iter,
            "uuid": self.uuid,
            "slots": [{"active": s.active, "key-offset": s.key_material_offset * SECTOR,
                       **({"iters": s.iterations, "stripes": s.stripes} if s.active else {})}
                      for s in self.slots],
        }


@dataclass(frozen=True)
class ModeSpec:
    mode: str  # "xts" or "cbc"
    ivgen: str  # "plain", "plain64" or "essiv"
    ivgen_hash: str | None  # essiv's hash

    @property
    def xts(self) -> bool:
        return self.mode == "xts"


@functools.cache
def _shifts() -> tuple[np.ndarray, np.ndarray]:
    """(j, 64 - j) for the blocks 1..31 of a sector, made once (functools.cache)."""
    import numpy as np
    j = np.arange(1, SECTOR // 16, dtype=np.uint64)
    return j, np.uint64(64) - j


def split_mode(cipher_mode: str) -> tuple[str, str, str | None]:
    """(mode, IV generator, its hash or None) of a LUKS cipher mode string, unchecked.
    QEMU writes the hash after any IV generator ("cbc-plain:sha256"); only essiv uses it."""
    mode, _, ivgen = cipher_mode.partition("-")
    ivgen, _, ivhash = ivgen.partition(":")
    return mode, ivgen, ivhash if ivgen == "essiv" and ivhash else None


def parse_mode(cipher_mode: str) -> ModeSpec:
    """The mode qcowfuse can decrypt, or UnsupportedError."""
    mode, ivgen, ivhash = split_mode(cipher_mode)
    if mode not in ("xts", "cbc") or ivgen not in ("plain", "plain64", "essiv") or \
            (ivgen == "essiv" and not ivhash):
        raise UnsupportedError(f"LUKS cipher mode {cipher_mode} is not supported "
                               f"(xts or cbc with plain, plain64 or essiv IVs)")
    return ModeSpec(mode, ivgen, ivhash)


def _hash(name: str) -> str:
    if name not in HASHES or name not in hashlib.algorithms_available:
        raise UnsupportedError(f"LUKS hash {name} is not supported")
    return name


class SectorCipher:
    """AES in XTS or CBC mode over whole 512-byte sectors, IVs from the sector number."""

    def __init__(self, key: bytes, spec: ModeSpec) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        self.spec = spec
        if spec.xts:
            half = len(key) // 2
            data_key, self._tweak_key = key[:half], key[half:]
        else:
            data_key = key
        if len(data_key) not in AES_KEY_BYTES:
            raise UnsupportedError(f"AES with a {len(data_key)}-byte key")
        aes = Cipher(algorithms.AES(data_key), modes.ECB())
        self._encryptor = aes.encryptor()
        self._decryptor = aes.decryptor()
        self._essiv = None  # essiv: IV = AES(hash(master key), sector number)
        if spec.ivgen == "essiv":
            assert spec.ivgen_hash is not None
            ivkey = hashlib.new(_hash(spec.ivgen_hash), key).digest()
            if len(ivkey) not in AES_KEY_BYTES:
                raise UnsupportedError(f"ESSIV with {spec.ivgen_hash} (no AES key of {len(ivkey)} bytes)")
            self._essiv = Cipher(algorithms.AES(ivkey), modes.ECB()).encryptor()
        # XTS: the first tweak of a sector is the IV encrypted with the second key half
        self._tweak = Cipher(algorithms.AES(self._tweak_key), modes.ECB()).encryptor() if spec.xts else None

    def _ivs(self, first_sector: int, count: int) -> np.ndarray:
        """(count, 2) uint64: each sector's 16-byte IV (XTS: its first tweak), little-endian."""
        import numpy as np
        sectors = np.arange(first_sector, first_sector + count, dtype=np.uint64)
        if self.spec.ivgen == "plain":
            sectors &= np.uint64(0xFFFFFFFF)
        iv = np.zeros((count, 2), "<u8")
        iv[:, 0] = sectors
        for step in (self._essiv, self._tweak):
            if step is not None:
                iv = np.frombuffer(step.update(iv.tobytes()), "<u8").reshape(count, 2).copy()
        return iv

    def _xts_masks(self, first_sector: int, count: int) -> np.ndarray:
        """The XTS tweak of every 16-byte block, T_j = T_0 * alpha^j in GF(2^128) (IEEE
        1619): (count * 32, 2) uint64, little-endian.  All j at once: shifted left by j,
        with the j bits shifted out folded back in times x^128 = x^7 + x^2 + x + 1."""
        import numpy as np
        t = self._ivs(first_sector, count)
        lo, hi = t[:, 0:1], t[:, 1:2]
        j, back = _shifts()
        out = hi >> back  # the top j bits of T_0
        low = (lo << j) ^ out
        for k in (1, 2, 7):
            low ^= out << np.uint64(k)
        masks = np.empty((count, SECTOR // 16, 2), "<u8")
        masks[:, 0] = t
        masks[:, 1:, 0] = low
        masks[:, 1:, 1] = (hi << j) | (lo >> back)
        return masks.reshape(-1, 2)

    def _xts(self, ecb: Any, blocks: np.ndarray, first_sector: int) -> bytes:
        """XTS either way: the tweak masks around one ECB pass over every block."""
        import numpy as np
        mask = self._xts_masks(first_sector, len(blocks) * 16 // SECTOR)
        mask ^= np.frombuffer(ecb.update(np.bitwise_xor(blocks, mask).view(np.uint8).data), "<u8").reshape(-1, 2)
        return mask.tobytes()

    def decrypt(self, data: bytes | bytearray, first_sector: int) -> bytes:
        import numpy as np
        c3 = np.frombuffer(data, "<u8").reshape(-1, SECTOR // 16, 2)  # sector, block, half
        count = len(c3)
        if self.spec.xts:
            return self._xts(self._decryptor, c3.reshape(-1, 2), first_sector)
        d3 = np.frombuffer(self._decryptor.update(bytes(data)), "<u8").reshape(count, SECTOR // 16, 2)
        prev = np.empty_like(c3)
        prev[:, 0] = self._ivs(first_sector, count)
        prev[:, 1:] = c3[:, :-1]
        return bytes((d3 ^ prev).tobytes())

    def encrypt(self, data: bytes | bytearray | memoryview, first_sector: int) -> bytes:
        import numpy as np
        p3 = np.frombuffer(data, "<u8").reshape(-1, SECTOR // 16, 2)
        if self.spec.xts:
            return self._xts(self._encryptor, p3.reshape(-1, 2), first_sector)
        count = len(p3)
        out = np.empty_like(p3)
        prev = self._ivs(first_sector, count)
        for j in range(SECTOR // 16):  # CBC chains within a sector: one pass per position
            prev = np.frombuffer(self._encryptor.update((p3[:, j] ^ prev).tobytes()), "<u8").reshape(count, 2)
            out[:, j] = prev
        return bytes(out.tobytes())


def _af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """LUKS1's anti-forensic merge: the stripes, diffused by the hash, back to the key."""
    size = hashlib.new(hash_name).digest_size
    d = bytes(key_bytes)
    for i in range(stripes - 1):
        block = material[i * key_bytes:(i + 1) * key_bytes]
        mixed = bytes(a ^ b for a, b in zip(d, block))
        out = b""
        for j in range(-(-key_bytes // size)):  # diffuse: hash each digest-sized piece
            piece = mixed[j * size:(j + 1) * size]
            out += hashlib.new(hash_name, struct.pack(">I", j) + piece).digest()[:len(piece)]
        d = out
    last = material[(stripes - 1) * key_bytes:stripes * key_bytes]
    return bytes(a ^ b for a, b in zip(d, last))


class WrongPassphrase(QcowError):
    pass


def read_luks_header(f: HostFile, header: Header) -> tuple[LuksHeader, int, int]:
    """The image's LUKS header (no key needed), and the offset and length of its area."""
    from .header import CRYPT_LUKS, EXT_CRYPTO
    if header.crypt_method != CRYPT_LUKS:
        raise UnsupportedError("the legacy AES encryption (crypt_method 1) is not supported: "
                               "it is insecure and QEMU refuses to create it too")
    ext = header.extension(EXT_CRYPTO)
    if ext is None or len(ext) < _EXTENSION.size:
        raise FormatError("LUKS image without a valid encryption header extension")
    offset, length = _EXTENSION.unpack_from(ext)
    return LuksHeader.parse(f.pread(offset, min(length, HEADER_BYTES))), offset, length


def open_luks(f: HostFile, header: Header, passphrase: bytes) -> tuple[LuksHeader, SectorCipher]:
    """Unlock the image's LUKS header with the passphrase: its parameters and the data
    cipher.  Every active slot is tried (as QEMU does); the passphrase never appears in
    an exception or a log."""
    luks, offset, length = read_luks_header(f, header)
    if luks.cipher_name != "aes":
        raise UnsupportedError(f"LUKS cipher {luks.cipher_name} is not supported (AES only)")
    spec = parse_mode(luks.cipher_mode)
    hash_name = _hash(luks.hash_spec)
    # Bounds before any derivation: the key size decides PBKDF2's output and, with the
    # stripes, how much key material is read and merged (QEMU checks both on open).
    if luks.key_bytes not in ((32, 48, 64) if spec.xts else (16, 24, 32)):
        raise FormatError(f"LUKS master key of {luks.key_bytes} bytes does not fit AES-{spec.mode}")
    for slot in luks.slots:
        if not slot.active:
            continue
        if slot.stripes != LUKS_STRIPES or slot.iterations < 1:
            raise FormatError(f"a LUKS key slot with {slot.stripes} stripes (not {LUKS_STRIPES}) "
                              f"or no iterations")
        material_len = -(-luks.key_bytes * slot.stripes // SECTOR) * SECTOR
        start = slot.key_material_offset * SECTOR
        if start + material_len > length:
            raise FormatError("a LUKS key slot's material lies outside the header area")
        derived = hashlib.pbkdf2_hmac(hash_name, passphrase, slot.salt, slot.iterations, luks.key_bytes)
        material = SectorCipher(derived, spec).decrypt(f.pread(offset + start, material_len), 0)
        candidate = _af_merge(material, luks.key_bytes, slot.stripes, hash_name)
        digest = hashlib.pbkdf2_hmac(hash_name, candidate, luks.mk_digest_salt, luks.mk_digest_iter,
                                     LUKS_DIGEST_SIZE)
        if digest == luks.mk_digest:
            return luks, SectorCipher(candidate, spec)
    raise WrongPassphrase("no key slot matches the passphrase")
