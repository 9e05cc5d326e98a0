"""`python -m retfiner_jax.zeroshot`: the command kept at its name; the code is retfiner_jax/textside/zeroshot.py."""
from retfiner_jax.textside.zeroshot import cli, main  # noqa: F401

if __name__ == "__main__":
  cli()
