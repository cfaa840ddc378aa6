"""The all-to-all token dispatcher: token-slots travel to the rank that owns their expert and back.

Legend: M kept token-slots on this rank (sorted by global expert), R slots this rank received, D model dim,
E experts in all, L = E / W local experts, W ranks in the expert-parallel group.

The local path is `gather -> experts(x_MD, counts_E, scale_M) -> combine`. With experts spread over W ranks, the
middle step becomes `dispatch -> local experts -> combine` here, and the MoE layer does not change otherwise:

1. counts: every rank sends each rank the L per-expert counts of the experts that rank owns (all_to_all of E
   integers) and learns how many rows each source sends to each of its local experts;
2. tokens: the M rows are already sorted by expert and rank w owns experts [w*L, (w+1)*L), so each destination's
   rows are one contiguous block: one all_to_all_single with uneven splits (and one for the combine weights);
3. the received rows, ordered (source, local expert), are regrouped to (local expert, source) by a stable sort,
   the local experts run on them with the grouped path (`Experts.forward(x, counts, scale)`), the rows are put
   back in (source, expert) order and sent back by the reverse all_to_all.

Every collective runs on every rank whatever the routing (a rank or an expert with no rows sends and receives
empty blocks), the device is the input's, and the order of the returned rows is the order they were sent in, so
`dispatch.combine` sums each token's slots exactly as on one process (deterministic). Autograd: the backward of an
all-to-all is the all-to-all with the splits swapped (`_AllToAll`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_counters: list["CommBytes"] = []


@dataclass
class CommBytes:
    """Bytes this rank passed to all_to_all, counting only rows bound for other ranks (its own stay put).

    Attributes:
        tokens: bytes of token rows (dispatch and combine, forward and backward).
        weights: bytes of the combine weights sent along with the rows.
        counts: bytes of the per-expert count exchange.
        calls: all_to_all calls.
    """

    tokens: int = 0
    weights: int = 0
    counts: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.tokens + self.weights + self.counts


@contextmanager
def count_bytes():
    """Count what this rank sends through the dispatcher's all-to-alls inside the block.

    Yields:
        A CommBytes filled in as the block runs (backward included if it runs inside).
    """
    counter = CommBytes()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _record(kind: str, t: Tensor, input_splits: list[int], group) -> None:
    if not _counters:
        return
    row_bytes = t.element_size() * (t[0].numel() if t.dim() > 1 else 1)
    sent = (sum(input_splits) - input_splits[dist.get_rank(group)]) * row_bytes
    for counter in _counters:
        setattr(counter, kind, getattr(counter, kind) + sent)
        counter.calls += 1


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0; backward is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group, kind: str) -> Tensor:  # type: ignore[override]
        ctx.output_splits, ctx.input_splits, ctx.group, ctx.kind = output_splits, input_splits, group, kind
        return _all_to_all(x, output_splits, input_splits, group, kind)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_in = _AllToAll.apply(grad.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group, ctx.kind)
        return grad_in, None, None, None, None


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group, kind: str) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    _record(kind, x, input_splits, group)
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group, kind: str = "tokens") -> Tensor:
    """Differentiable all_to_all_single along dim 0.

    Args:
        x: [sum(input_splits), ...] rows, block w bound for rank w of `group`.
        output_splits: rows to receive from each rank.
        input_splits: rows to send to each rank.
        group: the process group.
        kind: which CommBytes field the bytes count under ("tokens", "weights").
    Returns:
        [sum(output_splits), ...] rows, block w from rank w.
    """
    return _AllToAll.apply(x, output_splits, input_splits, group, kind)


@dataclass
class _Route:
    """What dispatch learned and combine needs: the splits and the (source, expert) <-> (expert, source) order."""

    input_splits: list[int]  # rows this rank sent to each rank
    output_splits: list[int]  # rows this rank received from each rank
    order_R: Tensor | None  # received row of each local row (None: already in order, one local expert)
    inverse_R: Tensor | None  # local row of each received row


class AllToAllDispatcher:
    """Moves expert-sorted token-slots to the ranks owning their experts and the results back.

    Args:
        num_experts: E, experts in all (divisible by the group's size).
        group: the expert-parallel process group; rank w of it owns experts [w*E/W, (w+1)*E/W).
    """

    def __init__(self, num_experts: int, group) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the expert-parallel size {self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    @property
    def local_experts(self) -> range:
        """The global indices of this rank's experts."""
        return range(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)

    def dispatch(self, x_MD: Tensor, counts_E: Tensor, scale_M: Tensor | None = None):
        """Send every row to its expert's rank.

        Args:
            x_MD: [M, D] rows sorted by global expert (the local `dispatch.gather` output).
            counts_E: [E] int64 rows per global expert.
            scale_M: optional [M] combine weights, travelling with their rows.
        Returns:
            (x_RD [R, D] rows for this rank's experts grouped by local expert, counts_L [L] int64 rows per local
            expert, scale_R [R] or None, route: pass it to `combine`).
        """
        W, L = self.ep_size, self.num_local
        if counts_E.numel() != self.num_experts:
            raise ValueError(f"counts_E has {counts_E.numel()} entries, expected num_experts={self.num_experts}")
        counts_E = counts_E.to(torch.long).contiguous()
        recv_counts = torch.empty_like(counts_E)  # [W * L]: (source rank, local expert)
        if _counters:
            _record("counts", counts_E, [L] * W, self.group)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_WL = recv_counts.view(W, L)
        # One host sync for both split lists (all_to_all_single needs them as Python ints).
        splits = torch.cat([counts_E.view(W, L).sum(1), recv_WL.sum(1)]).tolist()
        input_splits, output_splits = splits[:W], splits[W:]
        x_RD = all_to_all(x_MD, output_splits, input_splits, self.group, "tokens")
        scale_R = None if scale_M is None else all_to_all(scale_M, output_splits, input_splits, self.group, "weights")
        counts_L = recv_WL.sum(0)
        order_R = inverse_R = None
        if L > 1 and W > 1:
            chunk_R = torch.repeat_interleave(
                torch.arange(W * L, device=x_MD.device), recv_counts.to(x_MD.device), output_size=x_RD.shape[0]
            )
            key_R = (chunk_R % L) * W + chunk_R // L  # (local expert, source): stable sort keeps each source's order
            order_R = torch.sort(key_R, stable=True).indices
            rows_R = torch.arange(order_R.numel(), device=x_MD.device)
            inverse_R = torch.empty_like(order_R).scatter_(0, order_R, rows_R)
            x_RD = x_RD.index_select(0, order_R)
            if scale_R is not None:
                scale_R = scale_R.index_select(0, order_R)
        return x_RD, counts_L, scale_R, _Route(input_splits, output_splits, order_R, inverse_R)

    def combine(self, y_RD: Tensor, route: _Route) -> Tensor:
        """Send the local experts' outputs back to the ranks the rows came from.

        Args:
            y_RD: [R, D] outputs, row-aligned with `dispatch`'s x_RD.
            route: `dispatch`'s route.
        Returns:
            [M, D] outputs in the order of `dispatch`'s x_MD.
        """
        if route.inverse_R is not None:
            y_RD = y_RD.index_select(0, route.inverse_R)
        return all_to_all(y_RD, route.input_splits, route.output_splits, self.group, "tokens")
