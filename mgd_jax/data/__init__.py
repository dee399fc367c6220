from mgd_jax.data.sources import ArrayDataset, DatasetNotFoundError, load_dataset, load_digits, load_tfds  # noqa: F401
