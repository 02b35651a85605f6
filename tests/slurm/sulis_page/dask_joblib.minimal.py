# dask_joblib.py, as printed at https://sulis-hpc.github.io/advanced/ensemble/dask.html,
# with the smallest change to use the executor (changed lines say 'was:').
import os
import sys
from dask_mpi import initialize
from dask.distributed import Client
from sulis_executor import SulisDaskExecutor

import joblib

if len(sys.argv) != 2:
    print("Usage ", sys.argv[0]," <N>")
    sys.exit()
else:
    N = int(sys.argv[1])
    
def f(x):
    return x*x

if __name__ == '__main__':

    # Query SLURM environment per worker task
    p = int(os.getenv('SLURM_CPUS_PER_TASK'))
    mem = os.getenv('SLURM_MEM_PER_CPU')
    mem = str(int(mem)*p)+'MB'

    # Initialise Dask cluster and client interface
    initialize(interface = 'eth0', nthreads=p, local_directory='/tmp', memory_limit=mem)  # was: 'ib0'
    executor = SulisDaskExecutor()  # was: client = Client()

    # We expect SLURM_NTASKS-2 workers
    N = int(os.getenv('SLURM_NTASKS'))-2 

    # Wait for these workers and report
    executor.client.wait_for_workers(n_workers=N)  # was: client.wait_for_workers(...)

    num_workers = len(executor.client.scheduler_info()['workers'])  # was: client.scheduler_info()
    print("%d workers available and ready"%num_workers)

    # Create a list of inputs to the function f
    inputs = range(N)
    
    # Associate a list of outputs with delayed calls to f
    # with p processes available to evaluate them.
    with joblib.parallel_backend('dask'):
        output_list = joblib.Parallel(n_jobs=N)(joblib.delayed(f)(i) for i in inputs)

    # Printing the outputs will cause then to be evaluated
    for output in output_list:
        print(output)

    executor.shutdown()  # was: client.shutdown()

