"""Shared helpers of the benchmarks: machine description, timing, peak memory, output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from abd_fast.precision import FAST_BF16_CPU_FLAGS, auto_precision, cpu_flags
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "fast_bf16_flags": sorted(set(FAST_BF16_CPU_FLAGS) & cpu_flags()),
            "auto_precision": auto_precision("cuda" if torch.cuda.is_available() else "cpu"),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=20, method="inclusive") if len(times) >= 2 else [times[0]] * 19
    return {"ms": statistics.median(times), "ms_min": times[0], "ms_p10": q[1], "ms_p25": q[4],
            "ms_p75": q[14], "ms_p90": q[17], "reps": len(times)}


def timeit(fn, device: str = "cpu", reps: int = 5, warmup: int = 1) -> dict:
    """Median, minimum and 10/25/75/90% quantiles in ms. On a GPU, triton.testing.do_bench."""
    return timeit_interleaved({"fn": fn}, device, reps, warmup)["fn"]


def timeit_interleaved(fns: dict, device: str = "cpu", reps: int = 15, warmup: int = 2,
                       settle: int = 1) -> dict:
    """Times several callables in alternation: round r runs each of them once, so a slow
    phase of a shared machine hits all of them alike instead of whichever ran then. Each
    timed call directly follows `settle` untimed calls of the same callable, so it finds the
    memory state its own previous call left (on a VM with free-page reporting, memory freed
    for ~2 s goes back to the host and costs a host fault per page when touched again; without
    this, whichever callable runs after a slow one would pay for it). Returns per name the
    statistics of _stats and, on CPU, the minor page faults per timed call (all threads of
    the process). `reps` is an int or a dict name -> int (a slow baseline can run fewer
    rounds; it then sits out the last ones). On a GPU, triton.testing.do_bench."""
    if device == "cuda":
        from triton.testing import do_bench
        out = {}
        for name, fn in fns.items():
            med, lo, hi = do_bench(fn, quantiles=[0.5, 0.25, 0.75])
            out[name] = {"ms": med, "ms_p25": lo, "ms_p75": hi}
        return out
    import resource
    n = reps if isinstance(reps, dict) else {name: reps for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    faults = {name: 0 for name in fns}
    for r in range(max(n.values())):
        for name, fn in fns.items():
            if r >= n[name]:
                continue
            for _ in range(settle):
                fn()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {name: {**_stats(times[name]), "page_faults_per_call": faults[name] / n[name],
                   "all_ms": [round(t, 3) for t in times[name]]} for name in fns}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def peak_extra_rss(step) -> int:
    """Peak resident memory that one call of step() adds, in bytes (Linux).

    step() runs once first, so that libraries, thread pools and JIT kernels are loaded; the
    memory it freed is handed back to the OS (malloc_trim), the high-water mark is reset
    (/proc/self/clear_refs), and the second call is measured against the resident size
    before it."""
    import ctypes
    import gc
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = current_rss()
    step()
    return max(0, _peak_rss() - base)


def measure_peak_in_subprocess(script: Path, args: list[str]) -> int:
    """Runs `script --peak-memory <args>` in a fresh process, which prints the peak extra
    bytes of the measured call (peak_extra_rss) on its last line."""
    out = subprocess.run([sys.executable, str(script), "--peak-memory", *args], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def write_json(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table of `rows` with (key, header) columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    cells = [[h for _, h in columns]] + [[fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
