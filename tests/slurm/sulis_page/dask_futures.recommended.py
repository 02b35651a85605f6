# dask_futures.py, as printed at https://sulis-hpc.github.io/advanced/ensemble/dask.html,
# with the change docs/migrating.rst recommends (changed lines say 'was:').
import os
import sys
from sulis_executor import SulisDaskExecutor  # was: dask_mpi's initialize, Client

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
    executor = SulisDaskExecutor(local_directory='/tmp')  # was: initialize(...); client = Client()

    # We expect SLURM_NTASKS-2 workers
    N = int(os.getenv('SLURM_NTASKS'))-2 

    # Wait for these workers and report
    num_workers = executor.num_workers  # was: client.wait_for_workers(...); len(client.scheduler_info()['workers'])
    print("%d workers available and ready"%num_workers)

    # Create a list of inputs to the function f
    inputs = range(N)
    
    # Evaluate f for all inputs using a pool of processes
    outputs = executor.map(f, inputs)  # was: client.map(f, inputs)

    print([output for output in outputs])  # was: output.result()

    executor.shutdown()  # was: client.shutdown()

