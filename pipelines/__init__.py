"""The pipeline: Hydra-composed stages, each an MLflow run, landscapes in Zarr.

The only package that imports Hydra, MLflow and dask; the library in ``landscapes`` knows
none of them.
"""
