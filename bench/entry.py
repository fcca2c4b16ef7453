"""`python -m bench.entry run ...`: the real `bulkjob` command line (job.cli.main, unchanged),
which also records what the parent process used, from the parent itself, when it exits.

With BENCH_STATS_DIR set, the parent writes `parent-<pid>.json` there at exit (peak RSS, CPU
seconds) and the time its interpreter reached this module, for the start-up breakdown.
"""

import time

INTERPRETER_UP = time.time()

if __name__ == "__main__":
    import atexit
    import os

    from bench.procstats import write_stats

    directory = os.environ.get("BENCH_STATS_DIR")
    if directory:
        atexit.register(write_stats, directory, "parent", interpreter_up=INTERPRETER_UP)
    from job.cli import main

    main(prog_name="bulkjob")
