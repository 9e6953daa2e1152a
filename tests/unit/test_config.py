from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_settings
from tests.conftest import REPO, small_params, write_params


def test_shipped_params_load():
    settings = load_settings(REPO / "params.yaml")
    assert settings.train.learners == ["lightgbm", "xgboost", "mlp"]
    assert settings.data_schema.target in settings.data_schema.columns


def _write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_bad_value_names_key_and_fix(tmp_path):
    params = small_params(**{"train.lightgbm.learning_rate": -1})
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, params))
    msg = str(err.value)
    assert "train.lightgbm.learning_rate" in msg
    assert "got -1" in msg and "change it" in msg


def test_unknown_and_missing_keys(tmp_path):
    params = small_params()
    params["train"]["learnig_rate"] = 0.1
    del params["promote"]["metric"]
    msg = str(pytest.raises(ConfigError, load_settings, _write(tmp_path, params)).value)
    assert "train.learnig_rate" in msg and "remove it or fix its spelling" in msg
    assert "promote.metric" in msg and "add this key" in msg


def test_unknown_learner_and_ensemble(tmp_path):
    params = small_params(**{"train.learners": ["lightgbm", "catboost"], "train.ensemble": "voting"})
    msg = str(pytest.raises(ConfigError, load_settings, _write(tmp_path, params)).value)
    assert "train.learners.1" in msg and "train.ensemble" in msg


def test_inverted_range(tmp_path):
    params = small_params()
    params["schema"]["numeric"]["age"] = {"min": 90, "max": 18}
    msg = str(pytest.raises(ConfigError, load_settings, _write(tmp_path, params)).value)
    assert "schema.numeric.age" in msg and "must not exceed" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)


@pytest.mark.parametrize("endpoint", ["file:///etc", "ftp://host/models", "localhost:3000", "http://", ""])
def test_deploy_endpoint_must_be_an_http_url(tmp_path, endpoint):
    with pytest.raises(ConfigError, match=r"deploy.endpoint.*(http\(s\) URL|names no host)"):
        load_settings(write_params(tmp_path, **{"deploy.endpoint": endpoint}))


def test_deploy_endpoint_accepts_http_and_https(tmp_path):
    for endpoint in ("http://127.0.0.1:3000", "https://models.example.com/"):
        assert load_settings(write_params(tmp_path, **{"deploy.endpoint": endpoint})).deploy.endpoint == endpoint


def test_a_request_the_limits_allow_fits_one_batch(tmp_path):
    """With batching, a request of more rows than max_batch_size is split into model calls and shed (503) once it
    waits past max_latency_ms: serve.max_rows must not exceed serve.max_batch_size."""
    params = small_params(**{"serve.max_rows": 1000, "serve.max_batch_size": 256})
    msg = str(pytest.raises(ConfigError, load_settings, _write(tmp_path, params)).value)
    assert "serve.max_rows (1000) is more than serve.max_batch_size (256)" in msg
    assert load_settings(_write(tmp_path, small_params(**{"serve.max_rows": 1000, "serve.batching": False})))


def test_a_params_file_that_still_drops_duplicates_loads_with_a_warning(tmp_path):
    params = small_params()
    params["prepare"]["drop_duplicate_rows"] = True
    with pytest.warns(FutureWarning, match=r"prepare\.drop_duplicate_rows is deprecated.*remove the key"):
        load_settings(_write(tmp_path, params))
