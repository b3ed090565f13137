"""The ``dsran`` command line and the parameter presets of the DVC pipeline."""
