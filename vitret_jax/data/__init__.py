"""Data sets in their official layouts, preprocessing, sampling, loaders."""
