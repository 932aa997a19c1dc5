"""Image engines behind one small interface (see :mod:`worker.engine.base`)."""
