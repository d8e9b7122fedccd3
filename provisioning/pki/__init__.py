"""The PKI: the CA on disk (`directory`: ``ca init``, opening the issuing CA), issuance
(`ca`) behind the `Signer` interface (`signer`: a key file; `pkcs11`: a key in an HSM or
SoftHSM2 token, its record ``ca-keys.toml``), the precomputed DER
template of device certificates (`leaf_der`), the CRL (`crl`) and the CSR checks (`csr`).

May import ``schemas`` and the registry modules (`provisioning.store` for the CRL,
`provisioning.errors`); never ``enrollment``, ``http``, ``console``, ``commands``, ``demo``:
issuing a certificate does not know who asked for it or over what.
"""
