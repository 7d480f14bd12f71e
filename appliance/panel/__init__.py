"""The control panel: a FastAPI app served by the `panel` service."""
