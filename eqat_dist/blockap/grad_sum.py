"""Sum a block's gradients (and the step's loss) over its data-parallel group, overlapped with the
backward: the parameters are split into buckets of about BUCKET_BYTES, in the reverse of their order
(the order the backward produces their gradients); a bucket's sum starts as soon as its last gradient
is in and every bucket before it has started (every rank must start the same sums in the same order).
A parameter the backward did not reach (a rank whose share of a step is empty, a parameter without
a gradient) is summed as zeros at the end of the step. A group that cannot overlap (MPI: its sums go
through host memory and progress only inside MPI calls) sums every bucket at the end of the step.
"""
from __future__ import annotations

import torch

BUCKET_BYTES = 32 * 2**20  # as DDP's default order of size: large enough per collective, several per block


class GroupGradSum:
    def __init__(self, params: list, group, device: torch.device, bucket_bytes: int | None = None):
        self.params, self.group = params, group
        bucket_bytes = bucket_bytes or BUCKET_BYTES
        self.buckets: list[list[int]] = []  # parameter indices, in start order
        size = 0
        for i in reversed(range(len(params))):
            if not self.buckets or size + params[i].numel() * 4 > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += params[i].numel() * 4
        self.flats = [torch.empty(sum(params[i].numel() for i in b) + (k == len(self.buckets) - 1),
                                  dtype=torch.float32, device=device) for k, b in enumerate(self.buckets)]
        self.offsets, self.bucket_of = {}, {}
        for k, bucket in enumerate(self.buckets):
            offset = 0
            for i in bucket:
                self.offsets[i], self.bucket_of[i] = offset, k
                offset += params[i].numel()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad(i)) for i, p in enumerate(params)] \
            if getattr(group, "overlaps_backward", False) else []
        self._reset()

    def _reset(self) -> None:
        self.filled = [set() for _ in self.buckets]
        self.started = 0  # buckets started, in order
        self.handles = []

    def _view(self, i: int) -> torch.Tensor:
        offset = self.offsets[i]
        return self.flats[self.bucket_of[i]][offset:offset + self.params[i].numel()]

    def _on_grad(self, i: int):
        def hook(param):
            self._view(i).copy_(param.grad.reshape(-1))
            self.filled[self.bucket_of[i]].add(i)
            self._start_ready(last=False)
        return hook

    def _start_ready(self, last: bool) -> None:
        """Start the buckets that are complete, in order (the last one holds the loss: at the end)."""
        while self.started < len(self.buckets) - (not last) and \
                len(self.filled[self.started]) == len(self.buckets[self.started]):
            self.handles.append(self.group.start_sum_(self.flats[self.started]))
            self.started += 1

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """After the step's backward (or instead of it): finish every sum, put the sums in the gradients,
        and return the group's loss."""
        for k, bucket in enumerate(self.buckets):
            for i in bucket:
                if i not in self.filled[k]:  # not copied by a hook; no gradient: it adds nothing
                    grad = self.params[i].grad
                    if grad is None:
                        self._view(i).zero_()
                    else:
                        self._view(i).copy_(grad.reshape(-1))
                    self.filled[k].add(i)
        self.flats[-1][-1] = loss.detach().float()
        self._start_ready(last=True)
        self.group.finish(self.handles)
        for i, p in enumerate(self.params):
            view = self._view(i).view_as(p)
            if p.grad is None:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)
        total = self.flats[-1][-1].clone()
        self._reset()
        return total

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
