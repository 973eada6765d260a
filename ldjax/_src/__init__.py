"""The engine: K, A, G and the one-step decomposition. Private; ``ldjax/__init__.py`` is its
face."""
