"""The provisioning HTTPS service: the listener and its lifecycle (`server`), the JSON API
(`api`), EST (`est`), the OpenAPI document, RFC 9457 problems and the one reason-to-status
table (`problems`), the rate limit on failed token attempts (`ratelimit`), and what the
handlers share (`common`).

Handlers stay thin: they parse, authorise and call ``enrollment``, ``audit``, ``pki`` and
the registry modules. The server mounts the ``console`` pages, which share its application
keys. Never imports ``commands`` or ``demo``.
"""
