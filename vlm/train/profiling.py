"""``logging.profile_steps: [first, last]``: a torch.profiler record of those optimizer steps.

Writes into the run's output folder ``profile.txt`` (operators sorted by their own CUDA time on a
GPU, then by their own CPU time — where the device's and the host's share of a step go) and
``profile_trace.json`` (a Chrome/Perfetto trace of the same steps). Main process only; profiling
slows the profiled steps, so the step clock's steady-state rate should exclude them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from vlm.atomic import write_text


class StepProfiler(TrainerCallback):
    def __init__(self, first: int, last: int, out: Path):
        self.first, self.last, self.out = first, last, Path(out)
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        # global_step counts finished steps: step k (1-based) begins when k - 1 are done
        if self.profiler is None and state.global_step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
            self.profiler.__enter__()

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
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages()
        sorts = (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]
        text = "".join(f"optimizer steps {self.first}–{self.last}, sorted by {sort}\n\n"
                       f"{averages.table(sort_by=sort, row_limit=50, max_name_column_width=90)}\n\n"
                       for sort in sorts)
        write_text(self.out / "profile.txt", text)
        profiler.export_chrome_trace(str(self.out / "profile_trace.json"))
        print(f"profile: steps {self.first}–{self.last} -> {self.out / 'profile.txt'}")
