"""Side-by-side benchmarks of SulisDaskExecutor and its competitors; see README.md."""
