"""``logging.profile_steps: [first, last]``: a torch.profiler record of those optimizer steps.

Writes into the run's output folder ``profile.txt`` (operators sorted by their own CUDA time on a
GPU, then by their own CPU time — where the device's and the host's share of a step go — then the
host reads of device values with the Python stack that asked for each) and ``profile_trace.json``
(a Chrome/Perfetto trace of the same steps). Main process only; profiling slows the profiled steps,
so the step clock's steady-state rate should exclude them.

Host reads: a scalar read (``.item()``, ``int(t)``, ``bool(t)``: ``aten::_local_scalar_dense``), a
stream sync, or a blocking copy makes the host wait until the GPU has run everything queued before
it, so the host cannot queue the next kernels while the GPU works; a host-bound step is made of
such waits. On CPU the same reads cost nothing, but their stacks show where a GPU run would wait.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from vlm.atomic import write_text


class StepProfiler(TrainerCallback):
    def __init__(self, first: int, last: int, out: Path, rank: int = 0):
        # every process of a multi-process run profiles its own steps (a stall shows on one rank as
        # time waiting in a collective for the other): rank 0 writes profile.txt, rank r
        # profile_rank{r}.txt and profile_trace_rank{r}.json
        self.first, self.last, self.out, self.rank = first, last, Path(out), rank
        self.profiler = None
        self.t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        # global_step counts finished steps: step k (1-based) begins when k - 1 are done
        if self.profiler is None and state.global_step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # with_stack alone records no frames on ops in torch 2.13; verbose makes it attach them
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=True,
                                                   experimental_config=torch.profiler._ExperimentalConfig(verbose=True))
            self.profiler.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step >= self.last:
            self._write()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:   # the run ended inside the window
            self._write()

    def _write(self):
        profiler, self.profiler = self.profiler, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages()
        sorts = (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]
        text = busy_summary(averages, wall, self.first, self.last, self.rank)
        text += "".join(f"optimizer steps {self.first}–{self.last}, sorted by {sort}\n\n"
                       f"{averages.table(sort_by=sort, row_limit=50, max_name_column_width=90)}\n\n"
                       for sort in sorts)
        text += host_reads(profiler, f"optimizer steps {self.first}–{self.last}")
        suffix = f"_rank{self.rank}" if self.rank else ""
        write_text(self.out / f"profile{suffix}.txt", text)
        profiler.export_chrome_trace(str(self.out / f"profile_trace{suffix}.json"))
        print(f"profile: steps {self.first}–{self.last} -> {self.out / f'profile{suffix}.txt'}")


def busy_summary(averages, wall_s: float, first: int, last: int, rank: int) -> str:
    """One paragraph: the window's wall time, the device's kernel time in it (busy share: a
    host-bound step shows a low one), and how much of that kernel time is collectives (NCCL/gloo:
    all-gathers, reduce-scatters, all-reduces, including time a rank spends waiting in one for the
    other)."""
    def device_us(e):
        return getattr(e, "self_device_time_total", 0) or 0

    kernel = sum(device_us(e) for e in averages) / 1e6
    comm = sum(device_us(e) for e in averages if "nccl" in e.key.lower()) / 1e6
    host_comm = sum(e.self_cpu_time_total for e in averages
                    if any(k in e.key.lower() for k in ("gloo", "nccl", "c10d::"))) / 1e6
    steps = last - first + 1
    line = (f"rank {rank}, optimizer steps {first}–{last}: wall {wall_s:.3f} s ({wall_s / steps:.3f} s/step)")
    if kernel:
        line += (f"; device kernel time {kernel:.3f} s summed over streams ({kernel / wall_s:.0%} of the wall), "
                 f"of which collectives "
                 f"{comm:.3f} s")
    line += f"; host time in collective ops {host_comm:.3f} s"
    return line + "\n\n"


# what makes the host wait for the device (see the module docstring)
HOST_READS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync")


def host_reads(profiler, title: str, stack_depth: int = 8, limit: int = 25) -> str:
    """The profiled host reads grouped by the Python stack that made them, most frequent first."""
    rows = [e for e in profiler.key_averages(group_by_stack_n=stack_depth) if e.key in HOST_READS]
    rows.sort(key=lambda e: -e.count)
    lines = [f"{title}: host reads of device values by Python stack ({len(rows)} places; count, op, stack)", ""]
    for e in rows[:limit]:
        lines.append(f"{e.count:6d}  {e.key}")
        lines += [f"          {frame}" for frame in (e.stack or ["(no Python frame)"])]
    return "\n".join(lines) + "\n"
