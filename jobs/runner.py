"""The process a local job runs in: `train` on the job's config, then its exit code and peak memory.

`exit.json` is written last, atomically: a job directory without it and without a live runner is a
run the platform lost (the platform or the machine died), which the queue starts again; `train`'s
`resume: auto` then continues from the last checkpoint.

    python -m jobs.runner JOB_DIR
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from kernel.fsutil import atomic_write_text
from training import cli as train_cli


def main(job_dir: str) -> int:
    d = Path(job_dir)
    code = 1
    try:
        code = train_cli.main([str(d / "config.yaml")])
    finally:
        peak_kb = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        atomic_write_text(d / "exit.json", json.dumps({"code": code, "peak_rss_bytes": peak_kb * 1024}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
