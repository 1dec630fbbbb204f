"""Model builders: the seeds' networks, scikit-learn baselines, keras.applications backbones."""
