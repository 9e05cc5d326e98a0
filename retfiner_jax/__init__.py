"""retfiner_jax: RetFiner (vision-language refinement of retinal OCT foundation models) in JAX/Flax."""
