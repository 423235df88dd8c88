"""Recording overhead, in one run: models trained without and with a Recorder.

    python benchmarks/bench_record.py [--case gpt|digits|all|none] [--rounds 3] [--steps 60]
                                      [--breakdown] [--memory]

Two cases. The demo GPT (17 matrices up to 512×128, ~200 ms steps): step time and write
throughput. The 64-128-128-10 digits MLP (three small matrices, ~1 ms steps): the cost per
snapshot, which dominates small models. In each case the settings (no recording, every=10,
every=1) are interleaved round by round, in rotating order, so that load from other processes
hits all of them alike; each prints the median of its rounds, its ratio to the baseline and the
added time per snapshot, (t − t_base) / snapshots. Write throughput is measured inside the
writer thread: bytes of weights written per second spent in RunWriter.write and commit.

``--breakdown`` times the parts of one snapshot of the digits MLP in isolation: zarr's resize and
setitem per array (what a snapshot cost before schema 2), a whole-chunk row write, a series
chunk rewrite, one commit, the queue hand-off between threads, and the host copy.

``--memory`` measures the peak memory of a Recorder whose writer falls behind (4 matrices of
2048 × 2560, a writer slowed by 0.5 s per snapshot), for max_pending = 1, 2, 4, each in a fresh
process: the peak resident size above the process's size before the first snapshot, in copies of
the recorded float32 weights.

Goals: GPT every=10 ≤ 1.05× (issue 2); digits ≤ 2 ms per snapshot (issue 15).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from spectra.capture.recorder import Recorder
from spectra.capture.writer_thread import BackgroundWriter
from spectra.store import MatrixSpec, RunWriter, create_run
from spectra.tasks.data import CharCorpus, digits, kjv_text
from spectra.tasks.loops import ClassifierTraining, GPTTraining, train_char_gpt, train_classifier
from spectra.tasks.models import GPT, MLP, GPTConfig

SETTINGS = {"no recording": None, "every=10": 10, "every=1": 1}
DIGITS_SIZES = (64, 128, 128, 10)


class WriteTimer:
    """Wraps RunWriter.write and .commit to total their time and the float32 bytes written."""

    def __init__(self):
        self.seconds = 0.0
        self.bytes = 0
        self._originals = (RunWriter.write, RunWriter.commit)

    def __enter__(self):
        write, commit = self._originals
        timer = self

        def timed_write(writer, step, weights, *args, **kwargs):
            start = time.perf_counter()
            write(writer, step, weights, *args, **kwargs)
            timer.seconds += time.perf_counter() - start
            timer.bytes += sum(w.size * 4 for w in weights.values())

        def timed_commit(writer):
            start = time.perf_counter()
            commit(writer)
            timer.seconds += time.perf_counter() - start

        RunWriter.write, RunWriter.commit = timed_write, timed_commit
        return self

    def __exit__(self, *exc):
        RunWriter.write, RunWriter.commit = self._originals


Train = Callable[[torch.nn.Module, Callable | None], int]  # (model, after_step) → steps taken


def gpt_case(steps: int) -> tuple[Callable[[], torch.nn.Module], Train]:
    corpus = CharCorpus(kjv_text())

    def model():
        return GPT(GPTConfig(vocab_size=corpus.vocab_size))

    def train(net, after_step):
        training = GPTTraining(steps=steps, eval_every=10**9, eval_batches=1, seed=0)
        train_char_gpt(net, corpus, training, quiet=True, after_step=after_step)
        return steps
    return model, train


def digits_case(epochs: int) -> tuple[Callable[[], torch.nn.Module], Train]:
    data = digits()

    def model():
        return MLP(DIGITS_SIZES)

    def train(net, after_step):
        history = train_classifier(net, data, ClassifierTraining(epochs=epochs, seed=0),
                                   quiet=True, after_step=after_step)
        return history[-1]["step"]
    return model, train


class WriterCPU:
    """Totals the CPU time of the Recorder's writer thread (time.thread_time inside it)."""

    def __init__(self):
        self.seconds = 0.0
        self._original = BackgroundWriter._write_loop

    def __enter__(self):
        original, timer = self._original, self

        def timed(writer):
            start = time.thread_time()
            try:
                original(writer)
            finally:
                timer.seconds += time.thread_time() - start
        BackgroundWriter._write_loop = timed
        return self

    def __exit__(self, *exc):
        BackgroundWriter._write_loop = self._original


def time_block(make_model, train: Train, every: int | None, path: Path,
               seed: int) -> tuple[float, float, int]:
    """(seconds of training, CPU seconds of the training thread, snapshots taken), recording
    with ``every`` or not."""
    torch.manual_seed(seed)
    model = make_model()
    if every is None:
        start, cpu = time.perf_counter(), time.thread_time()
        train(model, None)
        return time.perf_counter() - start, time.thread_time() - cpu, 0
    with Recorder(model, path, every=every) as rec:
        start, cpu = time.perf_counter(), time.thread_time()
        steps = train(model, lambda step, loss: rec.step(loss=loss))
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return elapsed, cpu, steps // every + 1


def run_case(name: str, make_model, train: Train, rounds: int, folder: Path) -> None:
    times = {setting: [] for setting in SETTINGS}
    cpus = {setting: [] for setting in SETTINGS}
    snapshots = {setting: 0 for setting in SETTINGS}
    timers = {setting: WriteTimer() for setting, every in SETTINGS.items() if every}
    writers = {setting: WriterCPU() for setting, every in SETTINGS.items() if every}
    time_block(make_model, train, None, folder / "warm.zarr", seed=99)  # warm-up
    names = list(SETTINGS)
    for round_ in range(rounds):
        order = names[round_ % 3:] + names[:round_ % 3]  # rotate: no setting always first
        for setting in order:
            path = folder / f"{name[:6]}-{setting.replace('=', '')}-{round_}.zarr"
            if SETTINGS[setting] is None:
                seconds, cpu, _ = time_block(make_model, train, None, path, round_)
            else:
                with timers[setting], writers[setting]:
                    seconds, cpu, snapshots[setting] = time_block(
                        make_model, train, SETTINGS[setting], path, round_)
            times[setting].append(seconds)
            cpus[setting].append(cpu)
    base, base_cpu = statistics.median(times["no recording"]), statistics.median(cpus["no recording"])
    print(f"\n{name}: {rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("  ms/snapshot: added wall time of training per snapshot; train CPU: added CPU of the "
          "training thread; writer CPU: the writer thread's CPU (per snapshot)")
    print(f"{'setting':<14}{'seconds':>9}{'ratio':>8}{'snapshots':>11}{'ms/snapshot':>13}"
          f"{'train CPU':>11}{'writer CPU':>12}{'write MB/s':>12}")
    for setting in SETTINGS:
        median = statistics.median(times[setting])
        line = f"{setting:<14}{median:>9.3f}{median / base:>8.3f}"
        if setting in timers:
            count, timer = snapshots[setting], timers[setting]
            per = (median - base) / count * 1e3
            train_cpu = (statistics.median(cpus[setting]) - base_cpu) / count * 1e3
            writer_cpu = writers[setting].seconds / rounds / count * 1e3
            line += (f"{count:>11}{per:>13.2f}{train_cpu:>11.2f}{writer_cpu:>12.2f}"
                     f"{timer.bytes / max(timer.seconds, 1e-9) / 1e6:>12.0f}")
        print(line)


def breakdown(folder: Path, repeats: int = 200) -> None:
    """The parts of one digits-MLP snapshot, timed alone (median µs per call)."""
    import zarr

    from spectra.store.chunks import ChunkWriter
    shapes = [(b, a) for a, b in zip(DIGITS_SIZES[:-1], DIGITS_SIZES[1:])]
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    rows = {name: w.astype(np.float64) for name, w in weights.items()}
    root = zarr.open_group(folder / "parts.zarr", mode="w")
    codecs = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
              zarr.codecs.Crc32cCodec())
    arrays = {name: root.create_array(name, shape=(repeats + 1, *w.shape), chunks=(1, *w.shape),
                                      dtype="f8", compressors=codecs, fill_value=np.nan)
              for name, w in weights.items()}
    series = root.create_array("series", shape=(1024,), chunks=(1024,), dtype="f8",
                               compressors=(zarr.codecs.Crc32cCodec(),))
    writers = {name: ChunkWriter(array) for name, array in arrays.items()}
    series_writer = ChunkWriter(series)
    chunk = np.zeros(1024)

    def median_us(action) -> float:
        samples = []
        for i in range(repeats):
            start = time.perf_counter()
            action(i)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e6

    name, first = next(iter(arrays.items()))
    parts = {
        "zarr resize (metadata rewrite), one array": median_us(
            lambda i: first.resize((repeats + 2 + i, *first.shape[1:]))),
        "zarr setitem, one matrix row": median_us(lambda i: first.__setitem__(i, rows[name])),
        "zarr setitem, one series value": median_us(lambda i: series.__setitem__(i, 1.0)),
        "ChunkWriter row, one matrix": median_us(
            lambda i: writers[name].write((i, 0, 0), rows[name])),
        "ChunkWriter series chunk rewrite": median_us(lambda i: series_writer.write((0,), chunk)),
        "host copy of the 3 matrices": median_us(
            lambda i: [torch.from_numpy(w).to(torch.float32, copy=True) for w in weights.values()]),
        "queue hand-off between threads": _handoff_us(repeats),
    }
    specs = [MatrixSpec(n, w.shape, w.shape, "linear") for n, w in weights.items()]
    writer = create_run(folder / "commit.zarr", specs, weights)
    parts["RunWriter.write, one snapshot (3 rows)"] = median_us(
        lambda i: writer.write(i, weights, {"loss": 1.0}))
    parts["RunWriter.commit, one snapshot"] = median_us(
        lambda i: (writer.write(repeats + i, weights, {"loss": 1.0}), writer.commit())) - \
        parts["RunWriter.write, one snapshot (3 rows)"]
    writer.close()
    print("\nparts of a digits-MLP snapshot (median µs per call, alone)")
    for part, us in parts.items():
        print(f"  {part:<45}{us:>9.0f}")
    before = 4 * parts["zarr resize (metadata rewrite), one array"] + \
        3 * parts["zarr setitem, one matrix row"] + 3 * parts["zarr setitem, one series value"]
    print(f"  {'schema 1 per snapshot (3 rows, 3 series, 6 resizes)':<45}{before:>9.0f}")


def _handoff_us(repeats: int) -> float:
    """Median round trip of an item through a queue to another thread and back."""
    there, back = queue.Queue(), queue.Queue()
    worker = threading.Thread(target=lambda: [back.put(there.get()) for _ in range(repeats)])
    worker.start()
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        there.put(i)
        back.get()
        samples.append(time.perf_counter() - start)
    worker.join()
    return statistics.median(samples) * 1e6


def memory_probe(max_pending: int) -> None:
    """Print the peak resident size of a falling-behind Recorder, in copies of its weights."""
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2560, bias=False) for _ in range(4)])
    size = sum(p.numel() * 4 for p in model.parameters())
    write = RunWriter.write
    RunWriter.write = lambda self, *a, **k: (time.sleep(0.5), write(self, *a, **k))[1]
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _resident())
            time.sleep(0.002)
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(model, Path(tmp) / "m.zarr", every=1, max_pending=max_pending).start()
        time.sleep(1.0)
        base = _resident()
        watcher = threading.Thread(target=watch)
        watcher.start()
        for _ in range(max_pending + 6):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)
            rec.step()
        rec.close()
        done.set()
        watcher.join()
    print(f"{max_pending} {size} {base} {peak[0]}")


def memory() -> None:
    import subprocess
    import sys
    print("\npeak memory of a Recorder that falls behind (4 × 2048×2560 float32 = 84 MB)")
    print(f"{'max_pending':>12}{'before MB':>11}{'peak MB':>9}{'copies':>8}")
    for max_pending in (1, 2, 4):
        out = subprocess.run([sys.executable, __file__, "--memory-probe", str(max_pending)],
                             capture_output=True, text=True, check=True).stdout.split()
        pending, size, base, peak = map(int, out)
        print(f"{pending:>12}{base / 1e6:>11.0f}{peak / 1e6:>9.0f}{(peak - base) / size:>8.2f}")


def _resident() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["gpt", "digits", "all", "none"], default="all")
    parser.add_argument("--steps", type=int, default=60, help="GPT training steps per block")
    parser.add_argument("--epochs", type=int, default=20, help="digits epochs per block (~470 steps)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="time a snapshot's parts")
    parser.add_argument("--memory", action="store_true", help="peak memory vs max_pending")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_probe is not None:
        memory_probe(args.memory_probe)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.case in ("digits", "all"):
            run_case("digits MLP 64-128-128-10, batch 64", *digits_case(args.epochs),
                     args.rounds, folder)
        if args.case in ("gpt", "all"):
            run_case(f"demo GPT (d=128, 4 layers, batch 32×128), {args.steps} steps",
                     *gpt_case(args.steps), args.rounds, folder)
        if args.breakdown:
            breakdown(folder)
    if args.memory:
        memory()


if __name__ == "__main__":
    main()
