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


def test_a_password_in_params_is_refused_with_the_fix_and_never_echoed(tmp_path, monkeypatch):
    """Hardening II, item 6: a SQL password in params.yaml was copied into dvc.lock and every bento's params."""
    sql = {"kind": "sql", "sql": {"url": "postgresql://app:hunter2@db:5432/loans", "table": "loans"}}
    params = small_params()
    params["source"].update(sql)
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, params))
    assert "source.sql.url" in str(err.value) and "$AMAAS_SOURCE_URL" in str(err.value)
    assert "hunter2" not in str(err.value)
    for key in ("url", "redis_url"):
        url = "postgresql://a:hunter2@db/x" if key == "url" else "redis://:hunter2@cache:6379/0"
        with pytest.raises(ConfigError) as err:
            load_settings(write_params(tmp_path, **{f"state.{key}": url}))
        assert f"state.{key}" in str(err.value) and "hunter2" not in str(err.value)
    # the environment is where passwords go: it is read at use, never written anywhere
    monkeypatch.setenv("AMAAS_STATE_URL", "postgresql://a:hunter2@db/x")
    assert load_settings(write_params(tmp_path)).state.resolved().url == "postgresql://a:hunter2@db/x"


@pytest.mark.parametrize(("key", "value"), [("serve.workers", 10_000), ("train.lightgbm.n_estimators", 10**12),
                                            ("source.simulator.rows_per_batch", 10**15), ("evaluate.threshold", 5),
                                            ("evaluate.threshold", -1), ("evaluate.threshold", float("nan")),
                                            ("promote.approval_timeout_min", 0), ("promote.approval_timeout_min", -1),
                                            ("promote.approval_timeout_min", 43_201)])
def test_numeric_settings_have_bounds_that_name_the_key(tmp_path, key, value):
    """Hardening II, item 8: absurd sizes loaded, and a NaN threshold failed only after training."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(write_params(tmp_path, **{key: value}))


def test_an_error_of_a_whole_section_names_its_keys_without_dumping_it(tmp_path):
    """Hardening II, item 8: a whole-file check printed all of params.yaml (3 kB) after the useful line."""
    params = small_params()
    params["prepare"]["split"] = "time"
    params["schema"]["time_column"] = None
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, params))
    assert "prepare.split: time needs schema.time_column" in str(err.value) and len(str(err.value)) < 600


def test_the_approval_timeout_takes_fractions_of_a_minute(tmp_path):
    """Half a minute is thirty seconds (Airflow's timedelta(minutes=...) takes it as it is)."""
    settings = load_settings(write_params(tmp_path, **{"promote.approval_timeout_min": 0.5}))
    assert settings.promote.approval_timeout_min == 0.5
