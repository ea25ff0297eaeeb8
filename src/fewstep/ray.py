"""The service as a Ray Serve application, deployed the Ray way:

    serve run fewstep.ray:app model=Lykon/dreamshaper-7 replicas=2 queue_size=8
    serve run deploy/serve-config.yaml        # import_path: fewstep.ray:app, args: {...}

`app(args)` takes the options of `fewstep serve` by the keys of its config file (`model`,
`lora: {name: ref}`, `queue_size`, `api_key`, ...; FEWSTEP_* variables of the node fill the
rest, as for `fewstep serve`) plus `replicas` (N or "MIN:MAX"), `gpus_per_replica` and
`cpus_per_replica`. The HTTP address is the Serve config's `http_options` (any address but
loopback needs `api_key`, or FEWSTEP_API_KEY). See `fewstep.server.deployments` for what the
deployments do, and `deploy/` for examples."""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest

# Not options of an application: the HTTP entry is the Serve config's, and it runs on Ray.
_NOT_ARGS = ("host", "port", "ray", "ray_address", "config")


def settings_from_args(args: dict[str, Any] | None):
    """`RayServeSettings` from a Serve config's `args` (or `serve run` key=value pairs, which
    arrive as text), errors naming the key."""
    from .config import load
    from .server.ray_cli import RayServeSettings

    args = {str(k).replace("-", "_"): v for k, v in (args or {}).items()}
    for key in args:
        if key not in RayServeSettings.model_fields or key in _NOT_ARGS:
            raise InvalidRequest(f"fewstep.ray:app: unknown option {key!r} (the HTTP address "
                                 "is the Serve config's http_options)", field=key)
    return load(RayServeSettings, args, flag_names={key: key for key in args})


def app(args: dict[str, Any] | None = None):
    """The Serve application builder (`import_path: fewstep.ray:app`)."""
    import ray

    from .server.catalog import Catalog
    from .server.deployments import build_app
    from .server.ray_cli import make_spec

    settings = settings_from_args(args)
    Catalog.from_settings(settings)  # names checked here; the proxies' address by the ingress
    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0.0)
    else:
        try:
            import torch

            gpus = float(torch.cuda.device_count())
        except ImportError:
            gpus = 0.0
    return build_app(make_spec(settings, gpus))
