"""`from retfiner_jax.api import RetFinerModel` kept at its name; the code is retfiner_jax/textside/api.py."""
from retfiner_jax.textside.api import RetFinerModel  # noqa: F401
