#!/usr/bin/env python3
"""An identity provider as users run one, for the end-to-end tests: PyJWT (from PyPI, with
cryptography) makes an RSA-2048 key and a P-256 key, and prints one JSON object with the JWKS
that publishes them and tokens they sign:

  {"jwks": {"keys": [...]}, "tokens": {NAME: TOKEN, ...}}

NAME is what the token claims; see `tokens` below. Usage: jwt_issuer.py
"""

import json
import sys
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


def jwk(algorithm, key, kid):
    entry = json.loads(algorithm.to_jwk(key.public_key()))
    entry["kid"] = kid
    entry["use"] = "sig"
    return entry


def main():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [jwk(RSAAlgorithm, rsa_key, "rsa1"), jwk(ECAlgorithm, ec_key, "ec1")]}
    now = int(time.time())
    hour = now + 3600
    read = lambda path: [{"action": "read", "path": path}]

    def rs256(claims):
        return jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa1"})

    def es256(claims):
        return jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec1"})

    tokens = {
        # whep.streams, RS256: demo only.
        "rs256_demo": rs256({"exp": hour, "whep": {"streams": ["demo"]}}),
        # MediaMTX's claim, ES256: a regular expression that matches demo.
        "es256_mediamtx_regex": es256({"exp": hour, "mediamtx_permissions": read("~^de")}),
        # MediaMTX's claim as a JSON string (issuers that emit only strings): demo.
        "es256_mediamtx_string_demo": es256(
            {"exp": hour, "mediamtx_permissions": json.dumps(read("demo"))}
        ),
        # MediaMTX's claim for another stream only.
        "rs256_mediamtx_other": rs256({"exp": hour, "mediamtx_permissions": read("other")}),
        # MediaMTX's claim granting publishing only.
        "rs256_mediamtx_publish": rs256(
            {"exp": hour, "mediamtx_permissions": [{"action": "publish", "path": ""}]}
        ),
        # Expired an hour ago.
        "rs256_expired": rs256({"exp": now - 3600, "whep": {"streams": ["*"]}}),
    }
    json.dump({"jwks": jwks, "tokens": tokens}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
