"""Find, on CPU, every place a training step would make the host wait for the GPU.

A host read of a device value (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``),
an op whose output size depends on device data (``nonzero``, boolean indexing, ``repeat_interleave``
without ``output_size``, ``unique``, ``masked_select``), and a blocking host→device copy (PyTorch
copies pageable memory with ``cudaMemcpyAsync`` then ``cudaStreamSynchronize`` unless
``non_blocking``) each stall the host until the GPU has run everything queued before it. On CPU they
cost nothing and the profiler sees only some of them (``.tolist()`` and ``.cpu()`` of a CPU tensor
dispatch no op), so a CPU run cannot say how host-bound the GPU step is.

:class:`HostReadProbe` emulates a separate device on CPU. Tensors "on the device" are
:class:`DeviceTensor` wrappers that report ``device='meta'`` and hold their real values in a CPU
tensor; every op runs for real on the values, so the model computes exactly what it computes on
CPU (same loss, same gradients), while everything that crosses from device to host — or blocks on a
copy the other way — is recorded with the Python stack that asked for it. Host tensors stay plain
CPU tensors: a read of one (the collator's boundaries, a CPU ``max_len``) is no GPU wait and is not
counted.

    with HostReadProbe() as probe:
        probe.place(model)                    # parameters and buffers onto the emulated device
                                              # (put back on exit)
        batch = probe.to_device(batch)        # what the Trainer's _prepare_inputs does on a GPU
        model(**batch).loss.backward()
    print(probe.report())                     # each read: kind, op, count, stack

Code under the probe sees ``tensor.device.type == 'meta'`` and ``is_cuda`` False: it takes the
paths it takes on CPU (e.g. SDPA rather than flash kernels), which is what the CPU suite can run.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten

# ops whose output size depends on the values of a device tensor: the GPU must finish first
SIZE_FROM_DATA = {aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default,
                  aten._unique.default, aten._unique2.default, aten.unique_consecutive.default,
                  aten.bincount.default, aten.equal.default, aten.is_nonzero.default}
_THIS = str(Path(__file__).resolve())
_TORCH = str(Path(torch.__file__).resolve().parent)


class DeviceTensor(torch.Tensor):
    """A tensor on the emulated device: reports ``device='meta'``, holds its values in ``.values``
    (a CPU tensor). Only :class:`HostReadProbe`'s modes operate on it."""

    values: torch.Tensor

    @staticmethod
    def __new__(cls, values: torch.Tensor, requires_grad: bool = False):
        out = torch.Tensor._make_wrapper_subclass(
            cls, values.shape, strides=values.stride(), storage_offset=values.storage_offset(),
            dtype=values.dtype, device=DEVICE, requires_grad=requires_grad)
        out.values = values
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an emulated-device tensor outside HostReadProbe")

    # printing or formatting a device tensor reads it (``f"{n_tokens}"`` in an error message)
    def __repr__(self):
        _record_active("device→host copy", "repr")
        return f"DeviceTensor({self.values!r})"

    def __format__(self, spec):
        _record_active("device→host copy", "format")
        return self.values.__format__(spec)


_ACTIVE: list["HostReadProbe"] = []


def _record_active(kind: str, op: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1]._record(kind, op)


@dataclass(frozen=True)
class Read:
    kind: str            # "scalar read", "size from data", "device→host copy", "blocking host→device copy"
    op: str
    stack: tuple[str, ...]


def _stack(depth: int = 12) -> tuple[str, ...]:
    frames = [f for f in traceback.extract_stack()
              if f.filename != _THIS and not f.filename.startswith(_TORCH)]
    return tuple(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames[::-1][:depth])


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/tests/", "/benchmarks/", "/vlm/", "/data_formats/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1] if marker != "site-packages/" \
                else filename.split(marker, 1)[1]
    return filename


def _on_device(x) -> bool:
    return isinstance(x, DeviceTensor)


def _values(x):
    return x.values if isinstance(x, DeviceTensor) else x


def _is_device(d) -> bool:
    return d is not None and torch.device(d).type == DEVICE.type


class _Dispatch(TorchDispatchMode):
    def __init__(self, probe: "HostReadProbe"):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        any_device = any(_on_device(x) for x in flat)
        to_device = _is_device(kwargs.get("device"))
        if to_device:
            kwargs["device"] = torch.device("cpu")
        record = self.probe._record
        name = str(func.overloadpacket.__name__)
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            if func is aten.copy_.default:
                dst_device = _on_device(args[0])
            else:   # no device argument: the source's own
                dst_device = to_device or ("device" not in kwargs and _on_device(src))
            non_blocking = kwargs.get("non_blocking", False) or (len(args) > 2 and args[2])
            if _on_device(src) and not dst_device:
                record("device→host copy", name)
            elif dst_device and not _on_device(src) and isinstance(src, torch.Tensor) and not non_blocking:
                record("blocking host→device copy", name)
        elif any_device:
            if func is aten._local_scalar_dense.default:
                record("scalar read", name)
            elif func in SIZE_FROM_DATA:
                record("size from data", name)
            elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                record("size from data", "repeat_interleave without output_size")
            elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                          aten._index_put_impl_.default):
                indices = [i for i in args[1] if i is not None]
                if any(i.dtype in (torch.bool, torch.uint8) for i in indices):
                    record("size from data", f"{name} with a boolean mask")
                if any(not _on_device(i) and i.dim() > 0 for i in indices):
                    record("blocking host→device copy", f"{name} with host indices")
            else:
                host = [x for x in flat if isinstance(x, torch.Tensor) and not _on_device(x) and x.dim() > 0]
                if host:   # what a GPU refuses: a host tensor (not a 0-dim scalar) in a device op
                    raise RuntimeError(f"HostReadProbe: {func} mixes device tensors with a host tensor of shape "
                                       f"{tuple(host[0].shape)} (a GPU raises here); at {_stack(4)}")
        out = func(*tree_map(_values, args), **tree_map(_values, kwargs))
        if func is aten._to_copy.default and not to_device and kwargs.get("device") is not None:
            return out   # to the host: a plain tensor
        if not (any_device or to_device) or func is aten._local_scalar_dense.default:
            return out
        if func is aten.copy_.default and not _on_device(args[0]):
            return args[0]
        if func._schema.is_mutable and func.overloadpacket.__name__.endswith("_"):
            return args[0]   # in place: the same wrapper object
        return tree_map(lambda t: DeviceTensor(t) if isinstance(t, torch.Tensor) and not _on_device(t) else t, out)


class _Function(TorchFunctionMode):
    """What never reaches the dispatcher: ``tolist``/``numpy`` of a tensor, and ``torch.tensor``
    built from Python data straight onto the device."""

    def __init__(self, probe: "HostReadProbe"):
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.backward, torch.autograd.backward):
            # a mode is off while its handler runs, but the engine runs Python (activation
            # checkpointing's recompute, hooks) that must stay under the probe: back on for it
            with self:
                return _run_backward(func, args, kwargs)
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__) and _on_device(args[0]):
            self.probe._record("device→host copy", func.__name__)
            return func(args[0].values, *args[1:], **kwargs)
        if func in (torch.tensor, torch.as_tensor) and _is_device(kwargs.get("device")):
            if not isinstance(args[0], torch.Tensor):
                self.probe._record("blocking host→device copy", f"torch.{func.__name__} from Python data")
            elif not _on_device(args[0]):
                self.probe._record("blocking host→device copy", f"torch.{func.__name__} of a host tensor")
            values = func(*args, **{**kwargs, "device": "cpu"})
            return DeviceTensor(_values(values).clone() if _on_device(values) else values)
        return func(*args, **kwargs)


def _run_backward(func, args, kwargs):
    """``Tensor.backward`` / ``torch.autograd.backward`` without their torch-function override
    check (which would call the mode again): the engine call they end in (torch 2.11–2.13)."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is torch.Tensor.backward:
        names = ("gradient", "retain_graph", "create_graph", "inputs")
        opts = dict(zip(names, args[1:]), **kwargs)
        tensors, grads = (args[0],), opts.get("gradient")
    else:
        names = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        opts = dict(zip(names, args[1:]), **kwargs)
        tensors, grads = args[0], opts.get("grad_tensors")
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = opts.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
    create_graph = bool(opts.get("create_graph", False))
    retain_graph = opts.get("retain_graph")
    _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
                         inputs, allow_unreachable=True, accumulate_grad=True)


class HostReadProbe:
    """Context manager: while active, :class:`DeviceTensor` ops run for real and host reads are
    recorded (``reads``: a Counter of :class:`Read`)."""

    def __init__(self, stack_depth: int = 12):
        self.stack_depth = stack_depth
        self.reads: Counter[Read] = Counter()
        self._modes: list = []
        self._placed: list = []   # (module slots, name, the CPU tensor) for every placed tensor

    def __enter__(self):
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        self._put_back()
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    def _record(self, kind: str, op: str) -> None:
        self.reads[Read(kind, op, _stack(self.stack_depth))] += 1

    def clear(self) -> None:
        self.reads.clear()

    @property
    def count(self) -> int:
        return sum(self.reads.values())

    # --- moving things onto the emulated device (no read is recorded for these) --------------

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Every parameter and buffer of ``model`` onto the emulated device, in place (a parameter
        stays a Parameter with its requires_grad; tied weights stay tied). Put back on exit."""
        seen: dict[int, Any] = {}
        for module in model.modules():
            for slots in (module._parameters, module._buffers):
                for name, t in list(slots.items()):
                    if t is None or _on_device(t):
                        continue
                    if id(t) not in seen:
                        seen[id(t)] = (torch.nn.Parameter(DeviceTensor(t.detach()), requires_grad=t.requires_grad)
                                       if isinstance(t, torch.nn.Parameter) else DeviceTensor(t))
                    self._placed.append((slots, name, t))
                    slots[name] = seen[id(t)]
        return model

    def _put_back(self) -> None:
        for slots, name, original in reversed(self._placed):
            slots[name] = original
        self._placed = []

    def to_device(self, batch):
        """Tensors of ``batch`` (a dict, list or tensor) onto the emulated device, as non-blocking
        copies (what a DataLoader's pinned batch moved by the Trainer costs: no host wait)."""
        return tree_map(lambda t: DeviceTensor(t) if isinstance(t, torch.Tensor) and not _on_device(t) else t, batch)

    @staticmethod
    def to_host(x):
        """Values of emulated-device tensors as plain CPU tensors (for comparing results)."""
        return tree_map(lambda t: t.values.clone() if _on_device(t) else t, x)

    # --- the report ------------------------------------------------------------------------------

    def report(self, frames: int = 6) -> str:
        lines = [f"{self.count} host reads in {len(self.reads)} places"]
        for read, n in self.reads.most_common():
            lines.append(f"{n:5d}  {read.kind}: {read.op}")
            lines += [f"         {frame}" for frame in read.stack[:frames]]
        return "\n".join(lines)

    def places(self) -> dict[str, int]:
        """{"kind: op @ first frame outside torch": count} — the reads by the code that made them."""
        out: Counter[str] = Counter()
        for read, n in self.reads.items():
            out[f"{read.kind}: {read.op} @ {read.stack[0] if read.stack else '?'}"] += n
        return dict(out)
