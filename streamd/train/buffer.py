"""The shuffle buffer: consecutive tokens of one document are correlated, so batches are drawn at random from a large
pool and only the slots served are refilled from the stream.

Each slot remembers where its token came from (source index, offset) and when it arrived, so that a checkpoint can
name, per partition, the lowest offset whose tokens are not all trained yet: everything from there is read again on
resume and nothing is lost. Random replacement alone lets a few tokens linger for ever, which would pin that offset;
a token older than ``max_age`` ingested tokens is therefore served with the next batch. With ``max_age`` = 8 buffer
fulls that touches about e^-8 = 0.03% of tokens, too few to correlate a batch, and it bounds re-reads after a resume.

Data, bookkeeping and the sampling generator live on the buffer's device, and a draw is one ``rand`` and one
``topk`` there (overdue slots get keys below every random one): on a GPU a step never waits for the host.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class ShuffleBuffer:
    def __init__(
        self,
        capacity: int,
        d_in: int,
        batch_size: int,
        *,
        max_age: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size > capacity:
            raise ValueError(f"batch_size {batch_size} exceeds buffer capacity {capacity}")
        self.capacity, self.d_in, self.batch_size, self.max_age = capacity, d_in, batch_size, max_age
        self.device = torch.device(device)
        self.data = torch.empty(capacity, d_in, dtype=dtype, device=self.device)
        dev = self.device
        self.source = torch.full((capacity,), -1, dtype=torch.int32, device=dev)
        self.offset = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.arrival = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.ingested = 0  # tokens ever added
        self.served = 0  # tokens ever sampled
        self._free = torch.arange(capacity, device=dev)  # slots to fill next, in order
        self._next_free = 0
        seed = 0 if generator is None else generator.initial_seed()
        if generator is not None and generator.device == dev:
            self._gen = generator
        else:
            self._gen = torch.Generator(device=dev).manual_seed(seed)

    @property
    def rng_state(self) -> torch.Tensor:
        """The state of the sampling generator (in a checkpoint, so a resumed run draws the same batches)."""
        return self._gen.get_state()

    @rng_state.setter
    def rng_state(self, state: torch.Tensor) -> None:
        try:
            self._gen.set_state(state)
        except (RuntimeError, ValueError) as e:  # saved by a buffer on another kind of device
            log.warning("the saved sampling state does not fit a %s generator (%s): batches are drawn afresh",
                        self.device.type, e)

    @property
    def free_slots(self) -> int:
        return len(self._free) - self._next_free

    @property
    def fill_ratio(self) -> float:
        return 1.0 - self.free_slots / self.capacity

    @property
    def full(self) -> bool:
        return self.free_slots == 0

    def add(self, acts: torch.Tensor, source: int, offset: int) -> int:
        """Copy as many rows of ``acts`` as there are free slots; returns how many were taken."""
        if acts.shape[-1] != self.d_in:
            raise ValueError(f"activations have d_model {acts.shape[-1]}, the buffer holds {self.d_in}")
        k = min(self.free_slots, acts.shape[0])
        if k == 0:
            return 0
        slots = self._free[self._next_free : self._next_free + k]
        self._next_free += k
        # copy at the source's dtype (fp16 from the wire: half the bytes), convert on the device
        self.data[slots] = acts[:k].to(self.device, non_blocking=True).to(self.data.dtype)
        self.source[slots] = source
        self.offset[slots] = offset
        self.arrival[slots] = self.ingested + torch.arange(k, device=self.device)
        self.ingested += k
        return k

    def sample(self) -> torch.Tensor:
        """Draw one batch (float32) from a full buffer; the slots served become free for the stream to refill."""
        if not self.full:
            raise RuntimeError("the shuffle buffer must be full before sampling")
        b = self.batch_size
        # a uniform random subset of b slots, overdue ones first: their keys lie in [-2, -1), the others in [0, 1)
        keys = torch.rand(self.capacity, generator=self._gen, device=self.device)
        keys -= 2.0 * (self.arrival < self.ingested - self.max_age)
        slots = keys.topk(b, largest=False, sorted=False).indices
        batch = self.data[slots].float()
        self.last_origins = (self.source[slots].clone(), self.offset[slots].clone())
        self.source[slots] = -1
        self._free, self._next_free = slots, 0
        self.served += b
        return batch

    def sample_rest(self) -> torch.Tensor | None:
        """After a finite source ended: up to ``batch_size`` of the tokens still held, drawn at random, each served
        once (the last batch may be smaller); None when none is left."""
        live = (self.source >= 0).nonzero().flatten()
        if len(live) == 0:
            return None
        slots = live[torch.randperm(len(live), generator=self._gen, device=self.device)[: self.batch_size]]
        batch = self.data[slots].float()
        self.last_origins = (self.source[slots].clone(), self.offset[slots].clone())
        self.source[slots] = -1
        self._free, self._next_free = torch.cat([self._free[self._next_free :], slots]), 0
        self.served += len(slots)
        return batch

    def pending_offsets(self) -> dict[int, int]:
        """Per source index, the lowest offset that still has an untrained token in the buffer."""
        live = self.source >= 0
        out: dict[int, int] = {}
        for s in self.source[live].unique().tolist():
            out[s] = int(self.offset[self.source == s].min())
        return out
