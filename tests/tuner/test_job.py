"""The Job's steps (download, train, push) as the operator's containers run them, paths from env."""

import json

import pytest
from fixtures_data import training_configmap, tuning_workspace

from kaito_tuning.cli import main
from kaito_tuning.errors import EXIT_USER_ERROR
from kaito_tuning.spec.rules import load_workspace


@pytest.fixture
def job_env(monkeypatch, tmp_path, tiny_phi3):
    """The Job's mounts as directories under tmp_path; returns a function that sets the workspace."""
    dirs = {name: tmp_path / name for name in ("data", "config", "results")}
    for d in dirs.values():
        d.mkdir()
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KAITO_DATA_DIR", str(dirs["data"]))
    monkeypatch.setenv("KAITO_CONFIG_DIR", str(dirs["config"]))
    monkeypatch.setenv("KAITO_OUTPUT_DIR", str(dirs["results"]))
    monkeypatch.setenv("KAITO_TERMINATION_LOG", str(log))
    monkeypatch.setenv("KAITO_MODEL_DIR", str(tiny_phi3))
    monkeypatch.setenv("KAITO_PROGRESS_PORT", "-1")  # any free port
    monkeypatch.setenv("KAITO_ALLOW_PRIVATE_URLS", "1")  # the test servers are on loopback

    def set_workspace(ws: dict, configmap: dict | None = None):
        monkeypatch.setenv("KAITO_WORKSPACE", json.dumps(load_workspace(ws).to_dict()))
        if configmap:
            (dirs["config"] / "training_config.yaml").write_text(configmap["data"]["training_config.yaml"])

    dirs["log"] = log
    dirs["set"] = set_workspace
    return dirs


def test_download_train_push_and_retry_without_retraining(job_env, data_server, registry, registry_auth_file,
                                                          monkeypatch):
    base, _ = data_server
    signed = "?sv=2030&sig=PLANTEDTOKEN%3D"  # a SAS-style signed URL: the token must end up nowhere
    ws = tuning_workspace([f"{base}/alpaca.parquet{signed}", f"{base}/sharegpt.parquet{signed}"], config="c")
    ws["tuning"]["output"] = {"image": f"{registry.host}/adapters/job:1", "imagePushSecret": "push"}
    job_env["set"](ws, training_configmap(training={"max_steps": 2}))

    assert main(["job", "download"]) == 0
    assert sorted(p.name for p in job_env["data"].iterdir()) == [".kaito-inputs.json", "alpaca.parquet",
                                                                 "sharegpt.parquet"]
    assert main(["job", "train"]) == 0
    result = json.loads(job_env["log"].read_text())
    assert result["outputDir"] == str(job_env["results"]) and result["steps"] == 2
    assert (job_env["results"] / "adapter_model.safetensors").is_file()
    assert json.loads((job_env["results"] / "progress.json").read_text())["phase"] == "succeeded"

    # the push fails (no credentials): a user error, the adapter stays
    monkeypatch.setenv("KAITO_PUSH_AUTH_FILE", str(job_env["results"] / "no-such-file"))
    monkeypatch.setenv("KAITO_PLAIN_HTTP", "1")
    rc = main(["job", "push"])
    assert rc == EXIT_USER_ERROR
    assert job_env["log"].read_text().startswith("RegistryAuthFailed: ")
    assert (job_env["results"] / "adapter_config.json").is_file()

    # the retried pod: the signed URLs have expired by now; download and train find the finished adapter
    # and do neither again; push succeeds
    from kaito_tuning.tuner import pipeline
    from kaito_tuning.tuner.inputs import DownloadRefused

    def expired(*a, **kw):
        raise DownloadRefused("answered HTTP 403: the signature has expired", field="tuning.input.urls[0]")
    monkeypatch.setattr(pipeline, "download_urls", expired)
    stamp = (job_env["results"] / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["job", "download"]) == 0
    for f in job_env["data"].iterdir():
        f.unlink()  # a new pod: its data volume is empty
    assert main(["job", "train"]) == 0
    assert (job_env["results"] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setenv("KAITO_PUSH_AUTH_FILE", registry_auth_file)
    assert main(["job", "push"]) == 0
    pushed = json.loads(job_env["log"].read_text())
    assert pushed["image"] == f"{registry.host}/adapters/job:1" and pushed["digest"].startswith("sha256:")

    # nothing written, recorded or pushed carries the signed URL's token
    from kaito_tuning.artifacts import pull_adapter
    pulled = pull_adapter(pushed["image"], job_env["log"].parent / "pulled", auth_file=registry_auth_file,
                          plain_http=True)
    assert pulled.digest == pushed["digest"]
    for root in (job_env["data"], job_env["results"], job_env["log"].parent / "pulled"):
        for f in root.rglob("*"):
            if f.is_file():
                assert b"PLANTEDTOKEN" not in f.read_bytes(), f
    meta = json.loads((job_env["results"] / "training_metadata.json").read_text())
    assert {d["url"] for d in meta["datasets"]} == {f"{base}/alpaca.parquet", f"{base}/sharegpt.parquet"}


def test_download_failure_goes_to_the_termination_log(job_env, bad_server, monkeypatch):
    job_env["set"](tuning_workspace([f"{bad_server.url}/404"]))
    assert main(["job", "download"]) == EXIT_USER_ERROR
    line = job_env["log"].read_text()
    assert line.startswith("DownloadFailed: tuning.input.urls[0]: ") and "HTTP 404" in line
    assert line.count("\n") == 1


def test_train_with_bad_data_is_a_user_error(job_env, datasets_dir):
    (job_env["data"] / "robot.parquet").write_bytes(datasets_dir["robot"].read_bytes())
    job_env["set"](tuning_workspace(volume={"persistentVolumeClaim": {"claimName": "data"}}))
    assert main(["job", "train"]) == EXIT_USER_ERROR
    assert job_env["log"].read_text().startswith("DatasetInvalid: robot.parquet: row 0: messages[1].role is 'robot'")
    assert not (job_env["results"] / "adapter_config.json").exists()


def test_push_without_an_adapter(job_env):
    ws = tuning_workspace(["http://127.0.0.1:9/a.parquet"])
    ws["tuning"]["output"] = {"image": "127.0.0.1:9/x:1", "imagePushSecret": "push"}
    job_env["set"](ws)
    assert main(["job", "push"]) == EXIT_USER_ERROR
    assert job_env["log"].read_text().startswith("NoAdapter: output: ")


def test_the_job_refuses_private_urls_unless_allowed(job_env, data_server, monkeypatch):
    base, _ = data_server
    monkeypatch.delenv("KAITO_ALLOW_PRIVATE_URLS")
    job_env["set"](tuning_workspace([f"{base}/chat.parquet?sig=PLANTEDTOKEN"]))
    assert main(["job", "download"]) == EXIT_USER_ERROR
    line = job_env["log"].read_text()
    assert line.startswith("URLNotAllowed: tuning.input.urls[0]: ") and "loopback" in line
    assert "PLANTEDTOKEN" not in line and not list(job_env["data"].iterdir())


def test_missing_workspace_env(job_env, monkeypatch):
    monkeypatch.delenv("KAITO_WORKSPACE", raising=False)
    assert main(["job", "train"]) == EXIT_USER_ERROR
    assert "KAITO_WORKSPACE: is not set" in job_env["log"].read_text()


def test_push_on_other_nodes_than_node_0_does_nothing(job_env):
    ws = tuning_workspace(["http://127.0.0.1:9/a.parquet"])
    ws["tuning"]["output"] = {"image": "127.0.0.1:9/x:1", "imagePushSecret": "push"}
    job_env["set"](ws)
    assert main(["job", "push", "--nnodes", "2", "--node-rank", "1"]) == 0  # no adapter here: node 0 has it
    assert main(["job", "push", "--nnodes", "2", "--node-rank", "0"]) == EXIT_USER_ERROR
