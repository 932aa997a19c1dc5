"""The GPU worker: a Celery worker process that owns one device, batches jobs and runs the engine."""
