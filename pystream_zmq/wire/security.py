"""CURVE on ZeroMQ links: key files, the allow-list of client keys (a ZAP handler), and the
rule that an address other hosts can reach is bound only with CURVE, or on purpose.

Roles follow who binds. A socket that binds is a CURVE server: it needs the process's secret
key, and the ZAP handler of its context checks every client's public key against an
allow-list directory (CURVE without a ZAP handler accepts any client key, so a server socket
is never made without one). A socket that connects is a client: it needs the process's key
pair and the public key of the process it connects to. A process has one key pair, used
both ways.

Key files are those of ``zmq.auth.create_certificates``: ``NAME.key`` holds the public key,
``NAME.key_secret`` both keys. ``generate`` writes the secret file with mode 0600 (zmq.auth
leaves it readable by everyone), and ``load_key_pair`` refuses one other users can read, as
ssh does.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.auth
from zmq.utils import z85

from pystream_zmq.errors import SecurityError
from pystream_zmq.wire import endpoints

if TYPE_CHECKING:  # imports asyncio: only processes that use CURVE pay for it
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PRIVATE = 0o077  # permission bits for group and others

_PUBLIC_FILE = """\
#   ZeroMQ CURVE Public Certificate, written by pystream {what}
#   Share it: with the processes that connect to this one (their --curve-server-key),
#   and in the --curve-allow directory of the processes this one connects to.

metadata
curve
    public-key = "{public}"
"""
_SECRET_FILE = """\
#   ZeroMQ CURVE **Secret** Certificate, written by pystream {what}
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions (0600).

metadata
curve
    public-key = "{public}"
    secret-key = "{secret}"
"""


@dataclass(frozen=True)
class Curve:
    """A process's CURVE settings, applied to every socket it binds or connects."""

    public: bytes  # the process's key pair, Z85-encoded (40 characters each)
    secret: bytes = field(repr=False)
    allow: str | None = None  # directory of the client public keys (*.key) its servers accept
    server_keys: Mapping[str, bytes] = field(default_factory=dict)  # endpoint: server's key
    server_key: bytes | None = None  # the server key of endpoints not in server_keys

    def server_key_for(self, endpoint: str) -> bytes:
        key = self.server_keys.get(endpoint, self.server_key)
        if key is None:
            raise SecurityError(f"no CURVE server key for {endpoint}")
        return key


# -- addresses -------------------------------------------------------------------------------
def is_loopback(endpoint: str) -> bool:
    """Whether only this machine can reach an endpoint: ipc://, inproc://, or tcp on
    127.0.0.0/8, ::1 or localhost. Anything else (``*``, another address, an interface or
    host name, text that is not an endpoint) counts as reachable from the network."""
    try:
        parsed = endpoints.parse(endpoint)
    except ValueError:
        return False
    if parsed.scheme in (endpoints.IPC, endpoints.INPROC):
        return True
    return (
        parsed.scheme == endpoints.TCP and parsed.host is not None and is_loopback_host(parsed.host)
    )


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (without brackets) or localhost; not "" or "*" (every interface),
    nor another name (it may be reachable)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(endpoint: str, *, secured: bool, insecure: bool, hint: str) -> None:
    """Refuse to bind an address other hosts can reach without CURVE, unless ``insecure``."""
    if secured or insecure or is_loopback(endpoint):
        return
    raise SecurityError(
        f"refusing to bind {endpoint}: it is not a loopback address, and without CURVE "
        f"anyone who can reach it could read and inject items; {hint}"
    )


# -- sockets ---------------------------------------------------------------------------------
def bind(sock: zmq.Socket[Any], endpoint: str, curve: Curve | None) -> str:
    """Bind ``sock``, as a CURVE server when ``curve`` is given; the endpoint bound (for
    ``tcp://HOST:*``, with the port the OS chose)."""
    _prepare(sock, endpoint)
    if curve is not None:
        if curve.allow is None:  # CURVE would accept any client key
            raise SecurityError(f"a CURVE server ({endpoint}) needs an allow-list of client keys")
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def connect(sock: zmq.Socket[Any], endpoint: str, curve: Curve | None) -> None:
    """Connect ``sock``, as a CURVE client of the server key ``curve`` has for ``endpoint``."""
    _prepare(sock, endpoint)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key_for(endpoint))
    sock.connect(endpoint)


def _prepare(sock: zmq.Socket[Any], endpoint: str) -> None:
    try:
        ipv6 = endpoints.parse(endpoint).is_ipv6
    except ValueError:
        return  # bind() or connect() refuses it, with ZeroMQ's own error
    if ipv6:
        sock.setsockopt(zmq.IPV6, 1)


def start_authenticator(ctx: zmq.Context[Any], curve: Curve | None) -> ThreadAuthenticator | None:
    """Start the ZAP handler of ``ctx``: its CURVE server sockets then accept only the client
    keys in ``curve.allow`` (read now: restart to take new keys). Start it before binding.
    None when there is no allow-list: then the process has no CURVE server socket."""
    if curve is None or curve.allow is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=curve.allow)
    if "*" not in auth.certs:  # zmq.auth logged why; every client would be refused
        auth.stop()
        raise SecurityError(f"{curve.allow}: cannot read the allowed client keys")
    log.debug("CURVE: %d allowed client keys in %s", len(auth.certs["*"]), curve.allow)
    return auth


def stop_authenticator(auth: ThreadAuthenticator | None) -> None:
    if auth is not None:
        auth.stop()


# -- key files -------------------------------------------------------------------------------
def load_key_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``NAME.key_secret`` file; refuses one other users can read."""
    public, secret = _load(path)
    if secret is None:
        raise SecurityError(f"{path}: holds no secret key (give the NAME{SECRET_SUFFIX} file)")
    mode = os.stat(path).st_mode & 0o777
    if mode & _PRIVATE:
        raise SecurityError(
            f"{path}: the secret key can be read by other users (mode {mode:04o}); chmod 600 {path}"
        )
    return public, secret


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key in a ``NAME.key`` (or ``NAME.key_secret``) file."""
    return _load(path)[0]


def check_allow_dir(path: str | os.PathLike[str]) -> int:
    """How many client keys an allow-list directory holds (its ``*.key`` files); refuses a
    missing or empty directory and malformed key files."""
    if not os.path.isdir(path):
        raise SecurityError(f"{path}: not a directory (of allowed client public keys)")
    files = sorted(Path(path).glob(f"*{PUBLIC_SUFFIX}"))
    if not files:
        raise SecurityError(f"{path}: holds no *{PUBLIC_SUFFIX} files: no client could connect")
    for file in files:
        _load(file)
    return len(files)


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{path}: not a key file ({e})") from e
    for key in (public, secret):
        if key is not None and not _well_formed(key):
            raise SecurityError(f"{path}: malformed key (expected 40 Z85 characters)")
    return public, secret


def _well_formed(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def generate(
    directory: str | os.PathLike[str], names: Sequence[str], *, force: bool = False
) -> list[tuple[Path, Path]]:
    """Write a key pair per name, ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret``
    (secret, mode 0600); a new ``DIR`` gets mode 0700, an existing one must not be open to
    other users. Refuses to overwrite keys unless ``force``. [(public file, secret file)]."""
    folder = Path(directory)
    for name in names:
        if not _KEY_NAME.fullmatch(name):
            raise SecurityError(f"invalid key name {name!r}: use letters, digits, '_', '.', '-'")
    if folder.exists():
        if not folder.is_dir():
            raise SecurityError(f"{folder}: not a directory")
        mode = folder.stat().st_mode & 0o777
        if mode & 0o007:
            raise SecurityError(
                f"{folder}: other users can open it (mode {mode:04o}); chmod o-rwx {folder}, "
                "or give a new directory (it is created with mode 0700)"
            )
    else:
        folder.mkdir(mode=0o700, parents=True)
        folder.chmod(0o700)  # mkdir's mode goes through the umask
    pairs = [(folder / f"{n}{PUBLIC_SUFFIX}", folder / f"{n}{SECRET_SUFFIX}") for n in names]
    existing = [str(path) for pair in pairs for path in pair if path.exists()]
    if existing and not force:
        raise SecurityError(f"keys exist, not overwritten: {', '.join(existing)} (--force)")
    for public_path, secret_path in pairs:
        public, secret = zmq.curve_keypair()
        keys = {"what": "keys generate", "public": public.decode(), "secret": secret.decode()}
        write_key_file(secret_path, _SECRET_FILE.format(**keys), 0o600)
        write_key_file(public_path, _PUBLIC_FILE.format(**keys), 0o644)
        mode = secret_path.stat().st_mode & 0o777
        if mode != 0o600:  # e.g. a file system that ignores modes
            raise SecurityError(f"{secret_path}: mode is {mode:04o}, not 0600")
    return pairs


def write_key_file(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` with ``mode`` (whatever the umask), through a temporary
    file created with that mode, so the secret is never readable by others, even briefly."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # os.open's mode went through the umask too
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            fd = -1  # the stream closes it
            stream.write(text)
        os.replace(partial, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        partial.unlink(missing_ok=True)
        raise


def run_keys(allow_dir: str) -> Curve:
    """CURVE for one run of the Python API: a fresh key pair that the orchestrator and its
    workers share (they get it over their private stdin pipe), used as the server key of
    every socket that binds and as the client key of every socket that connects; the
    allow-list holds just its public key, so only the run's own processes get in."""
    public, secret = zmq.curve_keypair()
    write_allow_dir(allow_dir, public)
    return Curve(public, secret, allow=allow_dir, server_key=public)


def write_allow_dir(allow_dir: str, public: bytes) -> None:
    """A new allow-list directory (mode 0700) holding the run's one public key: made by the
    orchestrator, and again on each cluster node, where the workers' ZAP handlers read it."""
    os.mkdir(allow_dir, 0o700)
    text = _PUBLIC_FILE.format(what="for one run", public=public.decode())
    write_key_file(Path(allow_dir) / f"run{PUBLIC_SUFFIX}", text, 0o644)
