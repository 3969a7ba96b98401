"""Sweeps: a sweep file expanded to trials, run as ordinary labep runs on dask.distributed."""
