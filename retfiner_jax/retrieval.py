"""`python -m retfiner_jax.retrieval`: the command kept at its name; the code is retfiner_jax/textside/retrieval.py."""
from retfiner_jax.textside.retrieval import cli, main  # noqa: F401

if __name__ == "__main__":
  cli()
