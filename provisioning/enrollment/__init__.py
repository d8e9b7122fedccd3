"""Enrollment and renewal: issuance policy as data (`provisioners`), the service that
validates, authorises, signs and records (`service`), and the group commit of its writes
(`committer`).

May import ``pki``, the registry modules and ``schemas``. Never ``http`` (EST and the JSON
API are handlers in ``http/`` over this service), ``console``, ``commands`` or ``demo``: the
service is called with parsed values and a `Peer`, so it is testable without a listener.
"""
