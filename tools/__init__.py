"""Command-line tools: weight conversion, reference-bundle checks, the synthetic data grid."""
