"""Ray Serve configuration without starting Ray: `fewstep.ray:app` builds the application from
`fewstep serve` options (per-replica limits from the queue size, resources, autoscaling), bad
options are refused naming them, the shipped Serve config and KubeRay manifest are valid and
build, `fewstep serve --ray` refuses user errors in one line before Ray starts, and the ingress
refuses to serve beyond loopback without an API key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fewstep.errors import InvalidRequest
from fewstep.ray import app, settings_from_args

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _deployments(application):
    ingress = application._bound_deployment
    engines = ingress.init_args[0]._bound_deployment
    return ingress, engines


def test_builder_sets_limits_resources_and_autoscaling(tmp_path):
    lora = tmp_path / "style.safetensors"
    application = app({"model": "some/model", "replicas": "2:5", "queue_size": "6",
                       "gpus_per_replica": "0.5", "cpus_per_replica": 2,
                       "lora": {"style": str(lora)}, "grace": 12})
    ingress, engines = _deployments(application)
    assert ingress.name == "Ingress" and ingress.num_replicas == 1
    assert engines.name == "EngineReplica"
    assert engines.max_ongoing_requests == 7  # one running and the queue size waiting
    assert engines.ray_actor_options["num_gpus"] == 0.5
    assert engines.ray_actor_options["num_cpus"] == 2
    autoscaling = engines._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 5)
    assert engines._deployment_config.graceful_shutdown_timeout_s >= 12
    spec = engines.init_args[0]
    assert spec.settings.lora == {"style": str(lora)} and spec.queue_size == 6
    assert spec.settings.api_key is None  # the replicas never see HTTP
    fixed = _deployments(app({"replicas": 3}))[1]
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None


@pytest.mark.parametrize("args, field", [
    ({"replicas": "0"}, "replicas"),
    ({"replicas": "3:2"}, "replicas"),
    ({"replicas": "many"}, "replicas"),
    ({"gpus_per_replica": "-1"}, "gpus_per_replica"),
    ({"cpus_per_replica": "lots"}, "cpus_per_replica"),
    ({"queue_size": "0"}, "queue_size"),
    ({"queue_size": "ten"}, "queue_size"),
    ({"host": "0.0.0.0"}, "host"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"lora": {"../x": "/tmp/x.safetensors"}}, "lora"),
])
def test_builder_refuses_bad_options_naming_them(args, field):
    with pytest.raises(InvalidRequest) as info:
        app(args)
    assert info.value.field == field, info.value.message


def test_replicas_on_gpus_take_the_gpu_ray_gives_them():
    from fewstep.server.ray_cli import make_spec

    assert make_spec(settings_from_args({}), cluster_gpus=4).gpus_per_replica == 1
    assert make_spec(settings_from_args({"device": "cpu"}), cluster_gpus=4).gpus_per_replica == 0
    assert make_spec(settings_from_args({}), cluster_gpus=0).gpus_per_replica == 0
    with pytest.raises(InvalidRequest) as info:
        make_spec(settings_from_args({"device": "cuda:1"}), cluster_gpus=4)
    assert info.value.field == "device"


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEWSTEP_API_KEY", "from-env")
    assert settings_from_args({}).api_key == "from-env"
    assert settings_from_args({"api_key": "given"}).api_key == "given"
    ingress = _deployments(app({}))[0]
    assert ingress.init_args[1].settings.api_key == "from-env"  # the entry checks it


@pytest.mark.parametrize("path", ["serve-config.yaml", "rayservice.yaml"])
def test_shipped_configs_are_valid_and_build(path):
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((DEPLOY / path).read_text())
    if document.get("kind") == "RayService":
        assert document["apiVersion"] == "ray.io/v1"
        document = yaml.safe_load(document["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(document)
    (application,) = config.applications
    assert application.import_path == "fewstep.ray:app"
    assert config.http_options.host == "0.0.0.0"  # needs the API key: the ingress checks it
    ingress, engines = _deployments(app(application.args))
    assert engines.ray_actor_options["num_gpus"] == 1


@pytest.mark.parametrize("flags, field", [
    (["--replicas", "0"], "replicas"),
    (["--host", "0.0.0.0"], "api_key"),
    (["--gpus-per-replica", "-2"], "gpus_per_replica"),
    (["--queue-size", "0"], "queue_size"),
])
def test_serve_ray_refuses_user_errors_before_starting_ray(flags, field):
    done = subprocess.run([sys.executable, "-m", "fewstep.server", "--ray", *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"({field})" in lines[0], done.stderr


def test_ingress_refuses_a_public_proxy_without_an_api_key(monkeypatch):
    import ray.serve.context

    from fewstep.server import deployments as ray_server

    class Client:
        def __init__(self, host):
            self.host = host

        def get_serve_details(self):
            return {"http_options": {"host": self.host, "port": 8000}}

    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda: Client("0.0.0.0"))
    with pytest.raises(InvalidRequest) as info:
        ray_server._check_proxy_bind(None)
    assert info.value.field == "api_key"
    ray_server._check_proxy_bind("a-key")
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda: Client("127.0.0.1"))
    ray_server._check_proxy_bind(None)
