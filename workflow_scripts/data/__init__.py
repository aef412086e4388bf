"""Datasets: the built-in sets and the preparation of every source into the stored Parquet."""
