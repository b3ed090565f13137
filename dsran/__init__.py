"""dsran: the Dual Semantic Relationship Attention Network for image-text matching.

The stages live in subpackages: ``dsran.extract`` (frozen CNN features into Zarr),
``dsran.train`` (the DSRAN model and its trainer), ``dsran.evaluate`` (the Recall@K
protocols) and ``dsran.pipelines`` (the ``dsran`` command and parameter presets).
"""

__version__ = "0.1.0"
