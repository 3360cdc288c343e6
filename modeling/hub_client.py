"""How mla-zoo talks to the Hugging Face Hub: every request with a time limit, a bounded number of
attempts, and errors that say what was being done.

Every Hub call of mla-zoo (publish, list, info, pull, a Hub id as SOURCE, a recipe's Hub source)
runs inside `hub_call(action, browse=...)`:

* Each request gets a timeout: `HF_HUB_ETAG_TIMEOUT` seconds when browsing (list, info: metadata
  only), `HF_HUB_DOWNLOAD_TIMEOUT` otherwise (both huggingface_hub's own settings, default 10 s),
  for connecting and for every read and write (a shorter one the request has already stays).
  huggingface_hub >= 2 sends no timeout at all, so a server that accepts connections and never
  answers would hang a command forever.
* A request that gets no answer (refused, unreachable, timed out) is tried at most `BROWSE_ATTEMPTS`
  (1) times when browsing, `TRANSFER_ATTEMPTS` (3) otherwise: huggingface_hub's own retry loop (5
  retries with back-off) stops there, and so does every later request of the same call.
* Errors become a `HubError` that names the action, the endpoint and the cause.

Both limits are set through huggingface_hub's public `set_client_factory` on the library's own
client (its headers, offline mode and redirects kept), with httpx event hooks: a request hook
sets the request's timeouts and refuses an attempt past the limit, a response hook counts answers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from .common import HubError

BROWSE_ATTEMPTS = 1
TRANSFER_ATTEMPTS = 3


class HubUnreachable(HubError):
    """The Hub did not answer within the attempts allowed."""


class _Limits:
    """The request and response hooks of one `hub_call`: timeouts, and attempts of a request (its method
    and URL: huggingface_hub retries the same URL) that got no answer. Once a request has used up its
    attempts, the Hub counts as unreachable, and every further request of the call fails at once."""

    def __init__(self, timeout: float, attempts: int, browse: bool):
        self.timeout, self.attempts, self.browse = float(timeout), attempts, browse
        self.tries: dict[tuple[str, str], tuple[int, float]] = {}  # unanswered attempts, start of the last one
        self.unreachable: str | None = None
        self.lock = threading.Lock()

    def on_request(self, request) -> None:
        key = (request.method, str(request.url))
        with self.lock:
            if self.unreachable is None and self.tries.get(key, (0, 0.0))[0] >= self.attempts:
                elapsed = time.monotonic() - self.tries[key][1]
                why = (f"no answer within {self.timeout:g} s" if elapsed >= 0.9 * self.timeout
                       else "the connection failed")
                self.unreachable = (f"cannot reach the Hub at {request.url.scheme}://{request.url.netloc.decode()}: "
                                    f"{why} ({self.attempts} attempt{'s' if self.attempts > 1 else ''})")
            if self.unreachable is not None:
                raise HubUnreachable(self.unreachable)
            self.tries[key] = (self.tries.get(key, (0, 0.0))[0] + 1, time.monotonic())
        asked = request.extensions.get("timeout") or {}  # a shorter limit of the caller's own stays
        request.extensions["timeout"] = {k: min(self.timeout, asked.get(k) or self.timeout)
                                         for k in ("connect", "read", "write", "pool")}

    def on_response(self, response) -> None:
        with self.lock:
            self.tries.pop((response.request.method, str(response.request.url)), None)

    def client(self):
        """huggingface_hub's default client with these hooks added."""
        from huggingface_hub.utils import _http

        client = _http.default_client_factory()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks.get("request", []), self.on_request],
                              "response": [*hooks.get("response", []), self.on_response]}
        return client


_active: list[_Limits] = []  # nested hub_calls share the outermost one's limits (the command decides)


def _install(limits: _Limits | None) -> None:
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    set_client_factory(limits.client if limits is not None else _http.default_client_factory)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def hub_call(action: str, *, browse: bool = False) -> Iterator[None]:
    """Hub requests inside have a time limit and a bounded number of attempts; their errors become a
    HubError that says `action` ("listing the models of mla-zoo") failed, and why. Inside another
    hub_call, the outer one's limits apply (`browse` is then ignored)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    outer = _active[-1] if _active else None
    if outer is None:
        timeout = constants.HF_HUB_ETAG_TIMEOUT if browse else constants.HF_HUB_DOWNLOAD_TIMEOUT
        limits = _Limits(timeout, BROWSE_ATTEMPTS if browse else TRANSFER_ATTEMPTS, browse)
        _install(limits)
    else:
        limits = outer
    _active.append(limits)
    try:
        yield
    except HubUnreachable as e:
        raise HubError(f"{action} failed: {e}; check the network (and HF_ENDPOINT), or raise "
                       f"{'HF_HUB_ETAG_TIMEOUT' if limits.browse else 'HF_HUB_DOWNLOAD_TIMEOUT'}") from None
    except HubError:
        raise
    except OfflineModeIsEnabled as e:
        raise HubError(f"{action} needs the Hub, but HF_HUB_OFFLINE is set") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{action} failed: repository not found (or not visible with your credentials)") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{action} failed: revision not found") from e
    except LocalEntryNotFoundError as e:  # the Hub did not answer, and the local cache has no copy
        cause = e.__cause__ or e.__context__
        why = _cause(cause) if cause is not None else "no answer"
        raise HubError(f"{action} failed: cannot reach the Hub at {endpoint()} ({why}), and the Hugging Face "
                       "cache holds no copy; check the network (and HF_ENDPOINT)") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ""
        if status in (401, 403):
            hint = " (not logged in, or no write access: set HF_TOKEN or run `hf auth login`)"
        raise HubError(f"{action} failed{hint}: {str(e).splitlines()[0]}") from e
    except (ConnectionError, TimeoutError) as e:
        raise HubError(f"{action} failed: cannot reach the Hub at {endpoint()} ({_cause(e)})") from e
    except Exception as e:  # httpx's transport errors are not OSErrors
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"):
            raise HubError(f"{action} failed: cannot reach the Hub at {endpoint()} ({_cause(e)})") from e
        raise
    finally:
        _active.pop()
        if outer is None:
            _install(None)
