"""``serve run serve/config.yaml`` imports ``serve.app:build_app``: the mapping application.

Everything lives in :mod:`atlas.service` (testable without a cluster); this file only names the
builder for Serve's ``import_path``. ``args:`` in the config are :class:`atlas.service.config.ServiceArgs`.
"""

from atlas.service.app import build_app
from atlas.service.config import ServiceArgs

__all__ = ["ServiceArgs", "build_app"]
