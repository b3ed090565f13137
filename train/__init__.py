"""Stage 2: the DSRAN model and its trainer, reading features from a Zarr store."""
