"""cifake-pipeline: the library the DVC stages in ``src/`` share."""
