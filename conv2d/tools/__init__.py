"""The commands of ``python -m conv2d``: ``demo`` (train a small CNN), ``bench`` (timings against PyTorch
and the seed) and ``scale`` (Dask workers). They use the library; the library never imports them."""
