"""Circles services, one package each; registered under the `circles.services` entry point."""
