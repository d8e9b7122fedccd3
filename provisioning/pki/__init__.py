"""The PKI: the CA on disk, issuance behind the `Signer` interface (a file key today, an
HSM later), the precomputed DER template of device certificates, the CRL and the CSR checks.

May import ``schemas`` and the registry modules (`provisioning.store` for the CRL,
`provisioning.errors`); never ``enrollment``, ``http``, ``console``, ``commands``, ``demo``:
issuing a certificate does not know who asked for it or over what.
"""
