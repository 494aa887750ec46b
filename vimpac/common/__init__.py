"""Pieces that two or more stages use: config, archive format, video decoding, checkpoints."""
