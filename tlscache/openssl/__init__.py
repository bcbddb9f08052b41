"""tlscache.openssl: OpenSSL's external session cache callbacks for pyOpenSSL servers.

``resolver`` finds and verifies the OpenSSL functions the bindings do not expose;
``callbacks`` wires them to a Python handler. This package is the only code that touches cffi.
"""

from tlscache.openssl.callbacks import (
    DEFAULT_SESSION_ID_CONTEXT,
    SessionCallbacks,
    default_session_id_context,
    install_callbacks,
    session_id,
)
from tlscache.openssl.resolver import Resolution, resolve

__all__ = [
    "DEFAULT_SESSION_ID_CONTEXT",
    "Resolution",
    "SessionCallbacks",
    "default_session_id_context",
    "install_callbacks",
    "resolve",
    "session_id",
]
