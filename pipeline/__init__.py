"""cifake-pipeline: the library the DVC stages in ``src/`` share."""
import os

# On a GPU, TensorFlow takes all of its memory for the first process; tuning workers share one GPU, so each takes
# what it needs instead. Set before anything imports TensorFlow (a user's own setting wins).
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
