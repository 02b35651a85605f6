"""A script with a journaled map, run by tests/test_journal.py (and the SLURM test).

    python journal_script.py JOURNAL MARKS STOP OUT

Maps ``work`` over ``range(STOP)`` (and submits ``work(1000)``); each call
leaves a file in MARKS, so the tests count executions; the results are
pickled to OUT.
"""

import os
import pickle
import sys
import time
import uuid
from fractions import Fraction

from sulis_executor import SulisDaskExecutor

DELAY = 0.05


def work(x):
    with open(os.path.join(MARKS, f"{x}-{uuid.uuid4().hex}"), "w"):
        pass
    time.sleep(DELAY)
    return x, Fraction(x, 3), {"square": x * x}


MARKS = sys.argv[2]

if __name__ == "__main__":
    journal, _, stop, out = sys.argv[1:5]
    with SulisDaskExecutor(journal=journal) as ex:
        extra = ex.submit(work, 1000)
        results = list(ex.map(work, range(int(stop)), chunksize=1))
        results.append(extra.result())
    with open(out, "wb") as handle:
        pickle.dump(results, handle)
    print("done", flush=True)
