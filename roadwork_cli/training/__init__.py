"""Training: ``api.train`` (every mode), the cached and live loops, their shared epoch skeleton and artifacts."""
