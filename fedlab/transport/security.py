"""Who may talk to the server: certificates, mutual TLS, tokens, allow-lists.

Security is on by default. With a certificate directory (``fedlab certs``) the server speaks
TLS and, when client certificates are present, requires one signed by the run's CA whose
common name is ``client-<id>`` for the id the client claims (mutual TLS). Tokens (a file of
``ID TOKEN`` lines) authenticate clients over server-only TLS, or add a second factor to mutual
TLS. Plaintext needs an explicit ``--insecure`` and is refused on any non-loopback address.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

CA = "ca.pem"
CA_KEY = "ca.key"
SERVER = "server.pem"
SERVER_KEY = "server.key"
ALWAYS_NAMES = ("localhost", "127.0.0.1")
TOKEN_HEADER = "fedlab-token"
RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""The alphabet of run ids: a client names its state file after the run, so an id from the
wire must never be a path."""


class SecurityError(ValueError):
    """A security setting is missing, unreadable or unsafe."""


def check_run_id(run: str, *, source: str = "run id") -> str:
    """``run`` when it is a valid run id (1 to 64 of ``A-Z a-z 0-9 . _ -``, not ``.``/``..``).

    Raises:
        SecurityError: naming ``source`` and the allowed alphabet.
    """
    if not RUN_ID.fullmatch(run) or run in (".", ".."):
        raise SecurityError(
            f"{source} {run[:80]!r} is not valid: a run id is 1 to 64 of the characters "
            "A-Z a-z 0-9 . _ - (and not '.' or '..')"
        )
    return run


def client_name(client_id: int) -> str:
    """The common name of ``client_id``'s certificate."""
    return f"client-{client_id}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def make_certs(
    out: str | os.PathLike[str],
    *,
    server_names: Iterable[str] = (),
    clients: int = 0,
    days: int = 365,
) -> Path:
    """Write a CA, a server certificate and ``clients`` client certificates to ``out``.

    Files: ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``, ``client-<id>.pem`` and
    ``client-<id>.key``; keys are written with mode 0600. The server certificate names
    ``server_names`` (DNS names or IP addresses) plus ``localhost`` and ``127.0.0.1``.

    Raises:
        SecurityError: ``out`` already holds a CA (certificates are never overwritten).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(out)
    if (directory / CA).exists() or (directory / CA_KEY).exists():
        raise SecurityError(f"{directory} already holds a CA; choose another --out")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def write(name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        key_path = directory / f"{name}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlab CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, names: list[str], usage: x509.ObjectIdentifier) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            alt: list[x509.GeneralName] = [
                x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
                for n in names
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        write(common, key, builder.sign(ca_key, hashes.SHA256()))

    write("ca", ca_key, ca_cert)
    names = list(dict.fromkeys([*server_names, *ALWAYS_NAMES]))
    leaf("server", names, ExtendedKeyUsageOID.SERVER_AUTH)
    for cid in range(clients):
        leaf(client_name(cid), [], ExtendedKeyUsageOID.CLIENT_AUTH)
    return directory


def read_tokens(path: str | os.PathLike[str]) -> dict[int, str]:
    """Read a tokens file: one ``ID TOKEN`` per line; blank lines and ``#`` comments skipped.

    Raises:
        SecurityError: unreadable file, malformed line, duplicate id or empty token.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SecurityError(f"cannot read tokens file {path}: {e}") from e
    tokens: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SecurityError(f"{path}:{number}: expected 'CLIENT_ID TOKEN'")
        cid = int(parts[0])
        if cid in tokens:
            raise SecurityError(f"{path}:{number}: client {cid} appears twice")
        tokens[cid] = parts[1]
    return tokens


def parse_ids(text: str) -> frozenset[int]:
    """Client ids from ``"0-9,12"``-style text.

    Raises:
        SecurityError: malformed text.
    """
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise SecurityError(f"expected client ids like '0-9,12', got {text!r}")
        out.update(range(int(lo), int(hi if sep else lo) + 1))
    return frozenset(out)


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` names only this machine."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Policy:
    """The server's rules for admitting a client.

    Attributes:
        num_clients: valid ids are ``0 .. num_clients - 1``.
        mutual: require a client certificate whose CN matches the claimed id.
        tokens: per-client tokens; when given, every call must carry the client's token and
            only the clients listed may connect.
        allowed: if set, only these ids may connect.
        revoked: ids refused whatever their credentials.
    """

    num_clients: int
    mutual: bool = False
    tokens: Mapping[int, str] | None = None
    allowed: frozenset[int] | None = None
    revoked: frozenset[int] = field(default_factory=frozenset)

    def check(self, client_id: int, *, common_name: str | None, token: str | None) -> str | None:
        """``None`` when ``client_id`` is admitted, else the reason it is refused."""
        if not 0 <= client_id < self.num_clients:
            return f"unknown client {client_id}"
        if client_id in self.revoked:
            return f"client {client_id} is revoked"
        if self.allowed is not None and client_id not in self.allowed:
            return f"client {client_id} is not on the allow-list"
        if self.mutual and common_name != client_name(client_id):
            return f"the client certificate does not belong to client {client_id}"
        if self.tokens is not None:
            expected = self.tokens.get(client_id)
            if expected is None:
                return f"client {client_id} has no token on the server"
            # Constant-time comparison, so response timing does not leak the token.
            if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
                return f"bad token for client {client_id}"
        return None


def server_credentials(certs: str | os.PathLike[str], *, mutual: bool) -> grpc.ServerCredentials:
    """gRPC server credentials from a ``fedlab certs`` directory."""
    d = Path(certs)
    hint = f"`fedlab certs --out {d}` makes the server's certificates"
    key, chain = _read(d / SERVER_KEY, hint=hint), _read(d / SERVER, hint=hint)
    ca = _read(d / CA, hint=hint)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=mutual
    )


MAKE_CERTS = "`fedlab certs --out DIR --clients N` (ids 0 .. N-1)"


def client_cert_files(certs: str | os.PathLike[str], client_id: int) -> tuple[Path, Path]:
    """``client-<id>.pem`` and ``client-<id>.key`` in ``certs``."""
    d = Path(certs)
    return d / f"{client_name(client_id)}.pem", d / f"{client_name(client_id)}.key"


def client_credentials(
    certs: str | os.PathLike[str], client_id: int | None, *, require: bool = False
) -> grpc.ChannelCredentials:
    """gRPC channel credentials: trust the run's CA; present ``client-<id>`` when it exists.

    Args:
        certs: a directory from ``fedlab certs`` (at least ``ca.pem``).
        client_id: whose certificate to present (``None``: none, server-only TLS).
        require: refuse when ``client-<id>.pem``/``.key`` are missing (a client with no
            token can prove who it is only with them).

    Raises:
        SecurityError: ``ca.pem`` is missing or unreadable; one of the client's two files
            exists without the other; or ``require`` and the client has neither.
    """
    d = Path(certs)
    ca = _read(d / CA, hint=f"copy it from the directory {MAKE_CERTS} wrote")
    if client_id is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    cert_path, key_path = client_cert_files(d, client_id)
    present = [p.exists() for p in (cert_path, key_path)]
    if any(present) and not all(present):
        have, lack = (cert_path, key_path) if present[0] else (key_path, cert_path)
        raise SecurityError(
            f"{have} exists but {lack} does not: copy both files of client {client_id} "
            f"from the directory {MAKE_CERTS} wrote"
        )
    if not any(present):
        if require:
            raise SecurityError(
                f"no certificate for client {client_id}: {cert_path} and {key_path} are "
                f"missing; {MAKE_CERTS} makes them (copy this client's pair), or, when the "
                "server runs with --tls-only --tokens, pass this client's --token"
            )
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=_read(key_path), certificate_chain=_read(cert_path)
    )


def explain_connection_failure(
    details: str, *, tls: bool, client_cert: str | None = None
) -> str | None:
    """Why a client could not reach the server, when gRPC's ``details`` point at TLS.

    Returns ``"TLS handshake failed: ..."`` with the likely cause, or ``None`` when the
    failure is not a TLS one (the server is down, the address is wrong).

    Args:
        details: the details of a call that failed with ``UNAVAILABLE``.
        tls: whether this client speaks TLS.
        client_cert: the certificate file this client presents, if any.
    """
    text = details.lower()
    if "handshake failed" in text or "verification check failed" in text:
        if "wrong_version_number" in text:
            cause = (
                "the server speaks plaintext (started with --insecure): connect with "
                "--insecure on a loopback address, or start the server with --certs"
            )
        elif "hostname verification" in text or "peer name" in text:
            cause = (
                "the server's certificate does not name the host this client connects to: "
                "pass --server-name NAME, or remake the certificates with "
                "`fedlab certs --server-name HOST`"
            )
        elif any(s in text for s in ("certificate", "signature", "issuer", "verify")):
            cause = (
                "the server's certificate is not signed by this client's ca.pem: copy ca.pem "
                "from the directory `fedlab certs` wrote for this server"
            )
        else:
            cause = "check that client and server use certificates from one `fedlab certs`"
        return f"TLS handshake failed: {cause} ({_last_error(details)})"
    if "socket closed" in text or "connection reset" in text:
        # The server hung up before answering a single call: it refused the handshake.
        if not tls:
            cause = (
                "the server closed the connection; it probably speaks TLS and this client "
                "is plaintext (--insecure): connect with --certs DIR"
            )
        elif client_cert is None:
            cause = (
                "the server closed the connection; it probably requires a client certificate "
                "(mutual TLS) and this client presents none: put client-ID.pem/.key from "
                f"{MAKE_CERTS} in the --certs directory"
            )
        else:
            cause = (
                f"the server closed the connection; it probably does not accept {client_cert} "
                "(signed by another CA than the server's?)"
            )
        return f"TLS handshake failed: {cause} ({_last_error(details)})"
    return None


def _last_error(details: str) -> str:
    """gRPC's ``failed to connect ...; last error: X`` reduced to ``X``."""
    return details.rsplit("last error:", 1)[-1].strip()


def _read(path: Path, *, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        reason = e.strerror or str(e)
        raise SecurityError(f"cannot read {path}: {reason}{'; ' + hint if hint else ''}") from e
