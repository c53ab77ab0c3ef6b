"""The HTTP API (FastAPI): InTouch v3 compatible ``webHooks`` and ``events`` resources.

``create_app()`` builds it from the settings; ``notifier up`` and the Procfile's ``web`` serve it
with uvicorn (``uvicorn --factory notifier.api:create_app``).
"""

from notifier.api.app import create_app

__all__ = ["create_app"]
