"""Raw access to SEAL ciphertexts and plaintexts through TenSEAL's ``sealapi`` bindings.

Low-level layer (hazmat). ``sealapi`` exposes SEAL's classes but no buffer access: a
ciphertext's coefficients can only be read one at a time. The vault's scoring kernels and
storage need them as arrays, so this module reads and writes the C++ objects' memory
directly, at offsets that are checked against the bindings' own accessors when the module
is first used (:func:`self_check`). A TenSEAL build whose layout differs fails that check
with a clear error instead of reading garbage.

Layouts (SEAL 4.1, x86-64, as bundled with TenSEAL 0.3):

- ``seal::Ciphertext``: parms_id (4 x u64) @0, is_ntt_form (bool) @32, size @40,
  poly_modulus_degree @48, coeff_modulus_size @56, scale (double) @64,
  correction_factor @72, DynArray data_ {pool (16 bytes) @80, capacity @96, size @104,
  pointer @112}. Data: ``size`` polynomials, each ``coeff_modulus_size`` RNS components
  of ``poly_modulus_degree`` u64 coefficients.
- ``seal::Plaintext``: parms_id @0, coeff_count @32, scale @40, DynArray data_ {pool @48,
  capacity @64, size @72, pointer @80}.
- A pybind11 instance keeps the pointer to its C++ value right after the PyObject header.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
from tenseal import sealapi

_PYOBJECT_HEAD = 16
_CT_NTT, _CT_SIZE, _CT_N, _CT_L, _CT_DATA_SIZE, _CT_DATA = 32, 40, 48, 56, 104, 112
_PT_COUNT, _PT_DATA_SIZE, _PT_DATA = 32, 72, 80

# What self_check() has verified so far (ciphertexts; plaintexts need a decryptor).
_checked = {"ciphertext": False, "plaintext": False}


class LayoutError(RuntimeError):
    """The SEAL objects in this TenSEAL build are not laid out as this module expects."""


def _address(obj: object) -> int:
    return ctypes.c_void_p.from_address(id(obj) + _PYOBJECT_HEAD).value or 0


def _u64(address: int) -> int:
    return ctypes.c_uint64.from_address(address).value


def _view(pointer: int, count: int) -> np.ndarray:
    if pointer == 0 or count == 0:
        raise LayoutError("SEAL object holds no data")
    return np.ctypeslib.as_array((ctypes.c_uint64 * count).from_address(pointer))


def ciphertext_array(ct: sealapi.Ciphertext) -> np.ndarray:
    """A writable view (size, levels, N) of a ciphertext's coefficients.

    Valid while ``ct`` lives and is not resized; copy it to keep it.
    """
    _ensure_checked("ciphertext")
    return _raw_ciphertext_array(ct)


def _raw_ciphertext_array(ct: sealapi.Ciphertext) -> np.ndarray:
    base = _address(ct)
    size, n, levels = _u64(base + _CT_SIZE), _u64(base + _CT_N), _u64(base + _CT_L)
    if _u64(base + _CT_DATA_SIZE) != size * n * levels:
        raise LayoutError("ciphertext data size does not match its dimensions")
    return _view(_u64(base + _CT_DATA), size * levels * n).reshape(size, levels, n)


def plaintext_array(pt: sealapi.Plaintext) -> np.ndarray:
    """A read-only copy of a plaintext's coefficients (levels * N u64)."""
    _ensure_checked("plaintext")
    return _raw_plaintext_array(pt).copy()


def _raw_plaintext_array(pt: sealapi.Plaintext) -> np.ndarray:
    base = _address(pt)
    count = _u64(base + _PT_COUNT)
    if _u64(base + _PT_DATA_SIZE) != count:
        raise LayoutError("plaintext data size does not match its coefficient count")
    return _view(_u64(base + _PT_DATA), count)


def set_ntt_form(ct: sealapi.Ciphertext, ntt: bool) -> None:
    """Mark a ciphertext as holding NTT-form (True) or coefficient-form polynomials."""
    _ensure_checked("ciphertext")
    ctypes.c_bool.from_address(_address(ct) + _CT_NTT).value = bool(ntt)


def new_ciphertext(context: sealapi.SEALContext, parms_id: list[int], data: np.ndarray,
                   ntt: bool) -> sealapi.Ciphertext:
    """A SEAL ciphertext at ``parms_id`` holding a copy of ``data`` (2, levels, N)."""
    ct = sealapi.Ciphertext(context)
    ct.resize(context, parms_id, data.shape[0])
    view = ciphertext_array(ct)
    if view.shape != data.shape:
        raise ValueError(f"ciphertext of shape {data.shape} does not fit level {view.shape}")
    view[...] = data
    set_ntt_form(ct, ntt)
    return ct


def self_check(context: sealapi.SEALContext, encryptor: sealapi.Encryptor,
               decryptor: sealapi.Decryptor | None = None) -> None:
    """Check the memory layout against the bindings' accessors on real objects."""
    if sys.byteorder != "little" or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise LayoutError("only 64-bit little-endian platforms are supported")
    ct = sealapi.Ciphertext(context)
    encryptor.encrypt_zero(ct)
    base = _address(ct)
    if (_u64(base + _CT_SIZE), _u64(base + _CT_N), _u64(base + _CT_L)) != (
            ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size()):
        raise LayoutError("seal::Ciphertext header is not where expected")
    arr = _raw_ciphertext_array(ct)
    total = arr.size
    for i in (0, 1, total // 2, total - 1):
        if int(arr.reshape(-1)[i]) != ct[i]:
            raise LayoutError("seal::Ciphertext data is not where expected")
    if bool(ctypes.c_bool.from_address(base + _CT_NTT).value) != ct.is_ntt_form():
        raise LayoutError("seal::Ciphertext NTT flag is not where expected")
    _checked["ciphertext"] = True
    if decryptor is not None:
        pt = sealapi.Plaintext()
        decryptor.decrypt(ct, pt)
        flat = _raw_plaintext_array(pt)
        if flat.size != pt.coeff_count() or any(int(flat[i]) != pt[i] for i in (0, flat.size - 1)):
            raise LayoutError("seal::Plaintext data is not where expected")
        _checked["plaintext"] = True


def _ensure_checked(kind: str) -> None:
    if not _checked[kind]:
        raise LayoutError(f"self_check() has not verified the {kind} layout yet")
