"""TLS credentials made for one job, and handed only to its own processes.

Dask's default comms are plain TCP without authentication: anyone who can
reach the scheduler's port, including other users on a shared login or
compute node, could submit code that runs as us. So a cluster the executor
starts itself uses TLS with mutual authentication, and a key pair made for
this job alone: a client or worker without it is refused.

The key never appears on a command line, in an environment or in a
world-readable file. Local workers read it from a file created with mode 0600
inside a directory created with mode 0700, whose path they read on their
standard input; ``srun`` workers read the key itself on their standard input
(see ``launchers.srun``); MPI ranks get it in an MPI message. An
elliptic-curve key is used because it is generated in about a millisecond,
where the 2048-bit RSA key of ``Security.temporary()`` takes tens of
milliseconds of startup.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Any

#: The name the certificate is issued to; every role presents the same one.
COMMON_NAME = "dask-internal"


class DeferredSecurity:
    """A ``distributed.Security`` to be made by ``make()`` when a launcher
    needs it (see :func:`resolve_security`).

    Making credentials costs about 60 ms (mostly importing ``cryptography``),
    which a launcher that starts its workers first can spend while they
    start, instead of before.
    """

    def __init__(self, make: Any) -> None:
        self.make = make


def resolve_security(security: Any) -> Any:
    """``security`` itself, or what a :class:`DeferredSecurity` makes."""
    return security.make() if isinstance(security, DeferredSecurity) else security


def generate_credentials() -> dict[str, str]:
    """A fresh self-signed key and certificate, as PEM text."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(COMMON_NAME)]), critical=False)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return {
        "key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        "cert": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def security_from(credentials: dict[str, str]) -> Any:
    """A ``distributed.Security`` requiring TLS with these credentials."""
    from distributed.security import Security

    key, cert = credentials["key"], credentials["cert"]
    return Security(
        require_encryption=True,
        tls_ca_file=cert,
        tls_client_key=key,
        tls_client_cert=cert,
        tls_scheduler_key=key,
        tls_scheduler_cert=cert,
        tls_worker_key=key,
        tls_worker_cert=cert,
    )


def credentials_of(security: Any) -> dict[str, str]:
    """The worker credentials held in memory by a ``Security`` object."""
    return {"key": security.tls_worker_key, "cert": security.tls_worker_cert}


class CredentialsFile:
    """The credentials in a private file, for worker processes to read.

    ``directory`` must be reachable by every worker: the default temporary
    directory for local workers; a shared file system for other nodes.
    """

    def __init__(self, credentials: dict[str, str], directory: str | None = None) -> None:
        self.directory = tempfile.mkdtemp(prefix="sulis-executor-", dir=directory)  # mode 0700
        self.path = os.path.join(self.directory, "credentials.json")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(credentials, f)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def read_credentials_file(path: str) -> dict[str, str]:
    """Load credentials, refusing a file that others could have read or written."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise PermissionError(
            f"{path} is readable or writable by other users (mode {oct(mode & 0o777)}); "
            f"refusing to use it as the cluster's credentials"
        )
    with open(path) as f:
        credentials: dict[str, str] = json.load(f)
    return credentials


def process_authkey() -> str:
    """This process's ``multiprocessing`` authentication key, as hex.

    ``ProcessPoolExecutor``'s workers inherit it, and a ``Manager`` proxy
    passed to a call authenticates with it: the workers we start get it
    too, as they get the TLS credentials: in local and ``srun`` mode in
    their greeting (on standard input), never on a command line or in an
    environment; in MPI mode in the message that carries the credentials.
    """
    return bytes(multiprocessing.current_process().authkey).hex()
