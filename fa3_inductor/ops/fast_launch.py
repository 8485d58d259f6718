"""Launching compiled Triton / Gluon kernels without the JIT's per-call work.

Why: on the H100 the host side of one attention call (the checks, the TMA descriptors and the
JIT's argument binding and specialisation) cost 0.13-0.17 ms against a 0.19 ms kernel at the
short end of the grid (session 11, device run 7), so short sequences and small batches were
host-bound.  The Triton implementation now keeps a plan per call signature (triton_impl,
gluon_fwd.FwdPlan, gluon_bwd.BwdPlan): the decisions and launch constants are worked out once,
and each of its kernels is launched through a `Launch` here, which goes through the JIT the
first time (compiling if needed) and afterwards calls the compiled kernel's launcher directly.

Exactness: a Launch belongs to one plan, and a plan to one call signature (shapes, strides,
dtypes, 16-byte alignment of every pointer, spec, scale, the switches read at run time), so
every argument the JIT would specialise on (integer values, pointer alignment, dtypes,
constexprs, descriptor block shapes and layouts) is the same as on the first call; the compiled
kernel the JIT picked then is the one it would pick now.  Launch hooks (profilers) need the
JIT's launch metadata: while any is set, every launch goes through the JIT.
"""
from __future__ import annotations


class TmaArg:
    """What the launcher reads of a host tensor descriptor (base, shape, strides, padding) for a
    kernel already compiled for its block shape and layout: built without the descriptor
    class's checks, which the plan's first call ran for the same signature."""
    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, base, shape, strides):
        self.base, self.shape, self.strides, self.padding = base, shape, strides, "zero"


_runtime = None     # triton.knobs.runtime (the launch hooks), imported at the first launch
_driver = None      # triton's active driver


def _hooks_set() -> bool:
    global _runtime
    if _runtime is None:
        from triton import knobs
        _runtime = knobs.runtime
    return bool(_runtime.launch_enter_hook.calls or _runtime.launch_exit_hook.calls)


def _current():
    """(current device, its current raw stream): what the JIT launches on."""
    global _driver
    if _driver is None:
        from triton.runtime.driver import driver
        _driver = driver.active
    dev = _driver.get_current_device()
    return dev, _driver.get_current_stream(dev)


class Launch:
    """One kernel launch of a plan: the JIT function, its grid and keyword arguments
    (constexprs, num_warps, ...) are fixed; __call__(*args) takes the positional arguments,
    the same parameters at the same positions on every call."""

    def __init__(self, fn, grid, **kwargs):
        self.fn = fn
        self.grid = tuple(grid)
        self.grid3 = self.grid + (1,) * (3 - len(self.grid))
        self.kwargs = kwargs
        self._compiled = {}      # device -> (launcher, function handle, packed metadata, tail)

    @property
    def direct(self) -> bool:
        """Whether the next call launches without the JIT (compiled on the current device, no
        launch hooks): then descriptors may be TmaArgs (descriptors())."""
        return bool(self._compiled) and _current()[0] in self._compiled and not _hooks_set()

    def descriptors(self, tensors, specs) -> list:
        """The descriptor arguments for `tensors`, specs[i] = (shape, strides, box, layout) of
        tensors[i]: TmaArgs once the kernel runs directly, else the descriptors the JIT
        specialises on (Gluon's; layout None: triton.tools')."""
        if self.direct:
            return [TmaArg(t, shape, strides) for t, (shape, strides, _, _) in zip(tensors, specs)]
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        from triton.tools.tensor_descriptor import TensorDescriptor as ToolsDescriptor
        return [ToolsDescriptor(t, list(shape), list(strides), list(box)) if layout is None
                else TensorDescriptor(t, list(shape), list(strides), list(box), layout)
                for t, (shape, strides, box, layout) in zip(tensors, specs)]

    def __call__(self, *args):
        if self._compiled:
            dev, stream = _current()
            entry = self._compiled.get(dev)
            if entry is not None and not _hooks_set():
                run, function, meta, tail = entry
                g0, g1, g2 = self.grid3
                run(g0, g1, g2, stream, function, meta, None, None, None, *args, *tail)
                return
        ck = self.fn[self.grid](*args, **self.kwargs)
        # (the interpreter, TRITON_INTERPRET=1, returns no compiled kernel: it always goes here)
        if ck is not None and hasattr(ck, "packed_metadata"):
            dev = _current()[0]
            if dev not in self._compiled:
                self._compiled[dev] = (ck.run, ck.function, ck.packed_metadata, self._tail(len(args)))

    def _tail(self, n_positional: int) -> tuple:
        """The parameters after the positional ones, in signature order (the launcher takes
        every parameter, constexprs included): from the keyword arguments, else the defaults."""
        params = self.fn.params
        out = []
        for p in params[n_positional:]:
            if p.name in self.kwargs:
                out.append(self.kwargs[p.name])
            elif p.has_default:
                out.append(p.default)
            else:
                raise TypeError(f"{self.fn.__name__}: parameter {p.name} not given")
        return tuple(out)
