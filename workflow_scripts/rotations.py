"""The random orthogonal transforms of the rotated kurtosis (``stats.rotation``), each fixed by
(seed, layer, index) and applied to rows of ``width`` features in float32.

  haar        a dense Haar-random rotation: the QR of a Gaussian matrix, 2 width^2 multiply-adds
              a row;
  structured  :class:`StructuredRotation`: random signs, Kronecker products of Hadamard and
              small Haar factors, and a random permutation, O(width log width) a row.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch


def haar_matrix(rng: np.random.Generator, width: int) -> np.ndarray:
    """A Haar-random orthogonal matrix in float64: the QR of a Gaussian matrix, with the signs of
    R's diagonal moved into Q."""
    q, r = np.linalg.qr(rng.standard_normal((width, width)))
    return q * np.sign(np.diag(r))


def random_rotation(width: int, seed: int, layer: int, index: int) -> np.ndarray:
    """The Haar-random orthogonal matrix fixed by (seed, layer, index), in float32."""
    return haar_matrix(np.random.default_rng([seed, layer, index]), width).astype(np.float32)


class DenseRotation:
    """An orthogonal matrix applied to rows: ``x @ q`` (2 width^2 multiply-adds a row)."""

    def __init__(self, matrix: np.ndarray | torch.Tensor):
        self.matrix = torch.as_tensor(matrix)

    def to(self, device: str | torch.device) -> DenseRotation:
        return DenseRotation(self.matrix.to(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


def odd_part(width: int) -> int:
    """``m`` of ``width = m 2^k`` with m odd."""
    return width >> ((width & -width).bit_length() - 1)


def hadamard(n: int) -> torch.Tensor:
    """The normalised Walsh-Hadamard matrix of order ``n`` (a power of two), symmetric and
    orthogonal, in float32."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / math.sqrt(n)).to(torch.float32)


class StructuredRotation:
    """A random orthogonal transform of rows of ``width`` features in O(width log width) work a
    row, fixed by (seed, layer, index).

    ``ROUNDS`` rounds, each: random signs on the features, then a Kronecker product of a few
    small orthogonal factors whose sizes multiply to ``width``; a random permutation of the
    features comes between rounds. Write ``width = m 2^k`` with m odd (768 = 3 x 256,
    896 = 7 x 128, 1024 = 1 x 1024). The factors are Hadamard matrices of powers of two, except
    the first, which takes the odd part: a Haar-random orthogonal matrix of size ``m 2^j``
    drawn for the round (a Hadamard matrix when m = 1). There are about log16(width) of them,
    of about equal size (768: 12 x 8 x 8; 1024: 8 x 16 x 8), so a round costs the sum of their
    sizes in multiply-adds a feature: O(log width) for every configured width (m <= 7); a
    width with a large odd part m costs about m more.

    A Kronecker product of orthogonal factors mixes every feature into every other, as a
    whole-width Hadamard transform does: one round sends a one-hot row to a row of nearly
    equal magnitudes, the second (after the permutation and new signs) to sums of many random
    signs in every feature, as a Haar rotation does. The rows are transformed features-first
    ([width, rows]): each factor is then one batched matrix product over its axis of the
    features, and the signs are folded into the innermost factor (a matrix for each block of
    its features).
    """

    ROUNDS = 2
    FACTOR = 16  # the size the factors stay about at or below

    def __init__(self, width: int, seed: int, layer: int, index: int):
        rng = np.random.default_rng([seed, layer, index])
        self.width = width
        sizes = self.factor_sizes(width)
        odd = odd_part(width)
        hadamards = [hadamard(size) for size in sizes[1:]]
        self.rounds = []
        for r in range(self.ROUNDS):
            permutation = torch.from_numpy(rng.permutation(width)) if r else None
            first = haar_matrix(rng, sizes[0]) if odd > 1 else None
            factors = [hadamard(sizes[0]) if first is None else torch.from_numpy(first).float()]
            factors += hadamards
            signs = torch.from_numpy(rng.choice(np.float32([-1, 1]), width))
            inner = len(factors[-1])  # one inner x inner matrix (factor @ diag(signs)) a block
            signed = factors[-1][None] * signs.view(width // inner, 1, inner)
            self.rounds.append((permutation, signed, factors[:-1]))

    @classmethod
    def factor_sizes(cls, width: int) -> list[int]:
        """The sizes of the factors, outermost first: about log_FACTOR(width) of about equal
        size, the first ``m 2^j`` (m the odd part of ``width``), the others powers of two."""
        odd = odd_part(width)
        stages = (width // odd).bit_length() - 1  # log2 of the power of two
        count = max(1, math.ceil(math.log2(width) / math.log2(cls.FACTOR)))
        if count == 1:
            return [width]
        own = min(stages, max(0, round(math.log2(width ** (1 / count) / odd))))
        rest, others = stages - own, count - 1
        sizes = [odd << own] + [1 << (rest // others + (i < rest % others)) for i in range(others)]
        return [size for size in sizes if size > 1] or [1]

    def to(self, device: str | torch.device) -> StructuredRotation:
        moved = copy.copy(self)
        moved.rounds = [
            (
                None if permutation is None else permutation.to(device),
                signed.to(device),
                [f.to(device) for f in outer],
            )
            for permutation, signed, outer in self.rounds
        ]
        return moved

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [rows, width] float32 -> the transformed rows, [rows, width] (a view of a
        features-first tensor; ``x`` is kept)."""
        rows = x.shape[0]
        y = x.t()
        for permutation, signed, outer in self.rounds:
            if permutation is not None:
                y = y.index_select(0, permutation)
            inner = signed.shape[-1]
            y = torch.matmul(signed, y.reshape(-1, inner, rows))  # signs, innermost factor
            right = inner * rows
            for factor in reversed(outer):  # then each factor over its axis, outwards
                f = len(factor)
                y = torch.matmul(factor, y.view(-1, f, right))
                right *= f
            y = y.view(self.width, rows)
        return y.t()


ROTATIONS = {
    "haar": lambda *key: DenseRotation(random_rotation(*key)),
    "structured": StructuredRotation,
}


def make_rotation(kind: str, width: int, seed: int, layer: int, index: int):
    """The rotation ``kind`` (haar: dense Haar-random; structured: :class:`StructuredRotation`)
    of ``width`` features, fixed by (seed, layer, index)."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation {kind!r}: one of {', '.join(ROTATIONS)}")
    return ROTATIONS[kind](width, seed, layer, index)
