# example_futures.py, as printed at https://sulis-hpc.github.io/gettingstarted/batchq/singlenode.html,
# with the change docs/migrating.rst recommends (changed lines say 'was:').
import sys
import concurrent.futures
from sulis_executor import SulisDaskExecutor

if len(sys.argv) != 3:
    print("Usage ", sys.argv[0]," <p> <N>")
    sys.exit()
else:
    p = int(sys.argv[1])
    N = int(sys.argv[2])
    
def f(x):
    return x*x

if __name__ == '__main__':

    # Create a list of inputs to the function f
    inputs = range(N)
    
    # Evaluate f for all inputs using a pool of processes
    with SulisDaskExecutor() as executor:  # was: concurrent.futures.ProcessPoolExecutor(max_workers=p)
        results = executor.map(f, inputs)

    print([result for result in results])
