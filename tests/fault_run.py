"""recipes/distill_glue.py with a fault injected through a step callback (ad2_ds.testing.FaultAt), for the fault
tests: ``python tests/fault_run.py --fault kill@7 ARGS`` (also under the deepspeed launcher)."""

import sys

from ad2_ds.dist import clean_exit
from ad2_ds.testing import FaultAt
from recipes import distill_glue

if __name__ == "__main__":
    argv = sys.argv[1:]
    i = argv.index("--fault")
    fault = FaultAt.parse(argv[i + 1])
    clean_exit(distill_glue.main(argv[:i] + argv[i + 2 :], callbacks=[fault]))
