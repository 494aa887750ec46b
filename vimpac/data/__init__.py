"""Stage 1 inputs: dataset readers, the synthetic corpus and input collection."""
