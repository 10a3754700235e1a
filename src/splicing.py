"""Domain-switch sequences: token streams of several domains spliced by a plan (A→B→A, A→Mix→A), for probing how
a router or a memory follows a change of domain. Pure tensor code, shared by data modules and analyses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from src.errors import EngramError


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of a composed sequence, drawn from one domain or alternating between several (a mix)."""

    domains: tuple[int, ...]
    start: int
    end: int


def compose_sequence(
    streams: Sequence[torch.Tensor],
    plan: Sequence[tuple[int | Sequence[int], int]],
    generator: torch.Generator,
    mix_chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, list[Segment]]:
    """Splice a domain-switch sequence such as A→B→A (``[(a, 64), (b, 64), (a, 64)]``) or A→Mix→A
    (``[(a, 64), ((a, b), 64), (a, 64)]``: the mix alternates chunks of ``mix_chunk`` tokens of a and b).

    Every single-domain segment is one contiguous span of its stream at a random offset; a mix's chunks are spans at
    independent offsets. Returns ``input_ids`` ``[T]``, the per-token domain ``[T]`` and the segments.
    """
    ids: list[torch.Tensor] = []
    token_domains: list[torch.Tensor] = []
    segments: list[Segment] = []
    start = 0
    for spec, length in plan:
        domains = (spec,) if isinstance(spec, int) else tuple(spec)
        chunk = length if len(domains) == 1 else mix_chunk
        if length < 1 or chunk < 1:
            raise EngramError(f"segment {spec} of length {length} (mix_chunk={mix_chunk}): lengths must be ≥ 1.")
        filled, turn = 0, 0
        while filled < length:
            d = domains[turn % len(domains)]
            if not 0 <= d < len(streams):
                raise EngramError(f"plan names domain {d}; there are {len(streams)} domains (0..{len(streams) - 1}).")
            n = min(chunk, length - filled)
            if len(streams[d]) < n:
                raise EngramError(f"domain {d} has {len(streams[d])} tokens, fewer than a {n}-token segment needs.")
            offset = int(torch.randint(0, len(streams[d]) - n + 1, (1,), generator=generator))
            ids.append(streams[d][offset : offset + n])
            token_domains.append(torch.full((n,), d))
            filled, turn = filled + n, turn + 1
        segments.append(Segment(domains, start, start + length))
        start += length
    return torch.cat(ids), torch.cat(token_domains), segments
