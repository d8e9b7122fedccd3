"""What runs on a device: make a key and a CSR, enroll with a bootstrap token, renew over
mutual TLS, keep the device directory consistent across a crash, and the TLS context for
the gateway.

The agent imports ``schemas`` (the API models it speaks) and nothing else of devicegate:
it is the client side, so it must not lean on the server's code (the test of import
boundaries holds it to that). The demo and ``devicegate simulate`` run exactly this code.
"""
