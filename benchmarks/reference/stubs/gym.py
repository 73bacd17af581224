"""Stand-in for gym: JAX-CORL's algos/*.py import it at top level and name `gym.Env` in type
annotations of their dataset and evaluation functions, which the timed update never calls."""


class Env:
    """Only referenced by annotations."""
