"""Side by side for the corpus generators: external renderers (FluidSynth, flite, espeak-ng, ffmpeg) and
the per-clip jobs in worker processes."""
import concurrent.futures
import subprocess
from typing import Callable, List, Optional, Sequence, Tuple, Type


def run_side_by_side(cmds: Sequence[Sequence[str]], timeout: float, error: Type[Exception],
                     what: str) -> List[Tuple[int, str, str]]:
    """Start every command at once and wait for all -> ``[(returncode, stdout, stderr), ...]`` in order.

    A command that cannot start raises ``error`` naming it and ``what`` it was for; on any error or
    interrupt (a timeout, Ctrl-C) the commands still running are killed and reaped, never left behind.
    """
    procs = []
    try:
        for argv in cmds:
            try:
                procs.append(subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
            except OSError as e:
                raise error(f"could not run {argv[0]} ({what}): {e}") from e
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def map_jobs(fn: Callable, jobs: Sequence, workers: int, desc: str, unit: str, progress: bool = True,
             initializer: Optional[Callable] = None, initargs: tuple = (),
             on_worker_error: Optional[Callable] = None) -> list:
    """``[fn(job) for job in jobs]`` with a progress bar, in ``workers`` processes when more than one.

    Results come back in the order of ``jobs`` whatever order the workers finish in. ``initializer``
    (with ``initargs``) runs once per worker process, or once here when the jobs run in this process.
    A worker that dies (killed, out of memory) raises, unless ``on_worker_error(job, exc)`` turns the
    failure into that job's result.
    """
    from tqdm import tqdm

    results: list = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, initializer=initializer,
                                                        initargs=initargs) as pool:
                futures = {pool.submit(fn, job): k for k, job in enumerate(jobs)}
                for fut in concurrent.futures.as_completed(futures):
                    k = futures[fut]
                    try:
                        results[k] = fut.result()
                    except Exception as e:  # noqa: BLE001 -- a worker died, or fn raised
                        if on_worker_error is None:
                            raise
                        results[k] = on_worker_error(jobs[k], e)
                    bar.update()
        else:
            if initializer is not None:
                initializer(*initargs)
            for k, job in enumerate(jobs):
                results[k] = fn(job)
                bar.update()
    return results
