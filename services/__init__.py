"""Stages, sources and pipeline definitions that both the Python API and the Procfile use.

``demo``: the seed notebook's stages; ``vision``: a small OpenCV pipeline."""
