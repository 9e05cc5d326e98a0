"""OCT–report data: manifests, image decoding and preprocessing, Grain pipelines, the synthetic corpus."""
