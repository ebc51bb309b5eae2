"""Homomorphic encryption for the vault: CKKS through TenSEAL/SEAL, coefficient-encoded.

- :mod:`vault.he.params`: the parameters of a collection key version.
- :mod:`vault.he.context`: key generation; the matcher's public and the decider's secret
  view of a key pair.
- :mod:`vault.he.poly`: residue arrays: encoding, modular arithmetic, uniform masks.
- :mod:`vault.he.kernels`: compiled scoring kernels.
- :mod:`vault.he._seal`: low-level access to SEAL objects' memory (hazmat).
"""

from vault.he.context import PublicContext, SecretContext, generate
from vault.he.params import DEFAULT_PARAMS, HeParams

__all__ = ["DEFAULT_PARAMS", "HeParams", "PublicContext", "SecretContext", "generate"]
