"""cifake-pipeline: the library the DVC stages in ``src/`` share."""
import os

# On a GPU, TensorFlow takes all of its memory for the first process; tuning workers share one GPU, so each takes
# what it needs instead. Set before anything imports TensorFlow (a user's own setting wins).
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
# TensorFlow turns its oneDNN kernels on by itself only on some CPUs (AVX-512 ones); without them a gradient through
# the backbone's 1x1 and 2x2 feature maps runs several times slower (AVX2-only CPUs; bench/README.md#onednn-and-xla).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
