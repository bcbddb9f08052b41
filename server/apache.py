"""Apache httpd as one more backend of the farm, sharing sessions with the tlscache backends.

:func:`write_config` writes a self-contained httpd configuration into the run directory (no
file of ``/etc/apache2`` is read: modules are loaded by absolute path from Debian's
``/usr/lib/apache2/modules``), and :func:`apache_argv` the command line that runs it in the
foreground as one process (``-X``), so that the farm's supervisor can watch and stop it like
any other child. Started as root, httpd reads its certificate and opens its logs first, then
serves as ``www-data`` (if that user exists).

mod_ssl keeps its sessions in the farm's memcached or Redis (``SSLSessionCache``); the tlscache
backends then use :mod:`tlscache.apache` with the same ``ServerName`` (the session id context),
``SSLSessionCacheTimeout``, key prefix and server order, and tickets off on both sides.

Pages: ``/`` names the server; ``/info`` is a JSON line like the tlscache backends' (which
backend, whether the handshake resumed, TLS version), made by mod_include from mod_ssl's
variables.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import HOST, FarmError, TlsVersion

#: Where Debian's apache2-bin keeps the modules.
MODULES_DIR = Path("/usr/lib/apache2/modules")
#: The modules the configuration loads, by module name and file.
MODULES: tuple[tuple[str, str], ...] = (
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("dir_module", "mod_dir.so"),
    ("include_module", "mod_include.so"),
    ("socache_memcache_module", "mod_socache_memcache.so"),
    ("socache_redis_module", "mod_socache_redis.so"),
    ("ssl_module", "mod_ssl.so"),
)
#: The user httpd serves as when started as root.
RUN_USER = "www-data"

_PROTOCOLS = {"1.2": "-all +TLSv1.2", "1.3": "-all +TLSv1.2 +TLSv1.3"}

# mod_include turns this into one JSON line per request, like a tlscache backend's /info.
_INFO_SHTML = (
    '{"backend": "@NAME@", '
    '"server": "apache", '
    '"resumed": <!--#if expr="%{SSL_SESSION_RESUMED} == \'Resumed\'" -->true'
    "<!--#else -->false<!--#endif -->, "
    '"tls_version": "<!--#echo encoding="none" var="SSL_PROTOCOL" -->", '
    '"session_id": "<!--#echo encoding="none" var="SSL_SESSION_ID" -->"}\n'
)


def find_apache() -> str | None:
    """The httpd binary (Debian names it ``apache2``), or None when it or its modules are
    missing."""
    binary = shutil.which("apache2") or shutil.which("apache2", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        return None
    if not all((MODULES_DIR / so).is_file() for _, so in MODULES):
        return None
    return binary


@dataclass(frozen=True)
class ApacheConfig:
    """One Apache backend: where it listens and what its mod_ssl shares with tlscache.

    ``server_name`` and ``public_port`` make ``ServerName host:port``, hence the session id
    context, which every server of the farm must share (the balancer's name and port, not
    this server's own port). ``session_cache`` is the ``SSLSessionCache`` argument
    (``memcache:h:p,h:p`` or ``redis:h:p``).
    """

    run_dir: Path
    port: int
    cert: str
    key: str
    session_cache: str
    server_name: str = "localhost"
    public_port: int = 8443
    session_timeout: int = 300
    tls: TlsVersion = "1.3"
    name: str = "apache"
    host: str = HOST

    @property
    def directory(self) -> Path:
        """Everything of this server lives here: config, pid file, logs, pages."""
        return self.run_dir / self.name

    @property
    def conf(self) -> Path:
        return self.directory / "httpd.conf"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"


def _serving_user() -> pwd.struct_passwd | None:
    """The user httpd switches to: www-data when we are root, None when it keeps our user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_USER)
    except KeyError:
        return None


def _run_as() -> str:
    """``User``/``Group`` lines: as root, serve as www-data; otherwise as whoever runs us."""
    return f"User {RUN_USER}\nGroup {RUN_USER}\n" if _serving_user() is not None else ""


def _can_traverse(st: os.stat_result, user: pwd.struct_passwd) -> bool:
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _let_pages_be_read(cfg: ApacheConfig, user: pwd.struct_passwd) -> None:
    """httpd reads the pages as www-data: give its group passage through the run directory
    (group www-data, g+x: no listing, and nobody else gains anything) and read access to
    the pages. Logs, certificate and config are opened by root before the switch."""
    run_dir = cfg.run_dir.resolve()
    for parent in reversed(run_dir.parents):
        if not _can_traverse(parent.stat(), user):
            raise FarmError(
                f"{RUN_USER} cannot pass through {parent}, so Apache could not read its pages: "
                "choose a --run-dir under a directory others may enter (such as /tmp)"
            )
    gid = user.pw_gid
    st = run_dir.stat()
    if not _can_traverse(st, user):
        os.chown(run_dir, -1, gid)
        run_dir.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXGRP)
    htdocs = cfg.directory / "htdocs"
    for path in (cfg.directory, htdocs):
        os.chown(path, -1, gid)
        path.chmod(0o750)
    for page in htdocs.iterdir():
        os.chown(page, -1, gid)
        page.chmod(0o640)


def render(cfg: ApacheConfig) -> str:
    """The text of httpd.conf for ``cfg``."""
    d = cfg.directory
    modules = "".join(f"LoadModule {name} {MODULES_DIR / so}\n" for name, so in MODULES)
    return f"""# Written by tlscache-farm: all paths absolute, nothing from /etc/apache2.
ServerRoot "{d}"
DefaultRuntimeDir "{d}"
PidFile "{d / "httpd.pid"}"
ErrorLog "{cfg.error_log}"
LogLevel warn ssl:info socache_memcache:info socache_redis:info
LogFormat "%h %t \\"%r\\" %>s %b %{{SSL_PROTOCOL}}x %{{SSL_SESSION_RESUMED}}x" tls
CustomLog "{cfg.access_log}" tls
{modules}{_run_as()}
Listen {cfg.host}:{cfg.port}
ServerName {cfg.server_name}:{cfg.public_port}
ServerTokens Prod
KeepAlive On
KeepAliveTimeout 5
Timeout 30
StartServers 1
ServerLimit 1
ThreadsPerChild 32
MaxRequestWorkers 32

SSLEngine on
SSLCertificateFile "{cfg.cert}"
SSLCertificateKeyFile "{cfg.key}"
SSLProtocol {_PROTOCOLS[cfg.tls]}
SSLSessionCache {cfg.session_cache}
SSLSessionCacheTimeout {cfg.session_timeout}
SSLSessionTickets off

DocumentRoot "{d / "htdocs"}"
<Directory />
    AllowOverride None
    Require all denied
</Directory>
<Directory "{d / "htdocs"}">
    Options None
    Require all granted
</Directory>
<Location "/">
    ForceType text/plain
</Location>
<Location "/info">
    Options +Includes
    SSLOptions +StdEnvVars
    SetHandler server-parsed
    ForceType application/json
</Location>
DirectoryIndex index.txt
"""


def write_config(cfg: ApacheConfig) -> Path:
    """Write httpd.conf and the pages into ``cfg.directory``; returns the config's path."""
    d = cfg.directory
    htdocs = d / "htdocs"
    htdocs.mkdir(parents=True, exist_ok=True)
    (htdocs / "index.txt").write_text(f"{cfg.name}: Apache httpd with mod_ssl\n")
    (htdocs / "info").write_text(_INFO_SHTML.replace("@NAME@", cfg.name))
    cfg.conf.write_text(render(cfg))
    user = _serving_user()
    if user is not None:
        _let_pages_be_read(cfg, user)
    return cfg.conf


def apache_argv(conf: Path, binary: str | None = None) -> list[str]:
    """httpd in the foreground as a single process (``-X``), logging to its ErrorLog."""
    binary = binary or find_apache() or "apache2"
    return [binary, "-X", "-f", str(conf)]


#: The farm's ServerName host (clients reach the balancer as ``localhost``).
SERVER_NAME = "localhost"
#: What to say when httpd cannot be found.
MISSING = (
    "--with-apache needs Apache httpd with mod_ssl, mod_socache_memcache and "
    f"mod_socache_redis in {MODULES_DIR} (Debian/Ubuntu: apt-get install apache2)"
)


def session_cache_directive(mode: str, addresses: Sequence[str]) -> str:
    """Apache's ``SSLSessionCache`` argument for the farm's ``--cache`` servers, in the order
    the backends list them (apr-util places keys by position)."""
    if mode == "memcached" and addresses:
        return "memcache:" + ",".join(addresses)
    if mode == "redis" and len(addresses) == 1:
        return f"redis:{addresses[0]}"
    raise FarmError("--with-apache needs --cache memcached or --cache redis")
