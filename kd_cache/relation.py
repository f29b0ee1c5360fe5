"""Visual-token relation matrices (RDist): normalisation and compact encodings.

The teacher pass computes, per image, ``R = Z Z^T`` (N x N) from the logits ``Z`` at that image's
visual positions. The relation loss is scale-invariant, so only ``R / ||R||_F`` is stored, in one of
two encodings:

- ``full``: the upper triangle (diagonal included) of the normalised matrix, float16;
- ``lowrank:r``: the r eigenpairs of the normalised matrix with the largest ``|eigenvalue|``
  (eigenvalues float32 [r], eigenvectors float16 [N, r]) plus ``energy``, the fraction of the squared
  Frobenius norm they capture (``sum kept w^2 / sum all w^2``), so ``inspect-shard`` can show what
  the truncation cost;
- ``auto`` (the default): ``full`` for an image of at most ``AUTO_FULL_MAX`` visual tokens,
  ``lowrank:AUTO_RANK`` above (``resolve_relation_spec``). ``full`` grows with N^2 (fp16 upper
  triangle, ~N^2 bytes after compression), ``lowrank:32`` with N (~54 N bytes): on SmolLM2-135M
  logits, 217 KiB vs 33 KiB per image at N = 576 and 2.5 MiB vs 108 KiB at N = 2048, with at least
  0.99999 of the energy kept (benchmarks/RESULTS.md, "Relation storage at real sizes"). Dynamic-
  resolution families give 1,000+ visual tokens for a megapixel image, where ``full`` would dominate
  the cache.

``decode_relation`` rebuilds a float32 [N, N] matrix rescaled to unit Frobenius norm.
``none`` means no relation matrices are stored at all.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_SPEC_HELP = "expected 'auto', 'full', 'none' or 'lowrank:R' with R a positive integer (e.g. 'lowrank:32')"
AUTO_FULL_MAX = 576  # largest image (visual tokens) ``auto`` stores in full
AUTO_RANK = 32


def parse_relation_spec(spec: str) -> tuple[str, int | None]:
    """Validate a relation encoding string; return ``(kind, rank)``.

    ``"full"`` -> ``("full", None)``, ``"none"`` -> ``("none", None)``, ``"auto"`` -> ``("auto", None)``,
    ``"lowrank:32"`` -> ``("lowrank", 32)``. Anything else raises ``ValueError``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"relation encoding {spec!r} is not a string: {_SPEC_HELP}")
    s = spec.strip().lower()
    if s in ("full", "none", "auto"):
        return s, None
    kind, sep, rank = s.partition(":")
    if kind == "lowrank" and sep:
        try:
            r = int(rank)
        except ValueError:
            r = 0
        if r >= 1 and rank.strip().isdigit():
            return "lowrank", r
    raise ValueError(f"relation encoding {spec!r} not understood: {_SPEC_HELP}")


def resolve_relation_spec(spec: str, n: int) -> str:
    """The encoding a matrix of ``n`` visual tokens gets: ``spec`` itself, or for ``auto`` ``full`` up to
    ``AUTO_FULL_MAX`` tokens and ``lowrank:AUTO_RANK`` above."""
    if parse_relation_spec(spec)[0] != "auto":
        return spec
    return "full" if n <= AUTO_FULL_MAX else f"lowrank:{AUTO_RANK}"


def normalise(R: np.ndarray) -> np.ndarray:
    """Scale ``R`` to unit Frobenius norm (float32 [N, N]); an all-zero matrix stays zero."""
    R = np.asarray(R, dtype=np.float32)
    norm = float(np.linalg.norm(R.astype(np.float64)))
    if not np.isfinite(norm):
        raise ValueError(f"relation matrix has non-finite entries (Frobenius norm {norm})")
    if norm == 0.0:
        return np.zeros_like(R)
    return (R.astype(np.float64) / norm).astype(np.float32)


@lru_cache(maxsize=16)
def _triu(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangle indices (diagonal included), cached: readers decode many matrices of one size."""
    rows, cols = np.triu_indices(n)
    return rows.astype(np.intp), cols.astype(np.intp)


@lru_cache(maxsize=8)
def _symmetric_index(n: int) -> np.ndarray:
    """[n, n] map from entry (i, j) to the upper-triangle index of (min(i, j), max(i, j)), cached.

    Same row-major triangle order as ``_triu``, so ``upper.take(map)`` is the full symmetric matrix.
    ``intp`` (a gather with native indices is ~25% faster than with int32 ones); read-only: shared.
    """
    i = np.arange(n, dtype=np.intp)
    a, b = np.minimum.outer(i, i), np.maximum.outer(i, i)
    out = a * n - a * (a - 1) // 2 + (b - a)
    out.setflags(write=False)
    return out


# Every float16 bit pattern -> its float32 value (numpy's own conversion): a table lookup converts a
# stored triangle ~2x faster than ``astype``. -0.0 reads as +0.0, as it always did (the decoder used
# to add the transposed triangle, i.e. +0.0, to every entry), so decoded matrices stay bit-identical.
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_F16_TO_F32[0x8000] = 0.0
_F16_TO_F32.setflags(write=False)


def _as_float32(a: np.ndarray) -> np.ndarray:
    """float32 copy of a stored relation field with -0.0 read as +0.0."""
    if a.dtype == np.float16:
        return _F16_TO_F32.take(np.ascontiguousarray(a).view(np.uint16))
    return np.add(a, np.float32(0.0), dtype=np.float32)


def _check_square(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"relation matrix must be square [N, N], found shape {tuple(R.shape)}")
    return R


def encode_relation(R: np.ndarray, spec: str) -> dict[str, np.ndarray]:
    """Encode a symmetric [N, N] relation matrix (any scale) with ``spec``.

    Returns ``{"upper": float16 [N(N+1)/2]}`` for ``full``;
    ``{"eigvals": float32 [r], "eigvecs": float16 [N, r], "energy": float32 []}`` for ``lowrank:r``
    (r clipped to N); ``{}`` for ``none``.
    """
    R = _check_square(R)
    kind, rank = parse_relation_spec(resolve_relation_spec(spec, R.shape[0]))
    if kind == "none":
        return {}
    Rn = normalise(R)
    n = Rn.shape[0]
    # Only symmetric matrices survive either encoding (upper triangle / eigh read half the matrix).
    if not np.allclose(Rn, Rn.T, rtol=1e-3, atol=1e-5):
        raise ValueError(
            "relation matrix is not symmetric (max |R - R^T| after normalisation = "
            f"{float(np.abs(Rn - Rn.T).max()):.3g}): expected R = Z Z^T"
        )
    if kind == "full":
        return {"upper": Rn[_triu(n)].astype(np.float16)}
    r = min(int(rank), n)
    w, V = np.linalg.eigh(Rn.astype(np.float64))
    order = np.argsort(-np.abs(w), kind="stable")[:r]
    total = float(np.sum(w * w))
    energy = float(np.sum(w[order] ** 2) / total) if total > 0 else 1.0
    return {
        "eigvals": w[order].astype(np.float32),
        "eigvecs": V[:, order].astype(np.float16),
        "energy": np.asarray(min(energy, 1.0), dtype=np.float32),
    }


def decode_relation(encoded: dict[str, np.ndarray], n: int, spec: str) -> np.ndarray:
    """Rebuild the float32 [n, n] relation matrix (unit Frobenius norm) from ``encode_relation``.

    Fields may be given flattened (as stored in a shard): ``eigvecs`` is reshaped to [n, r].
    """
    kind, _ = parse_relation_spec(resolve_relation_spec(spec, n))
    if kind == "none":
        raise ValueError("relation encoding 'none' stores no matrices: there is nothing to decode")
    if kind == "full":
        upper = _as_float32(np.asarray(encoded["upper"]).ravel())
        expected = n * (n + 1) // 2
        if upper.size != expected:
            raise ValueError(
                f"full relation for N={n} needs {expected} upper-triangle values, found {upper.size}"
            )
        # One gather through a cached [n, n] index map fills both triangles: 4x faster than filling
        # the upper triangle by fancy indexing and adding its transpose, and bit-identical to it.
        return _unit(upper.take(_symmetric_index(n)))
    w = np.asarray(encoded["eigvals"], dtype=np.float32).ravel()
    V = np.asarray(encoded["eigvecs"], dtype=np.float32)
    if V.size != n * w.size:
        raise ValueError(
            f"low-rank relation for N={n} with {w.size} eigenvalues needs {n * w.size} eigenvector "
            f"entries, found {V.size}"
        )
    V = V.reshape(n, w.size)
    return _unit((V * w) @ V.T)


def _unit(M: np.ndarray) -> np.ndarray:
    """In-place unit Frobenius scaling of a float32 matrix built here (the reader's fast path)."""
    norm = float(np.linalg.norm(M))
    if norm > 0.0 and np.isfinite(norm):
        M *= 1.0 / norm
    return M


def relation_energy(encoded: dict[str, np.ndarray]) -> float:
    """Fraction of the Frobenius energy an encoding keeps (1.0 for ``full``)."""
    if "energy" in encoded:
        return float(np.asarray(encoded["energy"]).ravel()[0])
    return 1.0


def encoded_nbytes(encoded: dict[str, np.ndarray]) -> int:
    """Raw (uncompressed) bytes of an encoding."""
    return int(sum(np.asarray(v).nbytes for v in encoded.values()))
