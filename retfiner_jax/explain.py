"""`python -m retfiner_jax.explain`: the command kept at its name; the code is retfiner_jax/textside/explain.py."""
from retfiner_jax.textside.explain import cli, main  # noqa: F401

if __name__ == "__main__":
  cli()
