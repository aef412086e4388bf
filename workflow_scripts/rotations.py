"""The random orthogonal transforms of the rotated kurtosis (``stats.rotation``), each fixed by
(seed, layer, index) and applied to rows of ``width`` features in float32.

  haar        a dense Haar-random rotation: the QR of a Gaussian matrix, 2 width^2 multiply-adds
              a row;
  structured  :class:`StructuredRotation`: random signs, Hadamard transforms, small Haar factors
              and a random permutation, O(width log width) multiply-adds a row.
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

    Write ``width = m 2^k`` with ``m`` odd (768 = 3 x 256, 896 = 7 x 128, 1024 = 1 x 1024). The
    transform is ``ROUNDS`` rounds, each: random signs on the features, then the Kronecker product
    ``Q_m (x) H_{2^k}`` of a Haar-random ``m x m`` orthogonal matrix (drawn for the round; none
    when m = 1) and the normalised Hadamard matrix; a random permutation of the features comes
    between rounds. ``Q_m (x) H_{2^k}`` mixes every feature into every other, as a whole-width
    Hadamard transform does; one round sends a one-hot row to a row of equal magnitudes (for
    m = 1), the second round, after the permutation and new signs, to sums of many random signs
    in every feature, as a Haar rotation does.

    H_{2^k} is itself the Kronecker product of Hadamard factors of at most ``FACTOR`` (H_256 =
    H_16 (x) H_16), so a round is a few matrix products, each of one small factor over its axis
    of the features: ``m + sum of factors`` multiply-adds a feature, O(log width) for the odd
    parts of every configured width (m <= 7); a width with a large odd part m costs m more. The
    rows are transformed features-first ([width, rows]), where each factor is one batched matrix
    product over contiguous memory; the signs are folded into the innermost factor (a matrix per
    block of its features).
    """

    ROUNDS = 2
    FACTOR = 16  # the largest Hadamard factor

    def __init__(self, width: int, seed: int, layer: int, index: int):
        rng = np.random.default_rng([seed, layer, index])
        self.width = width
        odd = width >> ((width & -width).bit_length() - 1)
        stages = (width // odd).bit_length() - 1  # log2 of the power of two
        count = -(-stages // (self.FACTOR.bit_length() - 1))  # factors of at most FACTOR
        hadamards = [hadamard(1 << (stages // count + (i < stages % count))) for i in range(count)]
        self.rounds = []
        for r in range(self.ROUNDS):
            permutation = torch.from_numpy(rng.permutation(width)) if r else None
            odd_factor = haar_matrix(rng, odd) if odd > 1 or not hadamards else None
            factors = [torch.from_numpy(odd_factor).float()] if odd_factor is not None else []
            factors += hadamards
            signs = torch.from_numpy(rng.choice(np.float32([-1, 1]), width))
            inner = len(factors[-1])  # one inner x inner matrix (factor @ diag(signs)) a block
            signed = factors[-1][None] * signs.view(width // inner, 1, inner)
            self.rounds.append((permutation, signed, factors[:-1]))

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
