# dask_file_init.py, as printed at https://sulis-hpc.github.io/advanced/ensemble/dask.html,
# with the change docs/migrating.rst recommends (changed lines say 'was:').
import os
from sulis_executor import SulisDaskExecutor  # was: from dask.distributed import Client

def f(x):  # added, from dask_futures.py
    return x*x

if __name__ == '__main__':

    # Query SLURM environment per worker task
    p = int(os.getenv('SLURM_CPUS_PER_TASK'))
    mem = os.getenv('SLURM_MEM_PER_CPU')
    mem = str(int(mem)*p)+'MB'

    executor = SulisDaskExecutor(local_directory='/tmp')  # was: client = Client(scheduler_file=...)

    # We expect SLURM_NTASKS workers
    N = int(os.getenv('SLURM_NTASKS'))

    # Wait for workers and report 
    num_workers = executor.num_workers  # was: client.wait_for_workers(...); len(client.scheduler_info()['workers'])
    print("%d workers available and ready"%num_workers)

    # Code which uses Dask features... (added: dask_futures.py's work)
    inputs = range(N)
    outputs = executor.map(f, inputs)
    print([output for output in outputs])

    # Shutdown client now we're done
    executor.shutdown()  # was: client.shutdown()


