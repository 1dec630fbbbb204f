"""One module per DVC stage; stages meet only through the files dvc.yaml declares."""
