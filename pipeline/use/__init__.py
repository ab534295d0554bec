"""Using a model: labelling folders of images (predict), Spark batch scoring and Grad-CAM."""
