"""One of two gloo processes for tests/test_distributed.py: rank 0 prepares the data for longer
than the training collectives' timeout while rank 1 waits for it, then comes late to a collective.

    RANK=R LOCAL_RANK=R WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/timeout_worker.py OUT_DIR

Writes OUT_DIR/rankR.txt, a line for each thing that happened.
"""

import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import options  # noqa: E402
import runtime  # noqa: E402
import utils  # noqa: E402

COLLECTIVE_SECONDS = 1  # the training collectives' timeout here
LATE_SECONDS = 2  # how long rank 0 keeps the other waiting, each time


def main():
    out_dir = Path(sys.argv[1])
    runtime.COLLECTIVE_TIMEOUT = timedelta(seconds=COLLECTIVE_SECONDS)
    opts, _ = options.parse_flags(["--device", "cpu", "--no-compile"])
    ranks = runtime.setup_runtime(opts)
    lines = []
    started = time.monotonic()

    def prepare():
        if ranks.is_main:
            time.sleep(LATE_SECONDS)  # rank 0 downloads or decodes; the other waits at a barrier
        return "data"

    utils.prepared_in_turns(prepare, ranks)
    lines.append(f"prepared after {time.monotonic() - started:.1f} s")
    if ranks.is_main:
        time.sleep(LATE_SECONDS)
    started = time.monotonic()
    try:
        runtime.any_rank(False, ranks)  # a training collective: the stop request's
        lines.append("collective done")
    except RuntimeError:
        lines.append(f"collective timed out after {time.monotonic() - started:.1f} s")
    (out_dir / f"rank{ranks.rank}.txt").write_text("\n".join(lines) + "\n")
    runtime.stop_distributed()


if __name__ == "__main__":
    main()
