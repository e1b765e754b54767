"""Data-parallel Block-AP with the work on the block's weights split over the group (ZeRO-2 style).

The D ranks of a group take the same step, and everything a step does to the block's weights (fake
quantization forward and backward, clipping, the optimizer) is the same on each of them: work that does
not shrink with the per-rank batch. Here each quantized linear has one owner in the group (the linears
dealt out by size), and a step goes:

  1. each rank fake-quantizes the linears it owns; the owners broadcast the quantized weights, and every
     rank runs the block with them as plain tensors (`QuantLinear.fixed_weight`, requiring grad);
  2. each linear's gradient is summed to its owner (half the traffic of an all-reduce): where the group's
     sums overlap the backward (torch.distributed: NCCL, gloo) one reduce per owner, started as soon as
     the backward has produced that owner's gradients, in owner order; on MPI one reduce-scatter after
     the backward. The rest (the norms, the loss) is summed over the group;
  3. the owner takes the fake quantization's backward from the summed gradient, and the clipping and
     the optimizer then see gradients only on the parameters this rank owns (AdamW skips the others, so
     its state is split too); the clipping's norm is summed over the group.

The arithmetic is the replicated path's, in another summation order: the quantizer's backward is linear
in the incoming gradient, so summing that gradient before it (here) or after it (GroupGradSum) differs
only in rounding. A linear's weights are current on its owner only; `sync()` broadcasts them before
anything reads the whole block (a validation pass, the end of training).
"""
from __future__ import annotations

import torch

from ..models.quantize import quant_linears


def deal_out(sizes: list[int], parts: int) -> list[int]:
    """The owner of each item: largest first, each to the least loaded part (ties: the lowest part), so
    the parts' totals are as even as whole items allow. The same on every rank (sizes only)."""
    load, owner = [0] * parts, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        part = min(range(parts), key=lambda p: (load[p], p))
        owner[i], load[part] = part, load[part] + sizes[i]
    return owner


def _params(linears) -> list[torch.Tensor]:
    """What a linear's owner trains: its weight, step sizes and zero points."""
    return [p for lin in linears for p in (lin.weight, lin.scale, lin.zero)]


class _Flat:
    """One owner's tensors laid end to end in a buffer (one collective per owner), float32 unless said."""

    def __init__(self, tensors: list[torch.Tensor], device, dtype: torch.dtype = torch.float32):
        self.shapes = [t.shape for t in tensors]
        self.buffer = torch.zeros(sum(t.numel() for t in tensors), dtype=dtype, device=device)

    def views(self) -> list[torch.Tensor]:
        out, offset = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(self.buffer[offset:offset + n].view(shape))
            offset += n
        return out

    def fill(self, tensors) -> None:
        for view, t in zip(self.views(), tensors):
            if t is None:
                view.zero_()
            else:
                view.copy_(t.detach())


class WeightShards:
    """One block's training steps with the weight work split over `group` (see the module's docstring).
    Holds per rank the gathered quantized weights (in the autocast dtype) and a buffer for their gradients
    (a float32 copy of the block's linear weights); AdamW holds state for the owned parameters only."""

    def __init__(self, block: torch.nn.Module, trainable: list[torch.nn.Parameter], group, device,
                 amp_dtype: torch.dtype | None = None):
        self.group, self.trainable = group, trainable
        self.linears = list(quant_linears(block).values())
        self.owner = deal_out([lin.weight.numel() for lin in self.linears], group.size)
        self.owned_by = owned_by = [[lin for lin, o in zip(self.linears, self.owner) if o == r]
                                    for r in range(group.size)]
        self.mine = owned_by[group.rank]
        in_linears = {id(p) for p in _params(self.linears)}
        self.shared = [p for p in trainable if id(p) not in in_linears]  # the norms: every rank steps them
        self.own_params = {id(p) for p in _params(self.mine)}
        self.shared_ids = {id(p) for p in self.shared}
        # Under bfloat16 autocast every linear multiplies by its weight rounded to bfloat16, and its gradient
        # comes back through that rounding: broadcasting the rounded weight is the same arithmetic at half
        # the bytes (the gradients are still summed in float32).
        self.quantized = [_Flat([lin.weight for lin in linears], device, amp_dtype or torch.float32)
                          for linears in owned_by]
        # the weights' gradients, owner after owner in rank order: one reduce-scatter sums them
        self.grads = _Flat([lin.weight for linears in owned_by for lin in linears], device)
        self.counts = [sum(lin.weight.numel() for lin in linears) for linears in owned_by]
        self._first_mine = sum(len(linears) for linears in owned_by[:group.rank])
        self.rest = _Flat(self.shared + [torch.zeros(1)], device)  # the shared gradients, then the loss
        self._own_graph: list[torch.Tensor] = []  # this step's fake-quantized weights of `mine`, with their graph
        self.stale = False  # the owners' weights moved since the last sync

    def begin_step(self) -> None:
        """Fake-quantize this rank's linears and gather everyone's: the block is ready to run."""
        self._own_graph = [lin.quantized_weight() for lin in self.mine]
        self.quantized[self.group.rank].fill(self._own_graph)
        self._broadcast(self.quantized)
        self._arrived, self._started, self._handles = set(), 0, []
        for linears, flat in zip(self.owned_by, self.quantized):
            for lin, view in zip(linears, flat.views()):
                lin.fixed_weight = view.detach().requires_grad_()
        if self.group.overlaps_backward:  # each owner's sum starts once the backward has its gradients
            for k, lin in enumerate(lin for linears in self.owned_by for lin in linears):
                lin.fixed_weight.register_post_accumulate_grad_hook(self._on_grad(k))

    def _on_grad(self, k: int):
        def hook(weight):
            self.grads.views()[k].copy_(weight.grad)
            self._arrived.add(k)
            self._start_owners()
        return hook

    def _start_owners(self, last: bool = False) -> None:
        """Start the owners' sums whose gradients are all in, in owner order (every rank the same sums in
        the same order); at the end of the step (`last`) the rest, with what never came in as zeros."""
        first = sum(len(linears) for linears in self.owned_by[:self._started])
        while self._started < len(self.owned_by):
            indices = range(first, first + len(self.owned_by[self._started]))
            if not last and not set(indices) <= self._arrived:
                return
            segment = self.grads.buffer.split(self.counts)[self._started]
            if segment.numel():
                self._handles.append(self.group.start_reduce_(segment, self._started))
            first, self._started = first + len(indices), self._started + 1

    def _broadcast(self, flats: list[_Flat]) -> None:
        self.group.finish([self.group.start_broadcast_(flat.buffer, r) for r, flat in enumerate(flats)
                           if flat.buffer.numel()])

    def finish_step(self, loss: torch.Tensor) -> torch.Tensor:
        """After the backward: the summed gradients where they belong, and the group's loss."""
        if self.group.overlaps_backward:  # started in the backward as they came: the rest now
            views = self.grads.views()
            for k, lin in enumerate(lin for linears in self.owned_by for lin in linears):
                if k not in self._arrived:  # no gradient reached it (a rank without windows this step)
                    views[k].zero_() if lin.fixed_weight.grad is None else views[k].copy_(lin.fixed_weight.grad)
            self._start_owners(last=True)
            handles = self._handles
        else:  # MPI: one reduce-scatter after the backward (its sums progress only inside MPI calls)
            self.grads.fill([lin.fixed_weight.grad for linears in self.owned_by for lin in linears])
            handles = self.group.start_reduce_scatter_(self.grads.buffer, self.counts)
        self.rest.fill([p.grad for p in self.shared] + [loss.reshape(1)])
        handles.append(self.group.start_sum_(self.rest.buffer))
        self.group.finish(handles)
        for lin in self.linears:
            lin.fixed_weight = None
        if self._own_graph:
            mine = self.grads.views()[self._first_mine:self._first_mine + len(self.mine)]
            torch.autograd.backward(self._own_graph, mine)
        self._own_graph = []
        *shared, total = self.rest.views()
        for p, grad in zip(self.shared, shared):
            p.grad = grad.clone()
        self.stale = True
        return total[0].clone()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole block, from the gradients split over the group:
        each parameter's norm from its owner (the shared ones from rank 0), summed into one vector."""
        counted = self.own_params | (self.shared_ids if self.group.rank == 0 else set())
        owned = [p for p in self.trainable if p.grad is not None and id(p) in counted]
        norms = torch.zeros(len(self.trainable), dtype=torch.float32, device=self.rest.buffer.device)
        if owned:
            values = torch._foreach_norm([p.grad for p in owned])
            index = {id(p): i for i, p in enumerate(self.trainable)}
            norms[torch.tensor([index[id(p)] for p in owned], device=norms.device)] = torch.stack(values).float()
        self.group.allreduce_sum_(norms)
        total = torch.linalg.vector_norm(norms, 2)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return total

    def sync(self) -> None:
        """Every linear's weight, step sizes and zero points from its owner, on every rank."""
        if not self.stale:
            return
        device = self.rest.buffer.device
        # built for the sync alone (a few per block): not another copy of the block held through training
        flats = [_Flat(_params(linears), device) for linears in self.owned_by]
        flats[self.group.rank].fill(_params(self.mine))
        self._broadcast(flats)
        with torch.no_grad():
            for linears, flat in zip(self.owned_by, flats):
                for p, view in zip(_params(linears), flat.views()):
                    p.copy_(view)
        self.stale = False

    def close(self) -> None:
        for lin in self.linears:
            lin.fixed_weight = None
        self.sync()
