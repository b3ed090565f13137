"""Stage 1: frozen CNN features of an image folder, written to a Zarr feature store."""
