"""Where the images come from and how they become the arrays the stages read: fetch and preprocess."""
