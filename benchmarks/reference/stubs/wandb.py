"""Stand-in for wandb: JAX-CORL's algos/*.py import it at top level for logging in their
__main__ block, which benchmarks/reference/jax_corl_update.py does not run."""
