"""External renderers (FluidSynth, flite, espeak-ng, ffmpeg) run side by side for the corpus generators."""
import subprocess
from typing import List, Sequence, Tuple, Type


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
