"""``devicegate demo`` and ``devicegate simulate``: the product end to end on one machine,
and load against any deployment.

`run` (the sequence), `stack` (scratch PKI, database, broker and both services as child
processes), `factory` (enrolling devices), `traffic` (MQTT over mutual TLS), `attacks`,
`report` (the audit of it all), `simulate` (simulated devices at scale). The demo drives
the product from outside, as an operator and devices would: it may import ``agent``,
``pki`` (the scratch CA), ``audit``, the registry modules and ``schemas``, and starts the
services with ``devicegate serve``; it never imports ``http``, ``console``, ``enrollment``
or ``commands``, and only ``commands`` imports it.
"""
