"""Where `vlm train`'s startup went: imports per package, and the first step's compile vs run time.

Startup (process start → first optimizer step done) is reported by phase in ``summary.json``
(``startup_seconds``, vlm.train.recipe). Two phases are opaque from the outside, and this module
opens them:

- **imports** (process start → the recipe begins): :class:`ImportClock`, installed by the CLI before
  anything heavy, times every module's import and charges it to its top-level package (``peft``, ``bitsandbytes``,
  ``datasets``...; for torch and transformers the sub-package: ``torch._C``, ``torch._dynamo``,
  ``torch._inductor``, ``transformers.models``...) *exclusively*: a module's time less
  the modules it imported on the way, so ``torch._dynamo`` counts as such even when peft's import
  pulled it in. It costs one Python call per module imported (a few ms in all). ``python_start``
  is the interpreter's own start (process creation → the clock installed: site, .pth files, the
  ``vlm`` package).
- **first step**: torch.compile's own timers (``torch._dynamo.utils.compilation_time_metrics``,
  seconds per phase, cumulative in the process) and counters, read when the first optimizer step
  ends (:func:`compile_split`): dynamo's frame compiles (bytecode tracing + the backend: AOT autograd
  and inductor codegen, or cache loads), the lazily compiled backward graphs, Triton autotuning of
  inductor's kernels, and how many graphs came from inductor's FX-graph and AOTAutograd caches.
  ``run_s`` is the rest: the step's own kernels, first CUDA/cuBLAS use, the first batch.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import time

# compilation_time_metrics keys (torch 2.11–2.13): seconds per call of each timed region
_FRAME = "_compile.compile_inner"          # dynamo: one frame (trace + backend + guards)
_TRACE = "bytecode_tracing"                # dynamo's symbolic tracing of the Python code
_BACKEND = "OutputGraph.call_user_compiler"  # AOT autograd + inductor (or their cache loads)
_BACKWARD = "backward._backward_impl"      # the backward graph, compiled at the first backward
_AUTOTUNE = "CachingAutotuner.benchmark_all_configs"   # Triton autotuning of inductor's kernels
_CACHE_LOAD = "AOTAutogradCache.inductor_load"         # loading a cached graph's compiled module
_MODULE_LOAD = "PyCodeCache.load_by_key_path"          # importing a graph's generated module (its kernels)
_ASYNC_WAIT = "async_compile.wait"                     # waiting for the compile workers' kernels


# packages whose sub-packages are reported apart: torch's compiler stack (torch._dynamo,
# torch._inductor), torch.distributed and torch._C (the shared libraries) are different costs
_BY_SUBPACKAGE = ("torch", "transformers")


def _group(fullname: str) -> str:
    parts = fullname.split(".")
    return ".".join(parts[:2]) if parts[0] in _BY_SUBPACKAGE and len(parts) > 1 else parts[0]


class ImportClock(importlib.abc.MetaPathFinder):
    """Times every module imported after it is installed, charging each its *exclusive* time (its
    own loading, less the modules it imported on the way) and summing by top-level package."""

    def __init__(self):
        self.seconds: dict[str, float] = {}   # top-level package -> seconds
        # Python modules imported without a bytecode cache file (.pyc): compiled from source here,
        # every run where the cache cannot be written (read-only site-packages, PYTHONDONTWRITEBYTECODE)
        self.from_source, self.from_source_s = 0, 0.0
        self._stack: list[list] = []     # [start, seconds charged to nested modules]
        self.installed_at = time.perf_counter()

    def find_spec(self, fullname, path=None, target=None):
        if fullname in sys.modules:
            return None
        # the real spec, from the finders after this one; its loader timed
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _TimedLoader(spec.loader, _group(fullname), self)
                return spec
        return None

    def timed(self, package: str, work, *args, from_source: bool = False):
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            return work(*args)
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[0]
            self.seconds[package] = self.seconds.get(package, 0.0) + total - frame[1]
            if from_source:
                self.from_source += 1
                self.from_source_s += total - frame[1]
            if self._stack:
                self._stack[-1][1] += total

    def split(self, top: int = 14, min_seconds: float = 0.05) -> dict[str, float]:
        """The ``top`` slowest packages (seconds, rounded), the rest summed as ``other``."""
        ranked = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        out = {name: round(s, 2) for name, s in ranked[:top] if s >= min_seconds}
        out["other"] = round(sum(s for name, s in ranked if name not in out), 2)
        return out


def _no_bytecode_cache(module) -> bool:
    """A source module whose .pyc is missing: Python compiles it before running it."""
    origin = getattr(getattr(module, "__spec__", None), "origin", None)
    if not origin or not origin.endswith(".py"):
        return False
    try:
        return not os.path.exists(importlib.util.cache_from_source(origin))
    except (NotImplementedError, ValueError):   # no cache tag (unusual interpreters)
        return False


class _TimedLoader(importlib.abc.Loader):
    """The real loader, timed: ``create_module`` (an extension module's shared library is loaded
    there: ``torch._C`` brings libtorch and, on a GPU machine, the CUDA libraries) and
    ``exec_module`` (the module's code)."""

    def __init__(self, loader, package: str, clock: ImportClock):
        self._loader, self._package, self._clock = loader, package, clock

    def create_module(self, spec):
        return self._clock.timed(self._package, self._loader.create_module, spec)

    def exec_module(self, module):
        # the module keeps the real loader (inspect, importlib.resources and pkgutil read it)
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        return self._clock.timed(self._package, self._loader.exec_module, module,
                                 from_source=_no_bytecode_cache(module))

    def __getattr__(self, name):   # get_resource_reader, is_package, get_code...: the real loader's
        return getattr(self._loader, name)


_clock: ImportClock | None = None


def install_import_clock() -> ImportClock:
    """Put the clock first on ``sys.meta_path`` (once per process); returns it."""
    global _clock
    if _clock is None:
        _clock = ImportClock()
        sys.meta_path.insert(0, _clock)
    return _clock


def import_clock() -> ImportClock | None:
    return _clock


def process_start_perf() -> float | None:
    """The process's creation time on the ``time.perf_counter`` clock (None if unreadable)."""
    try:
        import psutil

        return time.perf_counter() - (time.time() - psutil.Process().create_time())
    except Exception:   # psutil missing or process info unreadable
        return None


def import_split() -> dict[str, float] | None:
    """Seconds per package imported so far (call it when the phase ends: later imports would count
    too), plus ``python_start`` (process creation → the clock installed); None without the clock."""
    clock = import_clock()
    if clock is None:
        return None
    out = {}
    start = process_start_perf()
    if start is not None:
        out["python_start"] = round(clock.installed_at - start, 2)
    return {**out, **clock.split()}


def imports_without_pyc() -> dict | None:
    """How many of the modules imported so far had no .pyc (compiled from source in this process)
    and their seconds (a share of :func:`import_split`'s); None without the clock."""
    clock = import_clock()
    return None if clock is None else {"modules": clock.from_source, "s": round(clock.from_source_s, 2)}


MANY_WITHOUT_PYC = 200   # a fresh install of our own package alone stays far below this


def bytecode_hint() -> str:
    """What to do when the Python environment compiles its packages from source in every process."""
    why = ("PYTHONDONTWRITEBYTECODE is set" if sys.dont_write_bytecode
           else "site-packages holds no .pyc and may not be writable")
    return (f"startup: Python is compiling installed packages from source ({why}); every run pays it "
            "again. A writable bytecode cache saves it from the second run: unset PYTHONDONTWRITEBYTECODE "
            "and set PYTHONPYCACHEPREFIX to a writable folder (or `python -m compileall` the site-packages)")


class StepClock:
    """Wall seconds of the named steps inside one startup phase, and this process's CPU seconds
    over the whole phase (``time.process_time``: every thread of the process). Wall well above CPU
    means the process waited: on the GPU (a synchronizing call), on disk, or for a CPU core (other
    processes booting at the same time, such as inductor's compile workers or DataLoader workers)."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.cpu_started = time.process_time()
        self.seconds: dict[str, float] = {}
        # modules first imported inside the phase (the CLI's import clock): a step that is the first
        # to need a package (Triton, vlm.kernels, peft's tuners) pays its import, .pyc or not
        clock = import_clock()
        self.imports_before = dict(clock.seconds) if clock is not None else None

    def mark(self, step: str) -> None:
        """The time since the previous mark (or the start) belongs to ``step`` (summed if repeated)."""
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self.last
        self.last = now

    def split(self) -> dict:
        """``{step}_s`` for each step, ``cpu_s`` and ``wall_s`` for the phase so far (rounded)."""
        out = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["cpu_s"] = round(time.process_time() - self.cpu_started, 3)
        out["wall_s"] = round(time.perf_counter() - self.started, 3)
        clock = import_clock()
        if clock is not None and self.imports_before is not None:
            new = {k: v - self.imports_before.get(k, 0.0) for k, v in clock.seconds.items()}
            new = {k: v for k, v in new.items() if v > 0}
            out["imports_in_phase"] = {"s": round(sum(new.values()), 3),
                                       **{k: round(v, 3) for k, v in sorted(new.items(), key=lambda kv: -kv[1])[:5]}}
        return out


def describe_steps(name: str, split: dict) -> str:
    """One line: the phase's steps, then its CPU time against its wall time."""
    steps = [f"{k.removesuffix('_s')} {v:.2f}" for k, v in split.items()
             if k.endswith("_s") and k not in ("cpu_s", "wall_s") and not isinstance(v, dict)]
    line = f"startup: {name} {split['wall_s']:.2f} s = " + " + ".join(steps) + " s"
    imported = split.get("imports_in_phase") or {}
    if imported.get("s", 0) >= 0.01:
        line += (f"; of which first imports {imported['s']:.2f} s ("
                 + ", ".join(f"{k} {v:.2f}" for k, v in imported.items() if k != "s") + ")")
    line += f" (process CPU {split['cpu_s']:.2f} s"
    if split["wall_s"] > 2 * split["cpu_s"] + 0.5:
        line += "; the rest waited: GPU, disk, or a CPU core taken by other processes"
    return line + ")"


def compile_split() -> dict:
    """torch.compile's time in this process so far, by phase (seconds), and its cache hits."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as times, counters
    except ImportError:   # pragma: no cover - torch without dynamo
        return {}

    def total(key):
        return round(sum(times.get(key, ())), 2)

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {
        # frames (dynamo + backend), lazily compiled backward graphs, and the autotuning inductor's
        # kernels do at their first call (in the step's run, but compile work all the same)
        "compile_s": round(total(_FRAME) + total(_BACKWARD) + total(_AUTOTUNE), 2),
        "dynamo_trace_s": total(_TRACE),
        "backend_s": total(_BACKEND),
        "backward_s": total(_BACKWARD),
        "autotune_s": total(_AUTOTUNE),
        "cache_load_s": total(_CACHE_LOAD),
        "module_load_s": total(_MODULE_LOAD),
        "kernel_wait_s": total(_ASYNC_WAIT),
        "frames": int(counters["frames"]["total"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "fx_graph_cache": {"hit": int(inductor["fxgraph_cache_hit"]), "miss": int(inductor["fxgraph_cache_miss"]),
                           "bypass": int(inductor["fxgraph_cache_bypass"])},
        "aot_autograd_cache": {"hit": int(aot["autograd_cache_hit"]), "miss": int(aot["autograd_cache_miss"]),
                               "bypass": int(aot["autograd_cache_bypass"])},
        # why a graph was not cached (watch_cache_bypasses): a warm run compiles those again
        "cache_bypass_reasons": {cache: sorted(r) for cache, r in _bypass_reasons.items() if r},
        # each frame dynamo traced: which code, its dynamo and backend seconds, why it recompiled
        "frames_traced": traced_frames(),
    }


def traced_frames(max_reason: int = 240) -> list[dict]:
    """Every frame dynamo compiled in this process so far, from its own compilation metrics
    (``torch._dynamo.utils.get_compilation_metrics``): ``code`` (function, file, line), ``dynamo_s``
    (tracing and guards: what a warm start pays again, since dynamo's output is never cached),
    ``backend_s`` (AOT autograd + inductor, or their cache loads) and ``recompile`` (the guard that
    failed when the code had been compiled before: a frame that compiles twice for one run's data
    is a recompile to remove). Empty where this torch keeps no such metrics."""
    try:
        from torch._dynamo.utils import get_compilation_metrics
    except ImportError:   # pragma: no cover - a torch without them
        return []
    frames = []
    for m in get_compilation_metrics():
        name = getattr(m, "co_name", None)
        if name is None or getattr(m, "is_runtime", False):   # runtime records: no frame was traced
            continue
        total = getattr(m, "entire_frame_compile_time_s", None)
        if total is None:   # a release that keeps only the microsecond duration
            total = (getattr(m, "duration_us", None) or 0) / 1e6
        backend = getattr(m, "backend_compile_time_s", None) or 0.0
        reason = getattr(m, "recompile_reason", None)
        frames.append({"code": f"{name} ({os.path.basename(getattr(m, 'co_filename', '') or '?')}:"
                               f"{getattr(m, 'co_firstlineno', '?')})",
                       "compile_id": getattr(m, "compile_id", None),
                       "dynamo_s": round(max(total - backend, 0.0), 2), "backend_s": round(backend, 2),
                       "recompile": reason[:max_reason] if reason else None,
                       "failed": getattr(m, "fail_reason", None)})
    return frames


def describe_frames(frames: list[dict]) -> str:
    """The traced frames in one phrase: each code with how many times it was traced and the
    dynamo seconds it cost, then the recompile reasons."""
    by_code: dict[str, list[float]] = {}
    for f in frames:
        by_code.setdefault(f["code"], []).append(f["dynamo_s"])
    parts = [f"{code} x{len(s)} {sum(s):.1f} s" for code, s in by_code.items()]
    reasons = sorted({f["recompile"].splitlines()[0] for f in frames if f.get("recompile")})
    return "; ".join(parts) + "".join(f"; recompiled: {r}" for r in reasons)


def describe_compile(split: dict, first_step_s: float, data_wait_s: float | None = None,
                     setup_s: float | None = None) -> str:
    """One line: the first step = the Trainer's setup (``setup_s``) + compile by phase with its
    cache hits + the rest (running, of which ``data_wait_s`` blocked on the DataLoader)."""
    wait = f" (of which waiting for data {data_wait_s:.1f} s)" if data_wait_s is not None else ""
    setup_s = setup_s or 0.0
    setup = f"Trainer setup {setup_s:.1f} s + "
    if not split or not split.get("frames"):
        return f"first step {first_step_s:.1f} s = {setup}run {max(first_step_s - setup_s, 0):.1f} s{wait}"
    fx, aot = split["fx_graph_cache"], split["aot_autograd_cache"]
    return (f"first step {first_step_s:.1f} s = {setup}compile {split['compile_s']:.1f} s (dynamo trace "
            f"{split['dynamo_trace_s']:.1f}, AOT+inductor {split['backend_s']:.1f} (of which loading generated "
            f"modules {split.get('module_load_s', 0):.1f}), backward {split['backward_s']:.1f}, Triton autotune "
            f"{split['autotune_s']:.1f}; {split['frames']} frames, "
            f"{split['graphs']} graphs; FX-graph cache {fx['hit']} hit / {fx['miss']} miss"
            + (f" / {fx['bypass']} bypass" if fx.get("bypass") else "") + ", AOTAutograd "
            f"cache {aot['hit']} hit / {aot['miss']} miss"
            + (f" / {aot['bypass']} bypass" if aot.get("bypass") else "")
            + f") + run {max(first_step_s - split['compile_s'] - setup_s, 0):.1f} s{wait}"
            + "".join(f"; {cache} cache bypassed: {'; '.join(reasons)}"
                      for cache, reasons in split.get("cache_bypass_reasons", {}).items())
            + (f"; frames traced (dynamo): {describe_frames(split['frames_traced'])}"
               if split.get("frames_traced") else ""))


# what torch logs (at INFO) when a graph cannot be cached: the next process compiles it again
_BYPASS_MESSAGES = {
    "torch._functorch._aot_autograd.autograd_cache": ("Bypassing autograd cache due to: ", "aot_autograd"),
    "torch._inductor.codecache": ("Bypassing FX Graph Cache because ", "fx_graph"),
}
_bypass_reasons: dict[str, set[str]] = {"aot_autograd": set(), "fx_graph": set()}


class _BypassCapture(logging.Filter):
    """Keeps the reason of each cache bypass; lets through only what the logger let through before."""

    def __init__(self, prefix: str, cache: str, level_before: int):
        super().__init__()
        self.prefix, self.cache, self.level_before = prefix, cache, level_before

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:   # a malformed record is the logging machinery's business
            return record.levelno >= self.level_before
        if msg.startswith(self.prefix):
            _bypass_reasons[self.cache].add(msg[len(self.prefix):].strip("'")[:300])
        return record.levelno >= self.level_before


def watch_cache_bypasses() -> None:
    """Record why a compiled graph bypassed inductor's FX-graph or the AOTAutograd cache (once per
    process; :func:`compile_split` reports the reasons). torch logs them at INFO: the loggers are
    opened to INFO and a filter keeps the reasons and drops what they would not have emitted before,
    so nothing new reaches any handler."""
    for name, (prefix, cache) in _BYPASS_MESSAGES.items():
        logger = logging.getLogger(name)
        if any(isinstance(f, _BypassCapture) for f in logger.filters):
            continue
        before = logger.getEffectiveLevel()
        logger.addFilter(_BypassCapture(prefix, cache, before))
        if before > logging.INFO:
            logger.setLevel(logging.INFO)


def cache_dirs() -> dict:
    """Where the caches that make a second run's startup fast live, and whether they are on."""
    out: dict = {}
    try:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        out["inductor"] = cache_dir()
        out["fx_graph_cache"] = bool(inductor_config.fx_graph_cache)
        out["aot_autograd_cache"] = bool(getattr(functorch_config, "enable_autograd_cache", False))
    except Exception:   # pragma: no cover - a torch without these modules
        pass
    triton_dir = os.environ.get("TRITON_CACHE_DIR")
    if triton_dir is None:
        try:
            from triton import knobs

            triton_dir = knobs.cache.dir
        except Exception:   # no Triton, or a release without knobs
            triton_dir = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    out["triton"] = triton_dir
    return out
