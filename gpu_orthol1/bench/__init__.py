"""`gpu-orthol1 bench`: gpu_orthol1 against what a user would write instead, and against the hardware limit.

The harness, by layer (each module imports only the ones above it):

- env.py: facts about the machine (CPU and GPU names, versions, caches, load), shared with the CLI;
- base.py: the case, method and row vocabulary, and the memory/GPU probes;
- methods.py: the timed methods (gpu_orthol1, the peers, the limits);
- flags.py: judging rows afterwards (disturbed timings, missed CPU promises);
- report.py: tables, headline, CSV, plot;
- runner.py: the measuring loop (`Bench`) and its configuration (`BenchConfig`);
- command.py: the command line (`main`).

    gpu-orthol1 bench --help        python -m gpu_orthol1.bench --help
"""

from .command import main

__all__ = ["main"]
