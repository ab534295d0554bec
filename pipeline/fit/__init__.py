"""Fitting the classifier (tune, train, advtrain): cached backbone features, the Optuna study, training and
adversarial fine-tuning."""
