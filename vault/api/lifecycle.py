"""Opens the vault when its HSM allows, keeps gRPC health truthful, hands the vault to RPCs.

The server starts even when the token is unreachable: health says NOT_SERVING, every RPC
gets UNAVAILABLE with the reason (also while a token that was there goes missing), and a watcher retries in the background, so the service
comes up by itself when the token comes back. Once open, the watcher pings the token and
flips health between SERVING and NOT_SERVING. A rejected PIN is never retried on its own:
real HSMs lock a user out after a few wrong PINs. A :class:`~vault.domain.errors.Refused` opening
(wrong token, older copy of the directory) is final: ``on_refused`` is called so that the
server exits saying why, rather than waiting NOT_SERVING for something that will not change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

from vault import logs
from vault.domain.errors import HsmPinRejected, HsmUnavailable, Refused, Unavailable, VaultError
from vault.service import Vault

log = logs.get("vault.lifecycle")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A health service name of its own: NOT_SERVING while a collection failed its integrity
# checks at load (its RPCs answer DATA_LOSS; the others serve on).
INTEGRITY_SERVICE = "vault.v1.Integrity"


def integrity_status(vault: Vault | None) -> int:
    """SERVING when the vault is open and no collection of it is damaged."""
    return int(SERVING if vault is not None and not vault.damaged() else NOT_SERVING)


class VaultHolder:
    """The vault once it could be opened, and the reason while it cannot."""

    def __init__(self, opener: Callable[[], Vault], services: tuple[str, ...] = ("",),
                 interval: float = 1.0, on_refused: Callable[[], None] | None = None) -> None:
        self._opener = opener
        self._on_refused = on_refused
        self.refused: Refused | None = None
        self._services = services
        self._interval = interval
        self._health: health.HealthServicer | None = None
        self._vault: Vault | None = None
        self._error: VaultError | None = Unavailable("vault is starting")
        self._serving: bool | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, health_servicer: health.HealthServicer, services: tuple[str, ...]) -> None:
        """Report through this health servicer, for these service names."""
        self._health, self._services = health_servicer, services
        self._publish(self._serving is True)

    def __call__(self) -> Vault:
        """The open vault, or the error that explains why it cannot serve now.

        Fails closed: while the token is out, even requests that in-memory keys could
        answer (1:N) are refused, so pulling the token stops the vault.
        """
        vault, error = self._vault, self._error
        if vault is None or error is not None:
            raise error or Unavailable("vault is not open")
        return vault

    @property
    def vault(self) -> Vault | None:
        return self._vault

    def check(self) -> bool:
        """One round of the watcher: open or ping; returns whether the vault serves."""
        with self._lock:
            if self._vault is None:
                if isinstance(self._error, (HsmPinRejected, Refused)):
                    return False  # see module docstring: wait for an operator
                try:
                    self._vault = self._opener()
                except HsmUnavailable as exc:
                    return self._set(False, exc)
                except Refused as exc:  # one line says why and what to do; then exit
                    log.error("refusing to serve: " + exc.message, error_type=type(exc).__name__)
                    self.refused, self._error, self._serving = exc, exc, False
                    self._publish(False)
                    if self._on_refused is not None:
                        self._on_refused()
                    return False
                except VaultError as exc:
                    log.error("cannot open the vault: " + exc.message, error_type=type(exc).__name__)
                    return self._set(False, exc)
                return self._set(True, None)
            try:
                self._vault.hsm.ping()
            except HsmUnavailable as exc:
                return self._set(False, exc)
            return self._set(True, None)

    def _set(self, serving: bool, error: VaultError | None) -> bool:
        if serving != self._serving:
            if serving:
                log.info("serving: the HSM answers")
            else:
                log.warning("not serving: " + (error.message if error else "unknown"),
                            error_type=type(error).__name__)
        self._error = error
        self._serving = serving
        self._publish(serving)
        return serving

    def _publish(self, serving: bool) -> None:
        if self._health is not None:
            for name in self._services:
                self._health.set(name, SERVING if serving else NOT_SERVING)
            self._health.set(INTEGRITY_SERVICE, integrity_status(self._vault))

    def start(self) -> None:
        """Check once now, then keep checking in the background."""
        self.check()
        self._thread = threading.Thread(target=self._run, name="vault-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one failure
                log.error("watcher error", error_type=type(exc).__name__)

    def close(self) -> None:
        """Stop watching and close the vault."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._vault is not None:
                self._vault.close()
                self._vault = None
