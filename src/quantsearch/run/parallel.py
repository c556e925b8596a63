"""Parallel evaluation: a pool of Ray actors, each with its own quantized model, as a pymoo elementwise runner.

pymoo hands an elementwise problem's population to ``problem.elementwise_runner(f, X)``; :class:`RayEvaluationPool`
is such a runner, so ``LayerwiseQuantizationProblem`` stays a plain pymoo problem and any pymoo algorithm runs on
the pool unchanged. Each actor builds the run's model, data split and evaluator once, and takes the driver's
calibration (the same amax tables, so no actor calibrates), on its own device: one GPU each where there are GPUs,
else an equal share of the CPU threads. Candidates go to whichever actor comes free first.

Results do not depend on the number of workers: the driver alone records evaluations (cache, listeners, run
store), in population order, after the population is measured; an actor that dies is replaced and its candidate
measured again. Ray's own serialisation carries settings and measurements between processes; nothing is serialised
to disk.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from typing import Sequence

import numpy as np

from ..search.problem import Measurement, measure

__all__ = ["RayEvaluationPool", "EvaluationWorker", "ray_available"]

log = logging.getLogger("quantsearch")
MAX_ATTEMPTS = 3  # a candidate whose actor dies this many times in a row ends the run (something else is wrong)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class EvaluationWorker:
    """One copy of the run's quantized model and search evaluator, built once (the body of a Ray actor)."""

    def __init__(self, settings: dict, calibration: dict, threads: int | None = None,
                 reject_below: float | None = None):
        import torch

        from ..quantize.calib import Calibration
        from .allocator import keep_freed_memory
        from .session import build_session
        from .settings import ExploreConfig

        keep_freed_memory()
        if threads:
            torch.set_num_threads(threads)
        session = build_session(ExploreConfig(**settings),
                                calibration=Calibration.from_dict(calibration, source="the driver's calibration"))
        self.qmodel, self.evaluate = session.qmodel, session.evaluator("search")
        self.reject_below(reject_below)

    def reject_below(self, floor: float | None) -> None:
        """Early rejection against the driver's floor (None: every candidate in full)."""
        self.evaluate.reject_below(floor)

    def ready(self) -> int:
        return os.getpid()

    def measure(self, key: tuple[int, ...], bar: float | None = None) -> tuple[float, str, str, float, int | None]:
        m = measure(self.qmodel, self.evaluate, key, bar)
        return m.accuracy, m.status, m.message, m.seconds, m.samples


class RayEvaluationPool:
    """``workers`` Ray actors measuring candidates for a :class:`LayerwiseQuantizationProblem` (a pymoo runner).

    Args:
        settings: the run's :class:`~quantsearch.config.ExploreConfig` as a dict (what each actor builds).
        calibration: ``Calibration.to_dict()`` of the driver's calibration (applied by each actor).
        workers: the number of actors.
        address: an existing Ray cluster to join (``"auto"``: this node's); None starts a local Ray.
    """

    def __init__(self, settings: dict, calibration: dict, workers: int, address: str | None = None):
        import ray

        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self.ray = ray
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
        settings = dict(settings)
        on_gpu = str(settings.get("device", "cpu")).startswith("cuda")
        if on_gpu:  # one GPU per actor; Ray sets CUDA_VISIBLE_DEVICES, so each actor sees its GPU as cuda:0
            settings["device"] = "cuda"
            self._options = {"num_gpus": 1, "num_cpus": 1}
            threads = None
        else:
            cpus = int(ray.available_resources().get("CPU", os.cpu_count() or 1)) if address else (
                os.cpu_count() or 1)
            threads = max(1, cpus // workers)
            self._options = {"num_cpus": threads}
        self._threads = threads
        self._settings, self._calibration, self._reject_below = settings, calibration, None
        self._remote = ray.remote(EvaluationWorker).options(**self._options)
        self.actors = [self._spawn() for _ in range(workers)]
        self.done = [0] * workers  # evaluations measured per worker slot
        self.replaced = 0  # actors that died and were replaced
        pids = ray.get([a.ready.remote() for a in self.actors])
        log.info("%d Ray workers ready (%s each; pids %s)", workers,
                 "1 GPU" if on_gpu else f"{threads} CPU thread{'s' * (threads > 1)}", pids)

    def _spawn(self):
        return self._remote.remote(self._settings, self._calibration, self._threads, self._reject_below)

    # -- the pymoo runner -----------------------------------------------------------------------------------
    def __call__(self, f, X) -> list[dict]:
        problem = f.problem
        keys = [problem.configuration(np.rint(np.asarray(x, dtype=float)).astype(int)) for x in X]
        todo = [k for k in dict.fromkeys(keys) if k not in problem.cache]
        measured = self.map(todo, [problem.race_bar(k) for k in todo])
        error = None
        for key in todo:  # population order, whatever order the workers finished in
            try:
                problem.record(key, measured[key])
            except Exception as exc:  # noqa: BLE001 - record the rest (a stop request), then raise the first
                error = error or exc
        if error is not None:
            raise error
        return [f(x) for x in X]  # every configuration is in the cache now

    def map(self, keys: Sequence[tuple[int, ...]],
            bars: Sequence[float | None] | None = None) -> dict[tuple[int, ...], Measurement]:
        """Measure every configuration in ``keys`` on the pool (a free actor takes the next one), each raced
        against its entry in ``bars`` (see ``LayerwiseQuantizationProblem.race_bar``)."""
        ray = self.ray
        bar_of = dict(zip(keys, bars or [None] * len(keys)))
        queue = deque(keys)
        idle = list(range(len(self.actors)))
        running: dict = {}
        attempts: dict[tuple[int, ...], int] = {}
        results: dict[tuple[int, ...], Measurement] = {}
        while queue or running:
            while queue and idle:
                slot, key = idle.pop(0), queue.popleft()
                running[self.actors[slot].measure.remote(key, bar_of[key])] = (slot, key)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                slot, key = running.pop(ref)
                try:
                    results[key] = Measurement(*ray.get(ref))
                    self.done[slot] += 1
                    attempts.pop(key, None)
                except ray.exceptions.RayActorError as exc:
                    attempts[key] = attempts.get(key, 0) + 1
                    if attempts[key] >= MAX_ATTEMPTS:
                        raise RuntimeError(f"Ray worker {slot} died {attempts[key]} times on one candidate: "
                                           f"{str(exc).splitlines()[0]}") from None
                    log.warning("Ray worker %d died; replacing it and measuring its candidate again", slot)
                    self.actors[slot] = self._spawn()
                    self.replaced += 1
                    queue.appendleft(key)
                idle.append(slot)
        return results

    def reject_below(self, floor: float | None) -> None:
        """Turn early rejection on (against ``floor``) or off (None) on every actor, and on any replacement."""
        self._reject_below = floor
        self.ray.get([actor.reject_below.remote(floor) for actor in self.actors])

    def progress(self) -> str:
        """Evaluations per worker, for a progress bar: ``"12/11"``."""
        return "/".join(str(n) for n in self.done)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._started_ray:
            self.ray.shutdown()
