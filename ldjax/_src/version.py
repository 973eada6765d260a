"""The version of ldjax (one place: the package, setup.cfg and on-disk manifests read it)."""

__version__ = "0.2.0"
