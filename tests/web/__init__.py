"""Tests of the status page, metrics, logging and deployment files."""
