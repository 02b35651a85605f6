"""Keep Dask's own logs out of the user's output unless asked for.

Dask logs at INFO and WARNING from the scheduler and workers, and at
shutdown often logs errors about comms that were closed on purpose. None of
that is the user's business in a normal run, so the ``distributed`` loggers
are raised to CRITICAL, unless ``verbose=True`` or the user has configured
them already (a level set on them is left alone).
"""

from __future__ import annotations

import logging

# distributed.client and distributed.gc get levels of their own from Dask's
# logging config, so silencing "distributed" alone does not reach them.
_DASK_LOGGERS = ("distributed", "distributed.client", "distributed.gc", "dask", "tornado", "bokeh")


def silence_dask_logs(verbose: bool) -> None:
    for name in _DASK_LOGGERS:
        log = logging.getLogger(name)
        if verbose:
            if log.level == logging.CRITICAL:
                log.setLevel(logging.INFO if name == "distributed" else logging.WARNING)
        elif log.level in (logging.NOTSET, logging.INFO, logging.WARNING):
            # Dask's own logging config sets INFO/WARNING; NOTSET is untouched.
            log.setLevel(logging.CRITICAL)


#: Dask's event loops check themselves for stalls every 20 ms, in the
#: scheduler and in every worker, only to log a warning (silenced unless
#: verbose). Once a second is enough for that.
NO_STALL_CHECK = {"distributed.admin.tick.interval": "1s"}
