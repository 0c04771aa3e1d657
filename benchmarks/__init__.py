"""The project's own benchmark harness (not part of the ddpseed package)."""
