"""TLS credentials from PEM files, checked before gRPC sees them, for the cloud and the edge."""
from __future__ import annotations

from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from pipeline.trust.addresses import TrustError


def _read(path: Path, flag: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read the {what} {path} ({flag}): {exc.strerror}") from None
    if not data.strip():
        raise TrustError(f"the {what} {path} ({flag}) is empty")
    return data


def _certificates(path: Path, flag: str) -> tuple[bytes, list[x509.Certificate]]:
    data = _read(path, flag, "certificate file")
    try:
        return data, x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TrustError(
            f"{path} ({flag}) holds no PEM certificate; give a file with -----BEGIN CERTIFICATE-----"
        ) from None


def _key_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    cert_pem, chain = _certificates(cert, "--tls-cert")
    key_pem = _read(key, "--tls-key", "private key")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TrustError(f"the private key {key} (--tls-key) is encrypted; give it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TrustError(f"{key} (--tls-key) holds no PEM private key") from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(der, spki) != private.public_key().public_bytes(der, spki):
        raise TrustError(
            f"the private key {key} (--tls-key) does not belong to the certificate {cert} (--tls-cert)"
        )
    return key_pem, cert_pem


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for the cloud; with ``client_ca``, mutual TLS: edges must show a certificate it signed."""
    key_pem, cert_pem = _key_pair(cert, key)
    ca_pem = _certificates(client_ca, "--tls-client-ca")[0] if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for the edge: trust ``ca`` (None: the system roots); ``cert`` and ``key`` for mutual TLS."""
    if cert is not None and key is None:
        raise TrustError(f"the certificate {cert} (--tls-cert) needs its private key: add --tls-key")
    if key is not None and cert is None:
        raise TrustError(f"the private key {key} (--tls-key) needs its certificate: add --tls-cert")
    ca_pem = _certificates(ca, "--tls-ca")[0] if ca is not None else None
    key_pem, cert_pem = _key_pair(cert, key) if cert is not None and key is not None else (None, None)
    return grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
