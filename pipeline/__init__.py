"""Reproducible image classification: DVC stages, MLflow tracking, Keras 3 models."""
import os

# oneDNN doubles CNN training speed on this CPU but changes float results slightly: pin it on,
# before any stage imports TensorFlow, so every run computes the same way.
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

from pipeline import trace  # noqa: E402

if os.environ.get(trace.ENV):  # tests/test_dvc_deps.py: every project file a stage reads, from the first import
    trace.start(Path.cwd())
