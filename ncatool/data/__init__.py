"""Data in and out: image I/O with geometry, mock data, nnU-Net layout, torch datasets."""
