"""A thin cffi (ABI mode) binding of libmodsecurity 3's C API.

ABI mode: the declarations below are parsed by cffi at import and the shared library is
``dlopen``-ed, so neither a compiler nor ``libmodsecurity-dev`` is needed at run time. The
declarations mirror ``modsecurity/modsecurity.h``, ``rules_set.h``, ``transaction.h`` and
``intervention.h`` of libmodsecurity 3.0.9 (Debian 12).

Ownership, which the C API leaves implicit and this module makes explicit:

- ``ModSecurity`` (``msc_init`` / ``msc_cleanup``), ``RuleSet`` (``msc_create_rules_set`` /
  ``msc_rules_cleanup``) and ``Transaction`` (``msc_new_transaction_with_id`` /
  ``msc_transaction_cleanup``) each own one C object and free it exactly once in ``close()``
  (idempotent); they are also context managers.
- The ``error`` out-parameter of ``msc_rules_add*`` is a ``strdup``-ed string the caller frees
  (3.0.9 has no ``msc_rules_error_cleanup``), and so are the ``url`` and ``log`` fields that
  ``msc_intervention`` fills (3.0.9 has no ``msc_intervention_cleanup``): both go to libc
  ``free``, which matches the library's ``strdup``/``malloc``.

Threads: cffi releases the GIL around every call into the library. Loading rules is not
thread-safe in libmodsecurity (the SecLang parser keeps global state, upstream issue #2536), so
every load is serialised by ``_LOAD_LOCK``. Evaluating transactions that share one ``RuleSet``
from several threads is supported upstream (issue #3215) and proved by the stress test in
``tests/waypoint/test_waf.py``.

The log callback re-enters Python (cffi takes the GIL for it). It receives the ``logCbData``
pointer given to the transaction at creation, which is a cffi handle to that transaction's
``LogSink``; messages are therefore attributed to their own transaction whatever thread runs
it. The callback only appends the text: parsing happens later, outside the callback.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import cffi  # type: ignore[import-untyped]

_CDEF: Final = """
typedef struct ModSecurity_t ModSecurity;
typedef struct RulesSet_t RulesSet;
typedef struct Transaction_t Transaction;

typedef struct ModSecurityIntervention_t {
    int status;
    int pause;
    char *url;
    char *log;
    int disruptive;
} ModSecurityIntervention;

typedef void (*ModSecLogCb)(void *, const void *);

ModSecurity *msc_init(void);
const char *msc_who_am_i(ModSecurity *msc);
void msc_set_connector_info(ModSecurity *msc, const char *connector);
void msc_set_log_cb(ModSecurity *msc, ModSecLogCb cb);
void msc_cleanup(ModSecurity *msc);

RulesSet *msc_create_rules_set(void);
int msc_rules_add_file(RulesSet *rules, const char *file, const char **error);
int msc_rules_add(RulesSet *rules, const char *plain_rules, const char **error);
int msc_rules_cleanup(RulesSet *rules);

Transaction *msc_new_transaction_with_id(ModSecurity *ms, RulesSet *rules, char *id, void *logCbData);
int msc_process_connection(Transaction *transaction, const char *client, int cPort,
                           const char *server, int sPort);
int msc_process_uri(Transaction *transaction, const char *uri, const char *protocol,
                    const char *http_version);
int msc_add_n_request_header(Transaction *transaction, const unsigned char *key, size_t len_key,
                             const unsigned char *value, size_t len_value);
int msc_process_request_headers(Transaction *transaction);
int msc_append_request_body(Transaction *transaction, const unsigned char *body, size_t size);
int msc_process_request_body(Transaction *transaction);
int msc_process_response_headers(Transaction *transaction, int code, const char *protocol);
int msc_add_n_response_header(Transaction *transaction, const unsigned char *key, size_t len_key,
                              const unsigned char *value, size_t len_value);
int msc_append_response_body(Transaction *transaction, const unsigned char *body, size_t size);
int msc_process_response_body(Transaction *transaction);
int msc_intervention(Transaction *transaction, ModSecurityIntervention *it);
int msc_process_logging(Transaction *transaction);
void msc_transaction_cleanup(Transaction *transaction);

void free(void *ptr);
"""

LIBRARY_NAME: Final = "libmodsecurity.so.3"

ffi: Any = cffi.FFI()
ffi.cdef(_CDEF)


class WafLibraryError(RuntimeError):
    """libmodsecurity is missing or refused to create an object."""


class RuleLoadError(ValueError):
    """ModSecurity refused rule text; ``str(exc)`` is ModSecurity's own parser message."""


def _open() -> tuple[Any, Any]:
    try:
        lib = ffi.dlopen(LIBRARY_NAME)
    except OSError as exc:  # pragma: no cover - the library is a package dependency
        raise WafLibraryError(
            f"cannot load {LIBRARY_NAME} ({exc}); install it: apt-get install libmodsecurity3"
        ) from exc
    return lib, ffi.dlopen(None)


lib, libc = _open()
_LOAD_LOCK: Final = threading.Lock()


class LogSink:
    """The messages ModSecurity logged for one transaction, in order (raw text)."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: list[str] = []


@ffi.callback("void(void *, const void *)")  # type: ignore[untyped-decorator]
def _log_cb(data: Any, msg: Any) -> None:
    # Runs on the transaction's worker thread with the GIL. Never raise into C.
    try:
        if ffi.NULL in (data, msg):
            return
        sink = ffi.from_handle(data)
        sink.messages.append(ffi.string(ffi.cast("const char *", msg)).decode("utf-8", "replace"))
    except Exception:  # pragma: no cover - defensive: a C callback must not propagate
        return


def _take_error(err: Any) -> str:
    """The text of an ``error`` out-param, freed (ModSecurity ``strdup``-s it)."""
    if err[0] == ffi.NULL:
        return ""
    try:
        return bytes(ffi.string(err[0])).decode("utf-8", "replace").strip()
    finally:
        libc.free(ffi.cast("void *", err[0]))
        err[0] = ffi.NULL


class ModSecurity:
    """The library instance (``msc_init``): connector info and the log callback."""

    def __init__(self, connector: str = "ambient-mesh-waypoint") -> None:
        ptr = lib.msc_init()
        if ptr == ffi.NULL:
            raise WafLibraryError("msc_init failed")
        self._ptr: Any = ptr
        lib.msc_set_connector_info(ptr, connector.encode())
        lib.msc_set_log_cb(ptr, _log_cb)

    @property
    def ptr(self) -> Any:
        if self._ptr is None:
            raise ValueError("ModSecurity instance is closed")
        return self._ptr

    def who_am_i(self) -> str:
        return bytes(ffi.string(lib.msc_who_am_i(self.ptr))).decode()

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            lib.msc_cleanup(ptr)

    def __enter__(self) -> ModSecurity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RuleSet:
    """A compiled rule set (``RulesSet``). Loading raises ``RuleLoadError`` with ModSecurity's message."""

    def __init__(self) -> None:
        ptr = lib.msc_create_rules_set()
        if ptr == ffi.NULL:
            raise WafLibraryError("msc_create_rules_set failed")
        self._ptr: Any = ptr
        self.rule_count = 0

    @property
    def ptr(self) -> Any:
        if self._ptr is None:
            raise ValueError("rule set is closed")
        return self._ptr

    def add(self, text: str) -> int:
        """Parse and add SecLang ``text``; returns the number of rules added."""
        err = ffi.new("const char **")
        with _LOAD_LOCK:
            n = lib.msc_rules_add(self.ptr, text.encode(), err)
        message = _take_error(err)
        if n < 0:
            raise RuleLoadError(message or "ModSecurity rejected the rules (no message)")
        self.rule_count += n
        return int(n)

    def add_file(self, path: str) -> int:
        err = ffi.new("const char **")
        with _LOAD_LOCK:
            n = lib.msc_rules_add_file(self.ptr, path.encode(), err)
        message = _take_error(err)
        if n < 0:
            raise RuleLoadError(message or f"ModSecurity rejected {path} (no message)")
        self.rule_count += n
        return int(n)

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            lib.msc_rules_cleanup(ptr)

    def __enter__(self) -> RuleSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Intervention:
    """What ``msc_intervention`` reported: copied into Python, C strings already freed."""

    __slots__ = ("disruptive", "log", "status", "url")

    def __init__(self, status: int, url: str | None, log: str | None, disruptive: bool) -> None:
        self.status = status
        self.url = url
        self.log = log
        self.disruptive = disruptive


def _bytes(data: bytes | str) -> bytes:
    return data.encode("latin-1") if isinstance(data, str) else data


class Transaction:
    """One HTTP exchange evaluated against a ``RuleSet``; its log messages land in ``sink``.

    The ``ModSecurity`` and ``RuleSet`` must outlive the transaction (the caller keeps them).
    """

    def __init__(self, modsec: ModSecurity, rules: RuleSet, unique_id: str) -> None:
        self.sink = LogSink()
        self._handle: Any = ffi.new_handle(self.sink)  # kept alive as long as the C transaction
        self._id: Any = ffi.new("char[]", unique_id.encode())
        ptr = lib.msc_new_transaction_with_id(modsec.ptr, rules.ptr, self._id, self._handle)
        if ptr == ffi.NULL:
            raise WafLibraryError("msc_new_transaction failed")
        self._ptr: Any = ptr

    @property
    def ptr(self) -> Any:
        if self._ptr is None:
            raise ValueError("transaction is closed")
        return self._ptr

    def process_connection(self, client: str, client_port: int, server: str, server_port: int) -> None:
        lib.msc_process_connection(self.ptr, client.encode(), client_port, server.encode(), server_port)

    def process_uri(self, uri: str, method: str, http_version: str) -> None:
        lib.msc_process_uri(self.ptr, uri.encode("latin-1"), method.encode(), http_version.encode())

    def add_request_header(self, name: bytes | str, value: bytes | str) -> None:
        k, v = _bytes(name), _bytes(value)
        lib.msc_add_n_request_header(self.ptr, k, len(k), v, len(v))

    def process_request_headers(self) -> None:
        lib.msc_process_request_headers(self.ptr)

    def append_request_body(self, body: bytes) -> None:
        lib.msc_append_request_body(self.ptr, body, len(body))

    def process_request_body(self) -> None:
        lib.msc_process_request_body(self.ptr)

    def process_response_headers(self, status: int, protocol: str = "HTTP/1.1") -> None:
        lib.msc_process_response_headers(self.ptr, status, protocol.encode())

    def add_response_header(self, name: bytes | str, value: bytes | str) -> None:
        k, v = _bytes(name), _bytes(value)
        lib.msc_add_n_response_header(self.ptr, k, len(k), v, len(v))

    def append_response_body(self, body: bytes) -> None:
        lib.msc_append_response_body(self.ptr, body, len(body))

    def process_response_body(self) -> None:
        lib.msc_process_response_body(self.ptr)

    def intervention(self) -> Intervention | None:
        """The pending disruptive intervention, if any (clears it in the library)."""
        it = ffi.new("ModSecurityIntervention *")
        it.status = 200
        it.url = ffi.NULL
        it.log = ffi.NULL
        it.disruptive = 0
        try:
            disruptive = bool(lib.msc_intervention(self.ptr, it))
            url = None if it.url == ffi.NULL else bytes(ffi.string(it.url)).decode("utf-8", "replace")
            log = None if it.log == ffi.NULL else bytes(ffi.string(it.log)).decode("utf-8", "replace")
        finally:
            if it.url != ffi.NULL:
                libc.free(it.url)
                it.url = ffi.NULL
            if it.log != ffi.NULL:
                libc.free(it.log)
                it.log = ffi.NULL
        if not disruptive:
            return None
        return Intervention(int(it.status), url, log, True)

    def process_logging(self) -> None:
        lib.msc_process_logging(self.ptr)

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            lib.msc_transaction_cleanup(ptr)
            self._handle = None

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
