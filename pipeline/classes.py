"""The two classes, named once. Index = label: REAL is 0, FAKE is 1, the positive class of every figure."""

CLASSES = ("REAL", "FAKE")  # CIFAKE's folder names
LABELS = ("Real", "Fake")  # the values of the deliverable's `Predicted Label` column
