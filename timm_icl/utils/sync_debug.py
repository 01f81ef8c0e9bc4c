"""Count what would make a CUDA step wait for the device, on any device (the CPU included).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches the synchronising calls as they happen. Without a
GPU, :class:`SyncCounter` counts them by name, so the test suite can assert that a training step has none:

- **sync ops** (a ``TorchDispatchMode``): the aten ops whose CUDA kernel must read a result back before returning:
  ``_local_scalar_dense`` (``item()``, ``float()``, ``int()``, ``bool()``), ``is_nonzero``, ``nonzero``, ``unique``
  (every variant), ``masked_select``, ``repeat_interleave`` without ``output_size``, ``bincount``, ``equal``, and
  indexing / ``index_put_`` with a boolean mask (the output's size depends on the mask's values);
- **host reads** (a ``TorchFunctionMode``): ``tolist()``, ``numpy()``, ``cpu()``, ``.to("cpu")``: a
  device-to-host copy on CUDA;
- **host data**: ``torch.tensor(...)`` / ``torch.as_tensor(non-tensor)`` (a tensor made from Python data: a
  blocking host-to-device copy when it lands on a GPU) and ``.to(device)`` / ``.cuda()`` of a CPU tensor without
  ``non_blocking=True`` (a blocking copy; the loader's pinned batches move with ``non_blocking=True``).

On CPU a ``.to(device)`` of a CPU tensor is a no-op, so the last rule counts the *call*: code that keeps its tables
per device never makes it. Each event records where in timm_icl / recipes / benchmarks it came from.

Example:
    >>> with SyncCounter() as sync:
    ...     x = torch.rand(4)
    ...     _ = x[x > 0.5]          # a boolean mask: the output size depends on the data
    ...     _ = float(x.sum())      # item()
    >>> sync.total, sorted(sync.counts)
    (2, ['_local_scalar_dense', 'index(bool mask)'])
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SyncEvent", "SYNC_OPS", "host_side"]

_HOST_SIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("timm_icl_host_side", default=False)


@contextlib.contextmanager
def host_side():
    """Mark a block that works on host tensors on purpose (the loader's CPU ids and labels, a CPU table read
    before one ``non_blocking`` copy): :class:`SyncCounter` does not count inside it. On a CPU-only machine the
    counter cannot tell a host tensor from a device one, so the code says which is which, and review checks it."""
    token = _HOST_SIDE.set(True)
    try:
        yield
    finally:
        _HOST_SIDE.reset(token)


aten = torch.ops.aten

#: aten overload packets whose CUDA kernels synchronise with the host (their result size or value is read back).
SYNC_OPS = {
    aten._local_scalar_dense: "_local_scalar_dense",
    aten.is_nonzero: "is_nonzero",
    aten.nonzero: "nonzero",
    aten.argwhere: "nonzero",
    aten._unique: "unique",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique",
    aten.unique_dim_consecutive: "unique",
    aten.masked_select: "masked_select",
    aten.bincount: "bincount",
    aten.equal: "equal",
}

_MASKED = {
    aten.index: "index(bool mask)",
    aten.index_put: "index_put(bool mask)",
    aten.index_put_: "index_put(bool mask)",
}


@dataclass(frozen=True)
class SyncEvent:
    """One counted call: ``kind`` (``"sync"``, ``"host_read"``, ``"host_data"``), the op's name and where it came from
    (the innermost frame in timm_icl, recipes, benchmarks or tests)."""

    kind: str
    op: str
    where: str


def _where() -> str:
    for frame in reversed(traceback.extract_stack(limit=40)[:-3]):
        name = frame.filename.replace("\\", "/")
        if "/sync_debug.py" in name or "/torch/" in name:
            continue
        if any(part in name for part in ("/timm_icl/", "/recipes/", "/benchmarks/", "/tests/")):
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: SyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            if not (self.owner._scalar_read and packet in (aten._local_scalar_dense, aten.is_nonzero)):
                self.owner._add("sync", SYNC_OPS[packet])
        elif packet in _MASKED and _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
            self.owner._add("sync", _MASKED[packet])
        elif packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
            if kwargs.get("output_size") is None:
                self.owner._add("sync", "repeat_interleave")
        elif packet is aten.repeat_interleave and func is aten.repeat_interleave.self_Tensor:
            if kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
                self.owner._add("sync", "repeat_interleave")
        return func(*args, **kwargs)


def _is_device(value) -> bool:
    return isinstance(value, torch.device) or (
        isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda", "mps", "xpu", "meta", "hpu")
    )


#: Tensor methods that read one value back to Python (``item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``if t:``).
_SCALAR_READS = (
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
)


class _Function(TorchFunctionMode):
    def __init__(self, owner: SyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in _SCALAR_READS and args and isinstance(args[0], torch.Tensor):
            # counted here, not by the dispatch mode: under torch.inference_mode a scalar read skips the Python
            # dispatch key, so _local_scalar_dense would go unseen there
            self.owner._add("sync", "_local_scalar_dense")
            self.owner._scalar_read += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.owner._scalar_read -= 1
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu):
            self.owner._add("host_read", name)
        elif func is torch.tensor:
            self.owner._add("host_data", "torch.tensor")
        elif func is torch.as_tensor and args and not isinstance(args[0], torch.Tensor):
            self.owner._add("host_data", "torch.as_tensor")
        elif func in (torch.Tensor.to, torch.Tensor.cuda) and args and isinstance(args[0], torch.Tensor):
            device = kwargs.get("device")
            if device is None:
                device = next((a for a in args[1:] if _is_device(a)), None)
            if func is torch.Tensor.cuda:
                device = device or "cuda"
            if device is not None:
                target = torch.device(device)
                if target.type == "cpu" and args[0].device.type != "cpu":
                    self.owner._add("host_read", "to(cpu)")
                elif args[0].device.type == "cpu" and not kwargs.get("non_blocking", False):
                    if target.type != "cpu" or self.owner.count_cpu_moves:
                        self.owner._add("host_data", "to(device)")
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager counting sync-forcing ops, host reads and host data (see the module's docstring).

    Args:
        count_cpu_moves: count ``.to(device)`` of a CPU tensor even when ``device`` is the CPU (default True: on a
            CPU-only machine this is how a per-step host-to-device copy shows).
        record_where: record the source line of each event (a stack walk per event; events should be rare).

    Attributes after the block: ``events`` (list of :class:`SyncEvent`), ``counts`` (``Counter`` by op name),
    ``total`` (all events), ``syncs`` / ``host_reads`` / ``host_data`` (by kind).
    """

    def __init__(self, *, count_cpu_moves: bool = True, record_where: bool = True):
        self.count_cpu_moves = count_cpu_moves
        self.record_where = record_where
        self.events: list[SyncEvent] = []
        self._modes: list = []
        self._busy = False
        self._scalar_read = 0

    def _add(self, kind: str, op: str) -> None:
        if self._busy or _HOST_SIDE.get():  # the stack walk itself must not be counted; nor marked host work
            return
        self._busy = True
        try:
            self.events.append(SyncEvent(kind, op, _where() if self.record_where else ""))
        finally:
            self._busy = False

    def __enter__(self) -> SyncCounter:
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    @property
    def counts(self) -> collections.Counter:
        return collections.Counter(e.op for e in self.events)

    @property
    def total(self) -> int:
        return len(self.events)

    def _of(self, kind: str) -> int:
        return sum(e.kind == kind for e in self.events)

    @property
    def syncs(self) -> int:
        return self._of("sync")

    @property
    def host_reads(self) -> int:
        return self._of("host_read")

    @property
    def host_data(self) -> int:
        return self._of("host_data")

    def summary(self) -> str:
        """One line per distinct (kind, op, where), most frequent first: what to fix."""
        counts = collections.Counter((e.kind, e.op, e.where) for e in self.events)
        return "\n".join(f"{n:5d}  {kind:9s} {op:22s} {where}" for (kind, op, where), n in counts.most_common())
