"""Run a real tritonserver for our model repository: from the nvidia-pytriton wheel or an NGC container.

    python -m lsgpt.serving.launcher --model-repository model_repository --grpc-port 8001   # foreground, Ctrl-C stops

    with TritonServer("model_repository", grpc_port=free_port(), ...) as server:   # tests, benchmarks
        server.wait_ready()
        ... server.grpc_url ...

What the launcher gets right so that nobody has to (see docs/platform.md §1):
- the tritonserver binary: $TRITONSERVER, /opt/tritonserver/bin (NGC container) or the pip wheel;
- a backend directory holding the Python backend plus the stub built for *this* interpreter's version
  (the wheel ships one stub per Python version beside the backend, not in it);
- LD_LIBRARY_PATH with this interpreter's LIBDIR first: the wheel's 3.11 stub links Debian's libpython,
  and a libpython that does not match our standard library breaks threading in the models;
- LSGPT_SITE_PACKAGES / LSGPT_ROOT for the backend's model.py (lsgpt/serving/backend/model.py) (the stub's sys.path is isolated);
- a repository *view*: per model this server can run, a copy of its config and a link to its newest version
  that passes lsgpt.format's validating read (a broken one is reported, never loaded). LightSeq's models
  (backend "lightseq") are skipped unless that backend is installed, so one model_repository serves both
  LightSeq's image and ours. The server runs in explicit model control: the launcher polls the repository,
  loads new versions and reloads a model whose process died, model by model (model_repository/README.md);
- no orphans: tritonserver and its model processes die with the launcher (PR_SET_PDEATHSIG, a watchdog), the
  Python backend's /dev/shm regions carry a per-launch prefix and are removed after every stop; SIGTERM drains.
This module needs only the standard library (and lsgpt.contract, which does too).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lsgpt.contract import BACKEND, MODEL_FILE, RELOAD
from lsgpt.serving import proxy as http_proxy

ROOT = Path(__file__).resolve().parents[2]  # the checkout (its model_repository/); LSGPT_ROOT for the stub
CONTAINER_HOME = Path("/opt/tritonserver")
BACKEND_MODEL_PY = Path(__file__).resolve().parent / "backend" / "model.py"  # what Triton runs for our models
DRAIN_BACKEND = "lsgpt_drain"  # the drain's readiness marker (backend/draining.py): never serves
DRAIN_MODEL = "lsgpt_draining"  # its model, put into the view when a drain starts
DRAIN_MODEL_PY = BACKEND_MODEL_PY.parent / "draining.py"
# tritonserver's line on a fatal signal; SIGINT (2) and SIGTERM (15) are stops, which it logs the same way
_FATAL_SIGNAL = re.compile(rb"^Signal \((?!(?:2|15)\))\d+\) received\.", re.M)


class LaunchError(RuntimeError):
    """tritonserver could not be found, started, or did not get ready."""


@dataclass
class Install:
    """Where a tritonserver lives and what it needs."""

    binary: Path
    backends: Path | None  # a ready backend directory (container), or None: build one from the wheel
    python_backend: Path | None = None  # wheel: backends/python (libtriton_python.so)
    stubs: Path | None = None  # wheel: python_backend_stubs/<major.minor>/
    libs: list[Path] = field(default_factory=list)


def find_tritonserver() -> Install:
    """$TRITONSERVER (a binary), then the NGC container's /opt/tritonserver, then the nvidia-pytriton wheel."""
    env = os.environ.get("TRITONSERVER")
    if env:
        b = Path(env)
        if not (b.is_file() and os.access(b, os.X_OK)):
            raise LaunchError(f"TRITONSERVER={env} is not an executable file")
        home = b.resolve().parent.parent
        if (home / "backends" / "python" / "triton_python_backend_stub").exists():
            return Install(b, home / "backends")
        return _wheel_install(home, b) if (home / "python_backend_stubs").is_dir() else Install(b, home / "backends")
    container = CONTAINER_HOME / "bin" / "tritonserver"
    if container.is_file():
        return Install(container, CONTAINER_HOME / "backends")
    spec = importlib.util.find_spec("pytriton")  # locate the wheel without importing PyTriton
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(
            "no tritonserver found: install the serve extra (pip install 'nvidia-pytriton==0.7.0'), "
            "run inside an NGC tritonserver container, or set TRITONSERVER=/path/to/tritonserver"
        )
    home = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return _wheel_install(home, home / "bin" / "tritonserver")


def _wheel_install(home: Path, binary: Path) -> Install:
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = home / "python_backend_stubs" / ver
    if not (stubs / "triton_python_backend_stub").is_file():
        have = sorted(p.name for p in (home / "python_backend_stubs").iterdir())
        raise LaunchError(f"the tritonserver wheel has no Python backend stub for Python {ver} (has {have})")
    libs = [p for p in (home.parent.parent / "nvidia_pytriton.libs", home / "lib") if p.is_dir()]
    return Install(binary, None, home / "backends" / "python", stubs, libs)


def build_backend_dir(inst: Install, workdir: Path) -> Path:
    """The --backend-directory: the Python backend (the wheel's, with our Python's stub copied beside
    libtriton_python.so where the backend looks for it; or the container's, linked) and our Python-based
    backend lsgpt/serving/backend/model.py (Triton runs it through the Python backend for `backend: "lsgpt"` models)."""
    dst = workdir / "backends"
    dst.mkdir(parents=True, exist_ok=True)
    if inst.backends is not None:  # a container: link its backends (python, and any others it has)
        for b in inst.backends.iterdir():
            if b.name != BACKEND:
                (dst / b.name).symlink_to(b.resolve(), target_is_directory=b.is_dir())
    else:
        assert inst.python_backend is not None and inst.stubs is not None
        (dst / "python").mkdir()
        for src in (*inst.python_backend.iterdir(), inst.stubs / "triton_python_backend_stub"):
            if src.is_file():
                shutil.copy2(src, dst / "python" / src.name)
    (dst / BACKEND).mkdir()
    shutil.copy2(BACKEND_MODEL_PY, dst / BACKEND / "model.py")
    (dst / DRAIN_BACKEND).mkdir()
    shutil.copy2(DRAIN_MODEL_PY, dst / DRAIN_BACKEND / "model.py")
    return dst


def child_processes(parent: int) -> dict[int, list[str]]:
    """pid -> argv of each live (not zombie) child process of `parent` (Linux /proc; {} elsewhere)."""
    found: dict[int, list[str]] = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(ppid) == parent and state != "Z" and args and args[0]:
            found[int(d)] = args
    return found


def server_env(inst: Install, device: str | None = None, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's CPU thread pool in each model process
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [libdir, *map(str, inst.libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in parts if p)
    # Every site directory this interpreter sees, in its order (a venv's own first, then the system's
    # when it was made with --system-site-packages; dist-packages on Debian/Ubuntu system Pythons).
    # $LSGPT_SITE_PACKAGES already set: extra folders the models should see first.
    paths = [p for p in os.environ.get("LSGPT_SITE_PACKAGES", "").split(os.pathsep) if p]
    paths += [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    paths += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env["LSGPT_SITE_PACKAGES"] = os.pathsep.join(p for p in dict.fromkeys(paths) if p and os.path.isdir(p))
    env["LSGPT_ROOT"] = str(ROOT)
    env.setdefault("LSGPT_PYTHON", sys.executable)  # runs a model's engine process (serving/engine_process.py)
    if device:
        env["LSGPT_DEVICE"] = device  # overrides the instance kind Triton chose (cpu / cuda / cuda:N)
    return env


# ---------------------------------------------------------------------------------------------
# Which models a server can run.

_RELOAD_RE = re.compile(rb'\nparameters \{ key: "' + RELOAD.encode() + rb'" [^\n]*')  # reload()'s mark in a view config
_BACKEND_RE = re.compile(r'^\s*backend\s*:\s*"([^"]+)"', re.M)
_PLATFORM_RE = re.compile(r'^\s*platform\s*:\s*"([^"]+)"', re.M)


def model_backend(model_dir: Path) -> str | None:
    cfg = model_dir / "config.pbtxt"
    if not cfg.is_file():
        return None
    text = cfg.read_text()
    m = _BACKEND_RE.search(text) or _PLATFORM_RE.search(text)
    return m.group(1) if m else None


def version_dirs(model_dir: Path) -> list[Path]:
    """Numeric version folders (not 0), newest first."""
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")]
    return sorted(versions, key=lambda p: int(p.name), reverse=True)


def latest_version(model_dir: Path) -> Path | None:
    return next(iter(version_dirs(model_dir)), None)


_checked: dict[tuple, str] = {}  # (path, inode, size, mtime) -> "" (loadable) or why not: each file read once


def check_version(version: Path) -> str:
    """"" when the version folder's model file passes lsgpt.format's validating read, else why not. A truncated
    or corrupt file fails here instead of failing tritonserver's start ("failed to load all models")."""
    f = version / MODEL_FILE
    try:
        st = f.stat()
    except OSError:
        return f"no {MODEL_FILE}"
    key = (str(f), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _checked:
        try:
            from lsgpt.format import FormatError, read_hdf5  # h5py + numpy: the serve extra has them
        except ImportError:
            return ""  # nothing to check with: Triton's load decides
        try:
            read_hdf5(f)
            _checked[key] = ""
        except (FormatError, OSError, MemoryError) as e:
            _checked[key] = str(e).splitlines()[0][:300]
    return _checked[key]


def loadable_version(model_dir: Path, broken: dict[str, str] | None = None) -> Path | None:
    """The newest version folder whose model file is loadable; the broken ones newer than it go into `broken`
    (path -> why)."""
    for v in version_dirs(model_dir):
        why = check_version(v)
        if not why:
            return v
        if broken is not None:
            broken[str(v)] = why
    return None


def servable(model_dir: Path, backend_dir: Path, broken: dict[str, str] | None = None) -> tuple[bool, str]:
    """Can this server load the model now? (False, why) for a missing backend or no loadable model file."""
    backend = model_backend(model_dir)
    if backend is None:
        return False, "no config.pbtxt with a backend"
    if not (backend_dir / backend).is_dir():
        return False, f"backend {backend!r} is not installed in {backend_dir}"
    if backend == BACKEND and loadable_version(model_dir, broken) is None:
        return False, f"no version folder with a loadable {MODEL_FILE} (export with --repository first)"
    return True, ""


def place_model(repo_model: Path, view_model: Path, broken: dict[str, str] | None = None) -> bool:
    """Make view_model the served form of repo_model: a copy of config.pbtxt and a link to the newest loadable
    version (backend "lsgpt"), or links to everything (other backends). True when that changed anything."""
    view_model.mkdir(parents=True, exist_ok=True)
    changed = False
    cfg = (repo_model / "config.pbtxt").read_bytes()
    mine = view_model / "config.pbtxt"
    if not mine.is_file() or _RELOAD_RE.sub(b"", mine.read_bytes()) != cfg:
        mine.write_bytes(cfg)  # a copy: reload() adds a parameter to it, never to the user's file
        changed = True
    want = {p.name: p.resolve() for p in repo_model.iterdir() if p.name != "config.pbtxt" and not p.name.startswith(".")}
    if model_backend(repo_model) == BACKEND:  # every version but the newest loadable one is left out
        v = loadable_version(repo_model, broken)
        want = {k: t for k, t in want.items() if not k.isdigit() or (v is not None and k == v.name)}
    for p in view_model.iterdir():
        if p.is_symlink() and (p.name not in want or Path(os.readlink(p)) != want[p.name]):
            p.unlink()
            changed = True
    for name, target in want.items():
        if not (view_model / name).is_symlink():
            (view_model / name).symlink_to(target, target_is_directory=target.is_dir())
            changed = True
    return changed


def repository_view(repo: Path, workdir: Path, backend_dir: Path, models: list[str] | None,
                    broken: dict[str, str] | None = None) -> list[str]:
    """Fill workdir/repository with the models to serve; returns their names. Each model is a folder holding a
    copy of its config.pbtxt and a link to its newest loadable version: a broken newer version is left out
    (and reported in `broken`), so it never stops a (re)start. TritonServer.sync_repository() keeps it current."""
    view = workdir / "repository"
    view.mkdir(parents=True, exist_ok=True)
    names = models or sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    chosen = []
    broken = {} if broken is None else broken
    for name in names:
        ok, why = servable(repo / name, backend_dir, broken) if (repo / name).is_dir() else (False, "no such model")
        if not ok:
            if models:  # asked for by name: say why not
                raise LaunchError(f"cannot serve model {name!r} from {repo}: {why}")
            print(f"[lsgpt.serving.launcher] skipping {name}: {why}", file=sys.stderr)
            continue
        place_model(repo / name, view / name)
        chosen.append(name)
    for path, why in broken.items():
        print(f"[lsgpt.serving.launcher] not serving broken version {path}: {why}", file=sys.stderr, flush=True)
    if not chosen:
        raise LaunchError(f"no servable model in {repo}")
    return chosen


# ---------------------------------------------------------------------------------------------
# The server.


# Exposed mode (docs/security.md): the admin APIs behind a key header; inference, health, metadata and model
# config stay open.
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "lsgpt-admin-key"  # HTTP header
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER  # gRPC metadata key (tritonserver adds the prefix)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def admin_key(env: dict[str, str] | None = None) -> str | None:
    """The admin key: $LSGPT_ADMIN_KEY, else the first line of the file $LSGPT_ADMIN_KEY_FILE (a mounted secret)."""
    env = os.environ if env is None else env
    if env.get("LSGPT_ADMIN_KEY"):
        return env["LSGPT_ADMIN_KEY"].strip()
    path = env.get("LSGPT_ADMIN_KEY_FILE")
    if path:
        try:
            key = Path(path).read_text().strip()
        except OSError as e:
            raise LaunchError(f"LSGPT_ADMIN_KEY_FILE={path}: {e.strerror}") from None
        if not key:
            raise LaunchError(f"LSGPT_ADMIN_KEY_FILE={path} is empty")
        return key
    return None


def restricted_api_args(key: str | None) -> tuple[list[str], str]:
    """tritonserver flags that put ADMIN_APIS behind ADMIN_HEADER, on HTTP and gRPC. No key: a random one that is
    never shown, i.e. the admin APIs are closed. Returns (flags, what to tell the user)."""
    import secrets

    value = key or secrets.token_urlsafe(32)
    if not all(c.isalnum() or c in "-_.~" for c in value):
        raise LaunchError("the admin key may contain letters, digits and -_.~ only")
    spec = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={value}"
    note = (f"admin APIs ({', '.join(ADMIN_APIS)}) need the header '{ADMIN_HEADER}'" if key else
            f"admin APIs ({', '.join(ADMIN_APIS)}) are closed: set LSGPT_ADMIN_KEY or LSGPT_ADMIN_KEY_FILE to use them")
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"], note


def launcher_only_repository_api() -> list[str]:
    """tritonserver flags that put the model-repository API behind a random key (never shown)."""
    import secrets

    spec = f"model-repository:{ADMIN_HEADER}={secrets.token_urlsafe(32)}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver process serving a view of `model_repository` (explicit model control; mode none for
    poll_secs 0)."""

    def __init__(
        self,
        model_repository: str | os.PathLike = ROOT / "model_repository",
        *,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        models: list[str] | None = None,
        poll_secs: int = 5,
        device: str | None = None,
        threads: int | None = None,
        log_file: str | os.PathLike | None = "auto",
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
        exposed: bool | None = None,
        admin_key: str | None = None,
        front: bool | None = None,
        drain_grace: float = 25.0,
    ):
        self.repo = Path(model_repository).resolve()
        self.grpc_port, self.http_port, self.metrics_port, self.host = grpc_port, http_port, metrics_port, host
        self.requested = models
        self.poll_secs, self.device, self.log_verbose, self.extra_args = poll_secs, device, log_verbose, extra_args
        self.threads = threads
        # exposed (default: any address but loopback): admin APIs behind the key (None: closed)
        self.exposed = (not is_loopback(host)) if exposed is None else exposed
        self.admin_key = admin_key
        self.security_note = ""
        # exposed: nginx on the public HTTP and gRPC ports, tritonserver's on loopback (lsgpt/serving/proxy.py)
        self.front = self.exposed if front is None else front
        self.proxy: http_proxy.Nginx | None = None
        self._log_choice = log_file
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.models: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.restarts: list[tuple[float, str]] = []  # (time, why) of each restart by supervise()
        self._stopping = False  # a stop() under way: supervise() stands down (its drain is no crash)
        self._log_seen = 0  # bytes of the log fatal_signal_in_log() has read
        self._fatal_line: str | None = None  # console output: a fatal-signal line _relay saw
        self.drain_grace = drain_grace  # drain(): seconds running requests get to finish before they are ended
        self.reloads: list[tuple[float, str]] = []  # (time, why) of each one-model reload by supervise()
        self.broken: dict[str, str] = {}  # version folder -> why it is not served (a failed validating read)
        self._generation = 0  # reload(): the how-manyth
        self.shm_prefix = ""  # the Python backend's /dev/shm regions of this launch: removed after every stop
        self._load_lock = threading.Lock()
        self._polling: threading.Event | None = None  # set: the poller thread ends
        self._watchdog: subprocess.Popen | None = None  # ends the server's process group if we die
        self._admin_value: str | None = None  # the restricted APIs' header value (exposed mode): for reload()

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{_client_host(self.host)}:{self.http_port}"

    def command(self, backend_dir: Path, binary: Path) -> list[str]:
        restricted: list[str] = []
        if self.exposed:
            restricted, self.security_note = restricted_api_args(self.admin_key)
            self._admin_value = restricted[0].rsplit("=", 1)[1]
        elif self.poll_secs > 0:
            # explicit model control: Triton's load API also takes model files in its body (code the server would
            # run), so on loopback too it needs a key, a random one only the launcher holds (for its own loads)
            restricted = launcher_only_repository_api()
            self._admin_value = restricted[0].rsplit("=", 1)[1]
        # explicit: the launcher loads what its view holds, polls the repository itself (every poll_secs, a thread
        # of start()), validates each new version before Triton sees it, and reloads one model whose process died.
        # poll_secs 0: none, the repository is read once at start (for a repository that others than the
        # publisher can write); a dead model process then restarts the server.
        control = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)] \
            if self.poll_secs > 0 else ["--model-control-mode=none"]
        return [
            str(binary),
            f"--model-repository={self.workdir / 'repository'}",
            f"--backend-directory={backend_dir}",
            *control,
            *restricted,
            f"--grpc-port={self.proxy.grpc[1] if self.proxy and self.proxy.grpc else self.grpc_port}",
            f"--http-port={self.proxy.upstream_port if self.proxy else self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--grpc-address={'127.0.0.1' if self.proxy and self.proxy.grpc else self.host}",
            f"--http-address={'127.0.0.1' if self.proxy else self.host}",
            f"--metrics-address={self.host}",
            "--exit-timeout-secs=10",
            # the Python backend reads its settings under the Python-based backend's name for our models
            *(f"--backend-config={b},shm-region-prefix-name={self.shm_prefix}" for b in ("python", BACKEND, DRAIN_BACKEND)),
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        if not self.repo.is_dir():
            raise LaunchError(f"model repository {self.repo} not found")
        inst = find_tritonserver()
        self._check_ports()
        remove_stale_shm()
        self.workdir = Path(tempfile.mkdtemp(prefix="lsgpt-triton-"))
        try:
            backend_dir = build_backend_dir(inst, self.workdir)
            self.broken = {}
            self.models = repository_view(self.repo, self.workdir, backend_dir, self.requested, self.broken)
            self.backend_dir = backend_dir
            if self.front:
                self.proxy = http_proxy.Nginx(self.host, self.http_port, free_port(), self.workdir,
                                              grpc=(self.grpc_port, free_port())).start()
        except http_proxy.ProxyError as e:
            self.stop()
            raise LaunchError(f"exposed mode: {e} (or --front none if you front tritonserver yourself)") from None
        except BaseException:  # e.g. no servable model: leave no temporary folder behind
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            raise
        out = None
        self._log_seen, self._fatal_line = 0, None
        if self._log_choice is not None:
            self.log_path = self.workdir / "server.log" if self._log_choice == "auto" else Path(self._log_choice)
            out = open(self.log_path, "wb")
        try:
            # Own session: a terminal's Ctrl-C reaches us only; we stop the server gracefully. The console case
            # goes through a relay thread, which watches for a fatal signal as fatal_signal_in_log() does a file.
            self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{os.urandom(3).hex()}_"
            env = dict(server_env(inst, self.device, self.threads), LSGPT_DRAIN_FILE=str(self.workdir / "drain-end"),
                       LSGPT_DRAIN_START_FILE=str(self.workdir / "drain-start"))
            self.proc = subprocess.Popen(
                self.command(backend_dir, inst.binary),
                env=env,
                stdout=out or subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # the launcher's death (kill -9 included) takes tritonserver with it
            )
        finally:
            if out:
                out.close()
        self._watchdog = _start_watchdog(self.proc.pid, self.shm_prefix)
        if self.poll_secs > 0:
            self._polling = threading.Event()
            threading.Thread(target=self._poll, args=(self._polling,), name="lsgpt-poll", daemon=True).start()
        if out is None:
            threading.Thread(target=self._relay, args=(self.proc.stdout,), name="lsgpt-server-log", daemon=True).start()
        return self

    def _check_ports(self) -> None:
        """Refuse to start on a port that something else holds (an orphaned tritonserver answering health checks
        would otherwise be taken for ours)."""
        for what, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver: TIME_WAIT is no holder
                try:
                    s.bind((self.host, port))
                except OSError as e:
                    raise LaunchError(
                        f"the {what} port {self.host}:{port} is taken ({e.strerror}): another tritonserver (one left "
                        "by a killed launcher?) or another program holds it; stop it or choose other ports") from None

    def _relay(self, pipe) -> None:
        """The server's console output, passed on line by line; a fatal-signal line is remembered."""
        sink = getattr(sys.stdout, "buffer", None)
        for line in iter(pipe.readline, b""):
            if _FATAL_SIGNAL.match(line):
                self._fatal_line = line.decode(errors="replace").strip()
            try:
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                else:
                    print(line.decode(errors="replace"), end="", flush=True)
            except (OSError, ValueError):  # our own stdout closed: keep draining the pipe
                pass
        pipe.close()

    def log_tail(self, n: int = 40) -> str:
        if self.log_path and self.log_path.is_file():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return "(log on the console)"

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def is_model_ready(self, model: str, version: str = "") -> bool:
        v = f"/versions/{version}" if version else ""
        return self._get(f"/v2/models/{model}{v}/ready") == 200

    def wait_ready(self, timeout: float = 180.0, models: list[str] | None = None, stop=None) -> None:
        """Block until the server and every served model are ready; LaunchError with the log tail if not.
        Returns early, quietly, once `stop` (an Event, or the CLI's Shutdown) is set."""
        deadline = time.monotonic() + timeout
        pending = list(models or self.models)
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise LaunchError(f"tritonserver exited with code {code}:\n{self.log_tail()}")
            if self._get("/v2/health/live") == 200:
                pending = [m for m in pending if not self.is_model_ready(m)]
                if not pending:
                    return
            time.sleep(0.3)
        raise LaunchError(f"models {pending} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stub_processes(self) -> dict[str, int]:
        """Instance name (gpt2_0_0, ...) -> pid of each live Python-backend stub under this server (Linux /proc;
        empty elsewhere). A killed stub disappears from here while Triton still calls its model ready."""
        live: dict[str, int] = {}
        if self.proc is None or not os.path.isdir("/proc") or not self.models:
            return live
        # exactly <model>_<group>_<n> of a served model: Triton's short-lived stubs that load a model (its name
        # alone) are not instances, and gpt2_ is no prefix of gpt2_stream's (a prefix match restarted the server
        # after every publish)
        instance = re.compile("^(?:" + "|".join(map(re.escape, self.models)) + r")_\d+_\d+$")
        for pid, args in child_processes(self.proc.pid).items():
            if args[0].endswith("triton_python_backend_stub"):
                live.update((a, pid) for a in args if instance.match(a))
        return live

    def fatal_signal_in_log(self) -> str | None:
        """The line where tritonserver reported a fatal signal ("Signal (6) received."), from the part of its log
        written since the last call (or its console output); None if none. Triton's handler for such a
        signal prints a stack trace, and that can hang for good (tritonserver 2.51, aborting on heap corruption
        in its gRPC frontend: the trace forks while another thread holds the allocator's lock), leaving a server
        that neither exits nor answers."""
        if self.log_path is None or not self.log_path.is_file():
            line, self._fatal_line = self._fatal_line, None  # the console case: seen by _relay
            return line
        with open(self.log_path, "rb") as f:
            f.seek(self._log_seen)
            chunk = f.read()
        self._log_seen += len(chunk)
        m = _FATAL_SIGNAL.search(chunk)
        return m.group(0).decode(errors="replace") if m else None

    def supervise(self, stop: threading.Event | Shutdown | None = None, interval: float = 1.0, grace: int = 2,
                  timeout: float = 600.0, unanswered: int = 5) -> None:
        """Keep every model serving, and say what it did on stderr:
        - a model's Python stub dies (an OOM kill, a CUDA fault) and stays gone for `grace` checks (tritonserver
          2.51 keeps calling the model ready but fails every request, "Stub process ... is not healthy"): that
          model alone is reloaded (reload()), the others serve on; a failed reload (or poll_secs 0, no load API)
          restarts the server;
        - tritonserver reports a fatal signal (it may then hang instead of exiting), dies of one, or its liveness
          endpoint has not answered for `unanswered` checks in a row: the server is restarted on the same ports.
        Returns when `stop` is set or the server exits by itself (an exit status, not a signal)."""
        stop = stop or threading.Event()
        expected = set(self.stub_processes())
        strikes = silent = 0
        self.fatal_signal_in_log()  # only what is logged from now on
        while not stop.wait(interval):
            if self.proc is None or self._stopping:
                return
            code = self.proc.poll()
            fatal = self.fatal_signal_in_log()
            if code is not None and code >= 0 and not fatal:
                return
            missing: set[str] = set()
            if code is None:
                live = set(self.stub_processes())
                missing = expected - live
                expected |= live
                strikes = strikes + 1 if missing else 0
                silent = 0 if self._get("/v2/health/live") == 200 else silent + 1
            why = (f"tritonserver reported a fatal signal ({fatal})" if fatal
                   else f"tritonserver died of signal {-code}" if code is not None
                   else f"tritonserver has not answered /v2/health/live for {silent} checks" if silent >= unanswered
                   else None)
            if why is None and strikes >= grace:
                dead = sorted({n.rsplit("_", 2)[0] for n in missing})
                gone = f"model process(es) {', '.join(sorted(missing))} died"
                if self.poll_secs <= 0 or not all(self.reload(m, gone) for m in dead):
                    why = gone if self.poll_secs <= 0 else f"{gone} and reloading failed"
                expected, strikes = set(self.stub_processes()), 0
            if why:
                self._say(f"{why}: restarting tritonserver")
                self.restarts.append((time.time(), why))
                self.stop(timeout=2)  # a crashed or hung server drains nothing
                self.start()
                self.wait_ready(timeout, stop=stop)
                expected, strikes, silent = set(self.stub_processes()), 0, 0
                self._say(f"restarted: models {', '.join(self.models)} ready")

    @staticmethod
    def _say(line: str) -> None:
        print(f"[lsgpt.serving.launcher] {line}", file=sys.stderr, flush=True)

    def _admin(self, path: str, body: bytes = b"{}", timeout: float = 600.0) -> tuple[int, str]:
        """POST to a repository API of our own server (with the admin header in exposed mode): (status, body)."""
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=body, method="POST")
        if self._admin_value:
            req.add_header(ADMIN_HEADER, self._admin_value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)

    def load(self, model: str) -> bool:
        """Triton's repository load of one model from the view: a changed model (new version folder, config,
        or a touched config) is loaded beside the running one, which serves until the new one is ready."""
        with self._load_lock:  # the poller and supervise() both load
            code, body = self._admin(f"/v2/repository/models/{model}/load")
        if code != 200:
            self._say(f"loading {model} failed ({code}): {body[:300]}")
        return code == 200

    def reload(self, model: str, why: str) -> bool:
        """Bring one model back (its process died): its view config is touched, so Triton sees the model changed
        and loads a new instance of it; the other models are not touched."""
        self._say(f"{why}: reloading {model} alone")
        cfg = self.workdir / "repository" / model / "config.pbtxt" if self.workdir else None
        if cfg is None or not cfg.is_file():
            return False
        # A touched config is not enough: Triton compares the configs and an equal one is no reload (the dead
        # instance stays). A parameter the model does not read makes it a new model, loaded beside the dead one.
        text = _RELOAD_RE.sub(b"", cfg.read_bytes()).decode()
        self._generation += 1
        cfg.write_text(text.rstrip("\n") + f'\nparameters {{ key: "{RELOAD}" value {{ string_value: '
                       f'"{self._generation}" }} }}\n')
        t0 = time.monotonic()
        ok = self.load(model)
        if ok:
            self.reloads.append((time.time(), f"{model}: {why}"))
            self._say(f"{model} reloaded in {time.monotonic() - t0:.1f}s")
        return ok

    def _poll(self, done: threading.Event) -> None:
        """What Triton's poll mode did, with every new version validated before Triton sees it."""
        while not done.wait(self.poll_secs):
            if self.proc is not None and self._get("/v2/health/live") == 200:
                self.sync_repository()

    def sync_repository(self) -> list[str]:
        """Poll the repository (what Triton's poll mode did, with each new version validated first): models whose
        newest loadable version or config changed are loaded; broken versions are reported once. Returns the
        models loaded."""
        if self.workdir is None:
            return []
        loaded = []
        for m in self.models:
            broken: dict[str, str] = {}
            try:
                changed = place_model(self.repo / m, self.workdir / "repository" / m, broken)
            except OSError as e:  # a folder removed under us: next time
                self._say(f"reading {self.repo / m}: {e}")
                continue
            for path, why in broken.items():
                if self.broken.get(path) != why:
                    self._say(f"not serving broken version {path}: {why}")
            self.broken.update(broken)
            if changed and self.load(m):
                served = [p.name for p in (self.workdir / "repository" / m).iterdir() if p.name.isdigit()]
                self._say(f"{m}: version {', '.join(served)} loaded")
                loaded.append(m)
        return loaded

    def _busy_models(self) -> list[str]:
        """Our models with a request running or queued, from our metrics (lsgpt_running_rows,
        lsgpt_queued_requests; published every 0.5 s); every model when the metrics cannot be read."""
        try:
            url = f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except (urllib.error.URLError, OSError):
            return list(self.models)
        busy = re.findall(r'^lsgpt_(?:running_rows|queued_requests)\{[^}]*model="([^"]+)"[^}]*\} ([0-9.e+]+)$',
                          text, re.M)
        return sorted({m for m, v in busy if float(v) > 0})

    def _loaded_models(self) -> list[str]:
        """Our models Triton still holds (any state but unloaded), from the repository index."""
        import json

        code, body = self._admin("/v2/repository/index", timeout=5)
        if code != 200:
            return list(self.models)
        try:
            return [e["name"] for e in json.loads(body) if e.get("state") != "UNAVAILABLE" and e["name"] in self.models]
        except (ValueError, KeyError, TypeError):
            return list(self.models)

    def _hold_unready(self, timeout: float) -> threading.Thread | None:
        """Make /v2/health/ready false without unloading anything: load the drain's marker model (backend
        lsgpt_drain), whose initialize waits for the drain-end file and then fails. A loading model is not ready,
        and with strict readiness neither is the server (Kubernetes stops routing to it)."""
        if self.workdir is None:
            return None
        marker = self.workdir / "repository" / DRAIN_MODEL
        (marker / "1").mkdir(parents=True, exist_ok=True)
        (marker / "config.pbtxt").write_text(
            f'name: "{DRAIN_MODEL}"\nbackend: "{DRAIN_BACKEND}"\nmax_batch_size: 0\n'
            'input [ { name: "x", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
            'output [ { name: "y", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
            'instance_group [ { kind: KIND_CPU, count: 1 } ]\n')
        t = threading.Thread(target=self._admin, args=(f"/v2/repository/models/{DRAIN_MODEL}/load",),
                             kwargs=dict(timeout=timeout), name="lsgpt-drain-marker", daemon=True)
        t.start()
        return t

    def _wait_idle(self, t0: float, grace: float) -> bool:
        """Until no model runs or queues a request (two reads of the metrics 0.6 s apart, the first 1 s after the
        drain began: they are published every 0.5 s) or the grace is over; True when idle."""
        quiet = 0
        while self.proc is not None and self.proc.poll() is None and time.monotonic() - t0 < grace:
            if time.monotonic() - t0 >= 1.0:
                quiet = quiet + 1 if not self._busy_models() else 0
                if quiet >= 2:
                    return True
            time.sleep(0.6)
        return False

    def drain(self, grace: float | None = None) -> bool:
        """Stop admitting, let running requests finish within `grace` s (drain_grace), end the rest with
        UNAVAILABLE, so that stop() finds no request inside a model (tritonserver 2.51 exiting with requests in
        flight corrupted its heap). From the first moment new requests get UNAVAILABLE ("the server is shutting
        down", from the models, which stay loaded: the drain-start file) and /v2/health/ready is false (the
        marker model loading, _hold_unready); the models are unloaded once idle or at the end of the grace.
        True when every model unloaded in time. poll_secs 0 (no repository API): the same, but readiness stays
        true until tritonserver's own stop, and nothing is unloaded."""
        grace = self.drain_grace if grace is None else grace
        if self.proc is None or self.proc.poll() is not None or self.workdir is None:
            return False
        t0 = time.monotonic()
        if self._polling is not None:  # no new version is loaded while we drain
            self._polling.set()
            self._polling = None
        (self.workdir / "drain-start").touch()  # the models refuse new requests (backend/model.py)
        marker = self._hold_unready(grace + 60) if self.poll_secs > 0 else None
        if self._wait_idle(t0, grace):
            self._say(f"idle {time.monotonic() - t0:.1f}s after the drain began")
        else:
            self._say(f"drain grace {grace:g}s over: ending the requests still running in "
                      f"{', '.join(self._busy_models()) or 'no model'}")
        (self.workdir / "drain-end").touch()  # what still runs ends now, with UNAVAILABLE; the marker's load fails
        if self.poll_secs <= 0:  # the models stay loaded: a moment for the error responses to go out, then
            time.sleep(1.0)  # Triton's own exit
            return True
        if marker is not None:
            marker.join(15)  # Triton serializes loads and unloads: the marker's failed load first
        for m in self.models:  # unload (may wait for the model): a thread each
            threading.Thread(target=self._admin, args=(f"/v2/repository/models/{m}/unload",),
                             kwargs=dict(timeout=30), daemon=True).start()
        while self.proc is not None and self.proc.poll() is None:
            busy = self._loaded_models()
            if not busy:
                self._say(f"drained in {time.monotonic() - t0:.1f}s")
                return True
            if time.monotonic() - t0 >= grace + 15:
                self._say(f"models {', '.join(busy)} did not unload")
                return False
            time.sleep(0.2)
        return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests and stops its model stubs), SIGKILL if it hangs."""
        self._stopping = True
        try:
            return self._stop(timeout)
        finally:
            self._stopping = False

    def _stop(self, timeout: float) -> int | None:
        code = None
        if self._polling is not None:
            self._polling.set()
            self._polling = None
        if self.proxy is not None:  # first: tritonserver waits (up to its exit timeout) for nginx's open connections
            self.proxy.stop()
            self.proxy = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the stubs go too
                    self.proc.wait()
            try:  # a model stub that outlived its server goes too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            code = self.proc.returncode
            self.proc = None
        if self._watchdog is not None:  # its work is done
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog.stdin.close()
            self._watchdog = None
        remove_shm(self.shm_prefix)  # what a killed server (or a dead model process) left in /dev/shm
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return code

    def kill(self) -> None:
        """SIGKILL tritonserver and its model stubs now, without waiting (safe in a signal handler); stop() then
        reaps it and removes the temporary folder."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the stubs go too
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> TritonServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


SHM_PREFIX = "lsgpt_"  # the Python backend's /dev/shm regions: lsgpt_<launcher pid>_<nonce>_<n>


def remove_shm(prefix: str) -> None:
    if not prefix or not os.path.isdir("/dev/shm"):
        return
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass


def remove_stale_shm() -> None:
    """Regions of launchers that are gone (kill -9: nothing of theirs ran after), of our user."""
    if not os.path.isdir("/dev/shm"):
        return
    for name in os.listdir("/dev/shm"):
        parts = name.split("_")
        if name.startswith(SHM_PREFIX) and len(parts) > 2 and parts[1].isdigit() and not _alive(int(parts[1])):
            try:
                if os.stat(f"/dev/shm/{name}").st_uid == os.getuid():
                    os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_WATCHDOG = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()  # EOF: the launcher is gone (killed: nothing of it runs any more)
try:
    os.killpg(int(sys.argv[1]), signal.SIGKILL)
except OSError:
    pass
for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
    if name.startswith(sys.argv[2]):
        try:
            os.unlink("/dev/shm/" + name)
        except OSError:
            pass
"""


def _start_watchdog(pgid: int, shm_prefix: str) -> subprocess.Popen | None:
    """A tiny process that outlives a killed launcher by a moment: when the pipe from us closes, it kills
    tritonserver's process group (the model stubs too: tritonserver 2.51's stubs outlive their server, waiting on
    it for good) and removes the launch's /dev/shm regions. stop() ends it first on a normal stop."""
    try:
        return subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, str(pgid), shm_prefix], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None


def _die_with_parent():
    """A preexec_fn: PR_SET_PDEATHSIG SIGKILL, so tritonserver dies with the thread that started it (Linux). Only
    from the main thread (the signal follows the creating *thread*): tests start servers from helper threads."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def child() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl
            os._exit(1)
    return child


def _gpu_visible() -> bool:
    """An NVIDIA device node or driver: what tritonserver's probes look for (no torch import needed)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


# ---------------------------------------------------------------------------------------------
# CLI (scripts/serve.sh, `make serve`, the Docker entrypoint).


class Shutdown:
    """SIGINT and SIGTERM for the CLI, handled without raising anything: the handler only records the signal (and
    escalates), the main loop polls is_set(). An exception raised from a handler lands wherever the main thread
    is, and a second one during the stop (a double Ctrl-C; `make serve` sent SIGTERM to its process group: make
    passes the SIGTERM it got on to its child, so the launcher gets two) broke off the stop with a traceback,
    leaving the temporary folder behind and tritonserver running without us.

    The first signal asks for a graceful stop: TritonServer.drain() (new requests refused, running ones get up to
    --drain-grace, then UNAVAILABLE), then stop().
    During it, a SIGINT (a person pressing Ctrl-C again) kills tritonserver and its stubs at once; a repeated
    SIGTERM is ignored (make's copy of the one SIGTERM; docker and Kubernetes escalate with SIGKILL themselves).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, server: TritonServer):
        self.server = server
        self.received: list[int] = []  # appended by the handler only (no lock: a handler must not take one)
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            return
        if signum == signal.SIGINT:
            self.server.kill()
            self._say(b"[lsgpt.serving.launcher] second Ctrl-C: tritonserver killed\n")
        else:
            self._say(b"[lsgpt.serving.launcher] already stopping (Ctrl-C again kills tritonserver at once)\n")

    @staticmethod
    def _say(line: bytes) -> None:
        try:
            os.write(2, line)  # not print(): the main thread may be inside a print to the same stream
        except OSError:
            pass

    def is_set(self) -> bool:
        return bool(self.received)

    def wait(self, timeout: float) -> bool:
        """Like Event.wait (supervise() polls with it): True as soon as a signal came, else after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.received and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.is_set()


def _parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="python -m lsgpt.serving.launcher", description=__doc__.split("\n")[0])
    ap.add_argument("--model-repository", default=os.environ.get("MODEL_REPOSITORY", str(ROOT / "model_repository")))
    ap.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    ap.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    ap.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    ap.add_argument("--host", default=os.environ.get("TRITON_HOST", "127.0.0.1"),
                    help="address to bind (default loopback; 0.0.0.0 in containers)")
    ap.add_argument("--models", default="", help="comma-separated models to serve (default: all servable)")
    ap.add_argument("--poll-secs", type=int, default=int(os.environ.get("LSGPT_POLL_SECS", 5)),
                    help="how often new version folders are picked up; 0: never (read once at start: for a "
                         "repository that others than the publisher can write)")
    ap.add_argument("--exposed", choices=("auto", "yes", "no"), default=os.environ.get("LSGPT_EXPOSED", "auto"),
                    help="admin APIs (repository, shared memory, statistics, trace, logging) behind the key of "
                         "$LSGPT_ADMIN_KEY / $LSGPT_ADMIN_KEY_FILE, closed without one; auto: when --host is "
                         "not loopback")
    ap.add_argument("--front", choices=("auto", "nginx", "none"), default=os.environ.get("LSGPT_FRONT", "auto"),
                    help="nginx on the public HTTP port (body and shape limits; docs/security.md); auto: in "
                         "exposed mode; none: you front tritonserver's HTTP port yourself")
    ap.add_argument("--device", default=os.environ.get("LSGPT_DEVICE"),
                    help="force the engine's device (cpu, cuda, cuda:N); default: the instance kind "
                         "Triton picked (KIND_AUTO: GPU when one is visible)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per model process (OMP_NUM_THREADS); each served model is its own process")
    ap.add_argument("--drain-grace", type=float, default=float(os.environ.get("LSGPT_DRAIN_GRACE", 25)),
                    help="on SIGTERM/Ctrl-C: seconds running requests get to finish (new ones are refused at "
                         "once) before they are ended with UNAVAILABLE; then tritonserver stops (default 25)")
    ap.add_argument("--log-verbose", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the models")
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    a, extra = _parse_args(argv)
    server = TritonServer(
        a.model_repository, grpc_port=a.grpc_port, http_port=a.http_port, metrics_port=a.metrics_port,
        host=a.host, models=[m for m in a.models.split(",") if m] or None, poll_secs=a.poll_secs,
        device=a.device, threads=a.threads, log_file=None, log_verbose=a.log_verbose, extra_args=tuple(extra),
        exposed=None if a.exposed == "auto" else a.exposed == "yes", front=None if a.front == "auto" else a.front == "nginx",
        drain_grace=a.drain_grace,
    )
    shutdown = Shutdown(server)  # SIGTERM (docker stop) behaves like Ctrl-C
    shutdown.install()
    if not _gpu_visible() or (a.device or "").startswith("cpu"):
        print("[lsgpt.serving.launcher] CPU only: tritonserver's start-up lines about CUDA, NVML and DCGM are its GPU "
              "probes failing; they are harmless here", flush=True)
    try:
        return _serve(server, a, shutdown)
    except LaunchError as e:
        print(f"[lsgpt.serving.launcher] {e}", file=sys.stderr)
        return 1
    finally:
        drained = shutdown.is_set() and len(shutdown.received) == 1 and server.drain()
        # drained: no model left, nothing to lose (a model replaced after its process died never finishes unloading
        # in 2.51 and would hold the exit for Triton's whole exit timeout)
        server.stop(timeout=5 if drained else 30)  # nothing interrupts it: the handler raises nothing
        shutdown.restore()


def _serve(server: TritonServer, a, shutdown: Shutdown) -> int:
    """Start, wait for the models, supervise; until the server exits or a signal asks us to stop."""
    server.admin_key = admin_key()
    if not shutdown.is_set():
        server.start()
        if server.security_note:
            print(f"[lsgpt.serving.launcher] exposed mode: {server.security_note}", flush=True)
        if server.exposed:
            print(f"[lsgpt.serving.launcher] exposed mode: HTTP and gRPC {'through nginx (body and shape limits)' if server.proxy else 'NOT fronted (--front none): tritonserver 2.51 crashes on some requests, front it yourself (docs/security.md)'}", flush=True)
        server.wait_ready(a.timeout, stop=shutdown)
    if not shutdown.is_set():
        print(
            f"[lsgpt.serving.launcher] ready: models {', '.join(server.models)} | gRPC {a.host}:{a.grpc_port} "
            f"| HTTP {a.host}:{a.http_port} | metrics {a.host}:{a.metrics_port} | Ctrl-C stops",
            flush=True,
        )
        server.supervise(stop=shutdown, timeout=a.timeout)  # until the server exits; restarts it if a model dies
    if shutdown.is_set():
        print("[lsgpt.serving.launcher] stopping", file=sys.stderr, flush=True)
        return 0
    return server.proc.returncode if server.proc is not None else 0


if __name__ == "__main__":
    sys.exit(main())
