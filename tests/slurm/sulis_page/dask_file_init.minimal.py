# dask_file_init.py, as printed at https://sulis-hpc.github.io/advanced/ensemble/dask.html,
# with the smallest change to use the executor (changed lines say 'was:').
import os
from dask.distributed import Client
from sulis_executor import SulisDaskExecutor

def f(x):  # added, from dask_futures.py
    return x*x

if __name__ == '__main__':

    # Query SLURM environment per worker task
    p = int(os.getenv('SLURM_CPUS_PER_TASK'))
    mem = os.getenv('SLURM_MEM_PER_CPU')
    mem = str(int(mem)*p)+'MB'

    # We use a schedule file name based on the SLURM job id
    sched_file = os.getenv('SLURM_JOB_ID')+'.sched'
    client = Client(scheduler_file=sched_file, nthreads=p, local_directory='/tmp', memory_limit=mem)

    # We expect SLURM_NTASKS workers
    N = int(os.getenv('SLURM_NTASKS'))

    # Wait for workers and report 
    client.wait_for_workers(n_workers=N)
    num_workers = len(client.scheduler_info()['workers'])
    print("%d workers available and ready"%num_workers)

    # Code which uses Dask features... (added: dask_futures.py's work)
    inputs = range(N)
    with SulisDaskExecutor() as executor:
        outputs = executor.map(f, inputs)
    print([output for output in outputs])

    # Shutdown client now we're done
    client.shutdown()


