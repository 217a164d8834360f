"""Who may call the scoring API: the bearer keys of a ServeConfig, read where the ingress runs.

Two rights. The API key (api_key_file, else the variable api_key_env, default OPSFT_API_KEY)
scores and reads: /v1/score, /v1/models, /docs. The admin key (admin_key_file, else admin_key_env,
default OPSFT_ADMIN_KEY) reloads (POST /v1/models/reload) and may do everything the API key may.

Fails closed: no API key and no `allow_open` is an error at start that names where the key was
looked for; no admin key means every reload is refused (403) unless `allow_open`; an admin key
equal to the API key is an error (it would let every scoring client reload).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from opsft.config import ServeConfig


class AuthConfigError(ValueError):
    """The service's keys are missing or unusable: it must not start."""


@dataclass(frozen=True)
class Keys:
    api_key: str | None
    admin_key: str | None
    allow_open: bool


def read_key(env: str | None, file: str | None, what: str) -> str | None:
    """A token from `file` (wins) or the environment variable `env`; None when neither holds one."""
    if file:
        try:
            key = Path(file).read_text().strip()
        except OSError as exc:
            raise AuthConfigError(f"cannot read the {what} file {file}: {exc.strerror or exc}") from None
        if not key:
            raise AuthConfigError(f"the {what} file {file} is empty")
        return key
    if not env:
        return None
    return (os.environ.get(env) or "").strip() or None


def read_keys(cfg: ServeConfig) -> Keys:
    """The service's keys; raises AuthConfigError where it must not start."""
    api = read_key(cfg.api_key_env, cfg.api_key_file, "API key")
    admin = read_key(cfg.admin_key_env, cfg.admin_key_file, "admin key")
    if api is None and not cfg.allow_open:
        where = f"the file {cfg.api_key_file}" if cfg.api_key_file else f"the environment variable {cfg.api_key_env}"
        raise AuthConfigError(f"no API key: the service refuses to start without one. Put the key in {where} "
                              "(or name a file with api_key_file / opsft serve --api-key-file), or set allow_open: "
                              "true (opsft serve --allow-open) to serve without auth")
    if api is not None and admin is not None and hmac.compare_digest(api.encode(), admin.encode()):
        raise AuthConfigError("the admin key equals the API key: every scoring client could reload models; give "
                              f"the admin key ({cfg.admin_key_file or cfg.admin_key_env}) its own value")
    return Keys(api, admin, cfg.allow_open)
