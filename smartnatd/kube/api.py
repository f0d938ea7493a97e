"""The API client (kubeconfig or in-cluster) and the one way requests are made: raw JSON in and out.

Every request goes through `call()`: `_preload_content=False` keeps bodies as the camelCase
dicts the API server sent (no model classes, parsed once in objects.py), and every failure,
HTTP or transport, comes back as a KubeApiError carrying the status code (0: no answer), so
callers classify errors in one way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

from smartnatd.errors import KubeApiError, SettingsError

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# A request other than a watch that takes longer than this is treated as failed (status 0).
REQUEST_TIMEOUT = 30.0
# Where etc/kubeconfig-from-serviceaccount.sh writes by default; the unit also sets KUBECONFIG.
APPLIANCE_KUBECONFIG = Path("/etc/smartnat/kubeconfig")


async def load_configuration(*, environ: Mapping[str, str] = os.environ) -> tuple[Configuration, str]:
    """$KUBECONFIG, else ~/.kube/config, else /etc/smartnat/kubeconfig, else in-cluster config.

    Returns the configuration and a description of where it came from (for the start-up log;
    never the contents). Raises SettingsError when none is usable: restarting cannot fix that.
    """
    config = Configuration()
    candidates: list[str] = []
    if environ.get("KUBECONFIG"):
        candidates.append(environ["KUBECONFIG"])
    else:
        home = Path(environ.get("HOME") or "~").expanduser() / ".kube" / "config"
        candidates += [str(p) for p in (home, APPLIANCE_KUBECONFIG) if p.is_file()]
    for path in candidates[:1]:
        try:
            await load_kube_config(config_file=path, client_configuration=config, persist_config=False)
        except (ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise SettingsError([f"kubeconfig {path}: {err}; fix the file or KUBECONFIG"]) from err
        _warn_about_kubeconfig(path, config)
        return config, f"kubeconfig {path}"
    if environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            load_incluster_config(client_configuration=config)
        except ConfigException as err:
            raise SettingsError([f"in-cluster configuration: {err}"]) from err
        return config, "in-cluster service account"
    raise SettingsError([
        "no Kubernetes configuration: set KUBECONFIG to a kubeconfig file "
        f"(etc/kubeconfig-from-serviceaccount.sh writes {APPLIANCE_KUBECONFIG}), "
        "or run smartnatd run --source DIR without a cluster"
    ])


def _warn_about_kubeconfig(path: str, config: Configuration) -> None:
    """Said once, at start: a kubeconfig that turns TLS verification off, or that others can
    read (it holds the service account's token)."""
    if not config.verify_ssl:
        logger.warning(
            "TLS verification of the API server is off (insecure-skip-tls-verify in KUBECONFIG) kubeconfig=%s", path
        )
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # it was just read; gone meanwhile is not this check's to report
    if mode & 0o077:
        logger.warning(
            "kubeconfig is readable by group or others and holds a token; chmod 600 it kubeconfig=%s mode=%04o",
            path, mode & 0o7777,
        )


def api_error(err: ApiException) -> KubeApiError:
    body: Any = err.body
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    message = str(err.reason or "")
    if isinstance(body, str):
        try:
            message = json.loads(body).get("message") or message
        except (ValueError, AttributeError):
            message = body[:200] or message
    return KubeApiError(f"{err.status}: {message}", status=int(err.status or 0))


async def call(
    method: Callable[..., Awaitable[Any]],
    *args: Any,
    timeout: float | aiohttp.ClientTimeout = REQUEST_TIMEOUT,
    **kwargs: Any,
) -> Any:
    """Call a generated API method; return the response body as JSON (None if empty).

    Raises KubeApiError: the HTTP status, or 0 when no answer came (refused, reset, timeout).
    """
    try:
        response = await method(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
    except ApiException as err:
        raise api_error(err) from err
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
        raise KubeApiError(f"no answer from the API server: {err!r}") from err
    try:
        data = await response.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
        raise KubeApiError(f"the API server's answer broke off: {err!r}") from err
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        raise api_error(_FailedResponse(response.status, response.reason, data))
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError as err:
        raise KubeApiError(f"the API server's answer is not JSON: {data[:100]!r}", status=response.status) from err


class _FailedResponse(ApiException):
    def __init__(self, status: int, reason: str | None, data: bytes) -> None:
        super().__init__(status=status, reason=reason)
        self.body = data


def new_api_client(config: Configuration) -> ApiClient:
    return ApiClient(configuration=config)


async def open_stream(
    method: Callable[..., Awaitable[Any]], *args: Any, timeout: aiohttp.ClientTimeout, **kwargs: Any
) -> aiohttp.ClientResponse:
    """Start a watch request and return the streaming response; errors as call() raises them."""
    try:
        response = await method(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
    except ApiException as err:
        raise api_error(err) from err
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
        raise KubeApiError(f"no answer from the API server: {err!r}") from err
    if not 200 <= response.status <= 299:
        try:
            data = await response.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            data = b""
        finally:
            response.release()
        raise api_error(_FailedResponse(response.status, response.reason, data))
    return response
