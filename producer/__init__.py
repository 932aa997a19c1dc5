"""Producers: the job-file reader, submission, and batch status / results."""
