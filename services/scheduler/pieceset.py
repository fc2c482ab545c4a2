"""A peer's pieces as the bits of one integer.

The scheduler holds the pieces of every peer of every task: as a ``set`` of 256 numbers that
was 8-16 KiB a peer (``bench/core.py --tasks``); as bits it is 60 bytes, and the set
operations a decision makes (what a parent has that a child lacks, how many) are a few
machine words each instead of a loop over Python ints.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def _bits(pieces: Iterable[int]) -> int:
    if isinstance(pieces, PieceSet):
        return pieces._bits
    bits = 0
    for number in pieces:
        bits |= 1 << number
    return bits


class PieceSet:
    """Piece numbers (non-negative), with the part of ``set``'s API the scheduler uses."""

    __slots__ = ("_bits", "_count")

    def __init__(self, pieces: Iterable[int] = ()) -> None:
        self._bits = _bits(pieces)
        self._count = self._bits.bit_count()

    @classmethod
    def _of(cls, bits: int) -> PieceSet:
        made = cls.__new__(cls)
        made._bits, made._count = bits, bits.bit_count()
        return made

    def __contains__(self, number: object) -> bool:
        return isinstance(number, int) and number >= 0 and (self._bits >> number) & 1 == 1

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._bits != 0

    def __iter__(self) -> Iterator[int]:
        """Lowest first."""
        bits = self._bits
        while bits:
            low = bits & -bits
            yield low.bit_length() - 1
            bits ^= low

    def __sub__(self, other: Iterable[int]) -> PieceSet:
        return PieceSet._of(self._bits & ~_bits(other))

    def __rsub__(self, other: Iterable[int]) -> set[int]:
        return {n for n in other if n not in self}

    def count_missing(self, other: PieceSet) -> int:
        """``len(self - other)``, without building the difference: a decision asks it of
        every candidate parent."""
        return (self._bits & ~other._bits).bit_count()

    def __or__(self, other: Iterable[int]) -> PieceSet:
        return PieceSet._of(self._bits | _bits(other))

    def __and__(self, other: Iterable[int]) -> PieceSet:
        return PieceSet._of(self._bits & _bits(other))

    def __ior__(self, other: Iterable[int]) -> PieceSet:
        self._bits |= _bits(other)
        self._count = self._bits.bit_count()
        return self

    def __isub__(self, other: Iterable[int]) -> PieceSet:
        self._bits &= ~_bits(other)
        self._count = self._bits.bit_count()
        return self

    def add(self, number: int) -> None:
        self._bits |= 1 << number
        self._count = self._bits.bit_count()

    def discard(self, number: int) -> None:
        self._bits &= ~(1 << number)
        self._count = self._bits.bit_count()

    def copy(self) -> PieceSet:
        return PieceSet._of(self._bits)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PieceSet):
            return self._bits == other._bits
        if isinstance(other, set | frozenset):
            return set(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like set

    def __repr__(self) -> str:
        return f"PieceSet({sorted(self)})"
