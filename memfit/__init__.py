"""memfit: run, serve and train deep-learning models inside a memory budget."""

__version__ = "0.1.0"
