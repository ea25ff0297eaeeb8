"""The service as a Ray Serve application, deployed the Ray way:

    serve run fewstep.ray:app model=Lykon/dreamshaper-7 replicas=2 queue_size=8
    serve run deploy/serve-config.yaml        # import_path: fewstep.ray:app, args: {...}

`app(args)` takes the options of `fewstep serve` by the keys of its config file (`model`,
`lora: {name: ref}`, `queue_size`, `api_key`, ...) plus `replicas` (N or "MIN:MAX"),
`gpus_per_replica` and `cpus_per_replica`. The HTTP address is the Serve config's
`http_options` (any address but loopback needs `api_key`, or FEWSTEP_API_KEY). See
`fewstep.server.ray` for what the deployments do, and `deploy/` for examples."""

from __future__ import annotations

import os
from typing import Any

from .errors import InvalidRequest

# Set by `serve run` / Serve config files: the HTTP entry is theirs, not an option here.
_HTTP_KEYS = ("host", "port")


def options_from_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """`fewstep serve` option values from a Serve config's `args` (or `serve run` key=value
    pairs, which arrive as text)."""
    from .server.cli import DEFAULTS, LISTS

    args = {str(k).replace("-", "_"): v for k, v in (args or {}).items()}
    unknown = sorted(k for k in args if k not in DEFAULTS or k in _HTTP_KEYS or k == "ray")
    if unknown:
        raise InvalidRequest(f"fewstep.ray:app: unknown option {unknown[0]!r} (the HTTP "
                             "address is the Serve config's http_options)", field=unknown[0])
    values = dict(DEFAULTS)
    if os.environ.get("FEWSTEP_API_KEY"):
        values["api_key"] = os.environ["FEWSTEP_API_KEY"]
    for key, value in args.items():
        default = DEFAULTS[key]
        if key in LISTS:
            if isinstance(value, dict):
                value = [f"{name}={ref}" for name, ref in value.items()]
            elif isinstance(value, str):
                value = [part for part in value.split(",") if part]
            elif not isinstance(value, list):
                raise InvalidRequest(f"{key} must be a table or a list", field=key)
        elif isinstance(value, str) and isinstance(default, (int, float)) \
                and not isinstance(default, bool):
            try:
                value = type(default)(value)
            except ValueError:
                raise InvalidRequest(f"{key} must be a number, got {value!r}",
                                     field=key) from None
        values[key] = value
    values["ray"] = True
    return values


def app(args: dict[str, Any] | None = None):
    """The Serve application builder (`import_path: fewstep.ray:app`)."""
    import ray

    from .server.ray import build_app
    from .server.ray_cli import check_values, make_spec

    values = options_from_args(args)
    values["host"] = "127.0.0.1"  # the proxies' address is checked by the ingress instead
    check_values(values)
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else None
    if gpus is None:
        try:
            import torch

            gpus = float(torch.cuda.device_count())
        except ImportError:
            gpus = 0.0
    return build_app(make_spec(values, gpus))
