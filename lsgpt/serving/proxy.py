"""nginx in front of tritonserver's HTTP port in exposed mode (docs/security.md §4).

tritonserver 2.51 (the nvidia-pytriton wheel, NGC 24.10) crashes on one unauthenticated HTTP request:
- a POST of >= 600,000 small chunks (Transfer-Encoding: chunked): SIGSEGV (CVE-2025-23310/23311, fixed in 25.07);
- an infer request whose JSON declares a huge shape (`"shape": [1, 1099511627776]`): std::bad_alloc, SIGABRT.
So in exposed mode the launcher binds tritonserver's HTTP port to loopback on an internal port and puts nginx
(the distribution's: `apt-get install nginx libnginx-mod-http-js`) on the public one. nginx
- reads the whole body before forwarding it (`proxy_request_buffering on`): a chunked body reaches tritonserver
  reassembled, with a Content-Length; a body over `max_body` bytes is refused (413) before tritonserver sees it;
- checks every POST whose body is an inference request (JSON, or the JSON header of the binary extension) in
  njs (check.js below): each input's shape must be non-negative integers whose product is at most
  `max_elements`, and its JSON `data` must hold exactly that many elements; otherwise 400, from nginx;
- bounds the time a client may take to send its headers and body, and the header size;
- fronts the gRPC port the same way (HTTP/2, `grpc_pass`): each call's request bytes are capped (`max_body` a
  unary call, `max_stream_body` a stream over its life), so tritonserver's gRPC server, which reads a message of
  up to 2 GiB into memory first, never holds more than that of one call.

    proxy = Nginx("0.0.0.0", 8000, upstream_port=8100, log_dir=Path("logs"), grpc=(8001, 8101)).start()
    ...
    proxy.stop()

Standard library only (the launcher imports it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lsgpt.contract import MAX_STEP_LIMIT

# The largest valid request: a batch of 8 prompts (max_batch_size of every config.pbtxt) of at most
# MAX_STEP_LIMIT ids; as JSON about 100 KiB. 1 MiB leaves room for text prompts and sampling inputs.
MAX_BATCH = 8
MAX_ELEMENTS = MAX_BATCH * MAX_STEP_LIMIT
MAX_BODY = 1 << 20
MAX_STREAM_BODY = 64 << 20  # a gRPC stream's requests over its whole life (about 200,000 prompts of 64 tokens)
JS_MODULE_DIRS = (Path("/usr/lib/nginx/modules"), Path("/usr/lib64/nginx/modules"), Path("/etc/nginx/modules"))
INSTALL_HINT = "apt-get install nginx libnginx-mod-http-js"


class ProxyError(RuntimeError):
    """nginx could not be found or started."""


def find_nginx() -> tuple[Path, Path]:
    """(the nginx binary, its njs module): $LSGPT_NGINX or PATH or /usr/sbin/nginx; $LSGPT_NGINX_JS_MODULE or the
    distribution's module folder. ProxyError naming the packages when either is missing."""
    found = os.environ.get("LSGPT_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    binary = Path(found)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ProxyError(f"nginx not found (PATH, /usr/sbin/nginx, $LSGPT_NGINX): {INSTALL_HINT}")
    candidates = [Path(os.environ["LSGPT_NGINX_JS_MODULE"])] if os.environ.get("LSGPT_NGINX_JS_MODULE") else \
        [d / "ngx_http_js_module.so" for d in JS_MODULE_DIRS]
    module = next((p for p in candidates if p.is_file()), None)
    if module is None:
        raise ProxyError(f"nginx's njs module (ngx_http_js_module.so) not found in "
                         f"{', '.join(str(p.parent) for p in candidates)}: {INSTALL_HINT}")
    return binary, module


# The request check, in njs (nginx's JavaScript, 0.7.x): every POST body that is an inference request.
CHECK_JS = r"""
var MAX_ELEMENTS = %(max_elements)d;
var MAX_DIMS = 8;

function leaves(v, limit) {  // elements of a nested JSON array, counting stops past limit
    if (!Array.isArray(v)) return 1;
    var n = 0;
    for (var i = 0; i < v.length && n <= limit; i++) n += leaves(v[i], limit - n);
    return n;
}

function shapeError(inp) {
    if (typeof inp !== 'object' || inp === null) return 'an input is not an object';
    var name = String(inp.name).slice(0, 64);
    if (!Array.isArray(inp.shape) || inp.shape.length > MAX_DIMS) return 'input ' + name + ': bad shape';
    var n = 1;
    for (var i = 0; i < inp.shape.length; i++) {
        var d = inp.shape[i];
        if (typeof d !== 'number' || !Number.isInteger(d) || d < 0) return 'input ' + name + ': bad shape';
        n *= d;
        if (n > MAX_ELEMENTS) return 'input ' + name + ': shape ' + JSON.stringify(inp.shape).slice(0, 80) +
            ' holds more than ' + MAX_ELEMENTS + ' elements';
    }
    if (inp.data !== undefined && leaves(inp.data, n) !== n)
        return 'input ' + name + ': data does not hold the ' + n + ' elements of its shape';
    return null;
}

function refuse(r, why) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(why.indexOf('too large') >= 0 ? 413 : 400, JSON.stringify({error: 'refused by the proxy: ' + why}) + '\n');
}

function inspect(r) {  // why the request is refused, or null
    if (r.method !== 'POST' && r.method !== 'PUT') return null;
    var body;
    try { body = r.requestBuffer; } catch (e) { body = undefined; }
    // in a file: more than client_body_buffer_size on the wire (a chunked body with its chunk framing)
    if (body === undefined) return r.headersIn['Content-Length'] === '0' ? null : 'request body too large';
    if (!body.length) return null;
    var head = r.headersIn['Inference-Header-Content-Length'];
    if (head !== undefined) {
        if (!/^[0-9]{1,9}$/.test(head) || Number(head) > body.length) return 'bad Inference-Header-Content-Length';
        body = body.slice(0, Number(head));
    }
    var req;
    try { req = JSON.parse(body.toString()); } catch (e) { return 'the body is not JSON (or nests too deep)'; }
    if (req === null || typeof req !== 'object' || req.inputs === undefined) return null;
    if (!Array.isArray(req.inputs)) return 'inputs is not a list';
    for (var i = 0; i < req.inputs.length; i++) {
        var why = shapeError(req.inputs[i]);
        if (why) return why;
    }
    return null;
}

function check(r) {
    var why;
    try { why = inspect(r); } catch (e) { why = 'the request could not be checked'; }
    if (why) return refuse(r, why);
    r.internalRedirect('@triton');
}

export default {check};
"""

CONF = """
daemon off;
worker_processes 1;
%(user)s
pid %(prefix)s/nginx.pid;
error_log %(logs)s/nginx-error.log warn;
load_module %(js_module)s;
events { worker_connections 4096; }
http {
    access_log %(logs)s/nginx-access.log;
    client_body_temp_path %(prefix)s/tmp/body;
    proxy_temp_path %(prefix)s/tmp/proxy;
    fastcgi_temp_path %(prefix)s/tmp/fastcgi;
    uwsgi_temp_path %(prefix)s/tmp/uwsgi;
    scgi_temp_path %(prefix)s/tmp/scgi;
    server_tokens off;
    # bodies: at most max_body, kept whole in memory (the check reads them), sent on with a Content-Length
    client_max_body_size %(max_body)d;
    client_body_buffer_size %(max_body)d;
    client_body_in_single_buffer on;
    client_header_buffer_size 4k;
    large_client_header_buffers 4 16k;
    client_header_timeout 15s;
    client_body_timeout 15s;
    send_timeout 60s;
    keepalive_timeout 65s;
    js_import check from %(prefix)s/check.js;
    upstream triton {
        server 127.0.0.1:%(upstream_port)d;
        keepalive 32;
    }
    server {
        listen %(listen)s;
        error_page 413 = @too_large;
        location / {
            js_content check.check;
        }
        location @triton {
            proxy_pass http://triton;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering on;
            proxy_buffering off;  # /generate_stream: server-sent events as they come
            proxy_connect_timeout 5s;
            proxy_read_timeout %(read_timeout)ds;
            proxy_send_timeout 60s;
        }
        location @too_large {
            default_type application/json;
            return 413 '{"error":"refused by the proxy: request body larger than %(max_body)d bytes"}\\n';
        }
    }
%(grpc)s}
"""

# gRPC (HTTP/2) in front of tritonserver's gRPC port: its gRPC server reads a message of up to 2 GiB into memory
# before anything checks it. nginx counts each call's request bytes and resets the call past the cap, so
# tritonserver holds at most that much of any call. A unary call gets max_body (the largest valid request is
# about 32 KiB); a stream (ModelStreamInfer) carries many requests over its life (perf_analyzer --streaming keeps
# one per client), so it gets max_stream_body in all. Errors come back as gRPC statuses, not HTTP pages.
GRPC_CONF = """
    server {
        listen %(listen)s http2;
        client_max_body_size %(max_body)d;
        client_body_timeout %(read_timeout)ds;  # a stream sends its request, then waits for tokens
        error_page 413 = @grpc_too_large;
        error_page 502 504 = @grpc_unavailable;
        grpc_read_timeout %(read_timeout)ds;
        grpc_send_timeout %(read_timeout)ds;
        grpc_connect_timeout 5s;
        location / {
            grpc_pass grpc://grpc_triton;
        }
        location = /inference.GRPCInferenceService/ModelStreamInfer {
            client_max_body_size %(max_stream_body)d;
            grpc_pass grpc://grpc_triton;
        }
        location @grpc_too_large {
            default_type application/grpc;
            add_header grpc-status 8 always;
            add_header grpc-message "refused by the proxy: request larger than the front's limit" always;
            return 204;
        }
        location @grpc_unavailable {
            default_type application/grpc;
            add_header grpc-status 14 always;
            add_header grpc-message "the server behind the proxy is not answering; retry" always;
            return 204;
        }
    }
    upstream grpc_triton {
        server 127.0.0.1:%(grpc_upstream_port)d;
        keepalive 32;
    }
"""


def _listen(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        return str(port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Nginx:
    """nginx as a child process: config, njs check, temp folders and pid under `workdir`; logs in `log_dir`
    (default `workdir`): nginx-error.log, nginx-access.log."""

    def __init__(self, host: str, port: int, upstream_port: int, log_dir: Path,
                 max_body: int = MAX_BODY, max_elements: int = MAX_ELEMENTS, read_timeout: int = 600,
                 grpc: tuple[int, int] | None = None, max_stream_body: int = MAX_STREAM_BODY):
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.grpc = grpc  # (public port, tritonserver's loopback gRPC port): front gRPC too
        self.max_stream_body = max_stream_body
        self.log_dir = Path(log_dir)
        self.workdir: Path | None = None  # the prefix: config, check.js, pid, temp folders (removed by stop)
        self.max_body, self.max_elements, self.read_timeout = max_body, max_elements, read_timeout
        self.proc: subprocess.Popen | None = None

    def render(self, js_module: Path) -> str:
        # as root: the worker runs as nobody (the master reads the config and check.js and opens the logs)
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        grpc = "" if self.grpc is None else GRPC_CONF % dict(
            listen=_listen(self.host, self.grpc[0]), grpc_upstream_port=self.grpc[1], max_body=self.max_body,
            max_stream_body=self.max_stream_body, read_timeout=self.read_timeout)
        return CONF % dict(user=user, prefix=self.workdir, logs=self.log_dir, js_module=js_module,
                           max_body=self.max_body, upstream_port=self.upstream_port,
                           listen=_listen(self.host, self.port), read_timeout=self.read_timeout, grpc=grpc)

    def start(self, timeout: float = 10.0) -> Nginx:
        binary, module = find_nginx()
        # its own folder, 0755: as root, nginx's worker runs as nobody and writes large bodies under tmp/
        self.workdir = Path(tempfile.mkdtemp(prefix="lsgpt-nginx-"))
        self.workdir.chmod(0o755)
        (self.workdir / "tmp").mkdir()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "check.js").write_text(CHECK_JS % dict(max_elements=self.max_elements))
        (self.workdir / "nginx.conf").write_text(self.render(module))
        self.proc = subprocess.Popen(
            [str(binary), "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"),
             "-e", str(self.log_dir / "nginx-error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not all(self._listening(p) for p in self.ports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ProxyError(f"nginx did not start on {self.host}:{'/'.join(map(str, self.ports))}:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.05)
        return self

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,) if self.grpc is None else (self.port, self.grpc[0])

    def _listening(self, port: int) -> bool:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "::1" if self.host == "::" else self.host
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    def log_tail(self, n: int = 20) -> str:
        log = self.log_dir / "nginx-error.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else "(no error log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGQUIT (finish the requests in flight), SIGKILL to the group if that takes longer than `timeout`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: a worker left behind goes too
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
