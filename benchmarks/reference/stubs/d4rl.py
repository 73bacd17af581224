"""Stand-in for d4rl: JAX-CORL's algos/*.py import it at top level to load datasets, which the
timed update never does (benchmarks/reference/jax_corl_update.py builds random data instead)."""
