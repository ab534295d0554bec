"""The classifier: the network, its compute twin, the file store and inference (what train writes and every later
stage loads)."""
