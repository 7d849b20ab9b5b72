"""Benchmarks of OrchestratR beside Celery and Dramatiq (see ``run.py``)."""
