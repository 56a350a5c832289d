"""The build config: typed, validated, and round-tripped through the artifact manifest."""

import pytest
import yaml

from atlas.models.config import ConcertoConfig
from atlas.train.config import ConfigError, build_config_from_dict, load_build_config

MINIMAL = {"store": "stores/pbmc", "output": "artifacts/pbmc", "model": {"model": "concerto"}}


def test_defaults_and_model_modalities_flow_into_the_data_section():
    build = build_config_from_dict({**MINIMAL, "model": {"model": "concerto", "modalities": ["RNA", "protein"]}})
    assert isinstance(build.model, ConcertoConfig)
    assert build.data.modalities == ("RNA", "protein")
    assert build.scaling.num_workers == 1 and build.train.epochs == 3


def test_yaml_scalars_are_read_as_the_types_they_name():
    # YAML 1.1 reads 1e-3 (no dot) as a string; the validator turns it into the float it names.
    build = build_config_from_dict({**MINIMAL, "train": yaml.safe_load("lr: 1e-3\nepochs: 2")})
    assert build.train.lr == 0.001 and build.train.epochs == 2


def test_round_trip_through_a_plain_dict():
    build = build_config_from_dict({**MINIMAL, "index": {"levels": ["cell_type_l1", "cell_type_l2"]},
                                    "data": {"batch_size": 32, "single_domain": True}})
    again = build_config_from_dict(build.to_dict())
    assert again == build


@pytest.mark.parametrize("modalities, balance, expected", [
    (["RNA"], None, 0.5), (["protein"], None, 0.0), (["RNA", "protein"], None, 0.5), (["protein"], 1.0, 1.0),
])
def test_vote_balance_default_follows_the_modalities_and_is_stored_resolved(modalities, balance, expected):
    index = {"levels": ["a"]} if balance is None else {"levels": ["a"], "vote_balance": balance}
    build = build_config_from_dict({**MINIMAL, "model": {"model": "concerto", "modalities": modalities},
                                    "index": index})
    assert build.index.vote_balance == expected
    assert build.to_dict()["index"]["vote_balance"] == expected


@pytest.mark.parametrize("bad, message", [
    ({**MINIMAL, "trian": {}}, "unknown top-level key"),
    ({**MINIMAL, "train": {"epoch": 3}}, "unknown key.*'train'"),
    ({"store": "s", "model": {"model": "concerto"}}, "needs 'output'"),
    ({**MINIMAL, "model": {"model": "scvi"}}, "unknown model"),
    ({**MINIMAL, "data": {"modalities": ["protein"]}}, "streams only"),
    ({**MINIMAL, "data": {"batch_size": 0}}, "positive"),
    ({**MINIMAL, "train": {"epochs": "three"}}, "'train.epochs': Input should be a valid integer"),
    ({**MINIMAL, "model": {"model": "concerto", "embeddim": 64}}, "unknown key 'embeddim' in section 'model'"),
    ({**MINIMAL, "model": {"embed_dim": 64}}, "needs a 'model' key"),
    ({**MINIMAL, "scaling": 2}, "'scaling': Input should be a dictionary"),
])
def test_bad_configs_name_the_key_at_fault(bad, message):
    with pytest.raises(ConfigError, match=message):
        build_config_from_dict(bad)


def test_yaml_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "build.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    build = load_build_config(path)
    assert build.store == str((tmp_path / "conf" / "stores" / "pbmc").resolve())
    with pytest.raises(ConfigError, match="not valid YAML"):
        path.write_text("store: [unclosed")
        load_build_config(path)


def test_cli_build_with_a_bad_config_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "trian": {}}))
    for target in (path, tmp_path / "missing.yaml"):
        done = subprocess.run([sys.executable, "-m", "atlas.cli", "build", str(target)], capture_output=True, text=True)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr


def test_model_dependent_defaults_are_resolved_and_kept_when_given():
    from atlas.train.config import DEFAULT_EPOCHS

    cvq = build_config_from_dict({**MINIMAL, "model": {"model": "cvqvae", "modalities": ["RNA", "ATAC"]}})
    assert cvq.train.epochs == DEFAULT_EPOCHS["cvqvae"]
    assert cvq.data.single_domain is (cvq.model.domain_norm != "none")
    concerto = build_config_from_dict(MINIMAL)
    assert concerto.train.epochs == DEFAULT_EPOCHS["concerto"] and concerto.data.single_domain is False
    # What a config says wins, and the resolved values round-trip (the manifest stores them).
    given = build_config_from_dict({**MINIMAL, "model": {"model": "cvqvae", "modalities": ["RNA", "ATAC"],
                                                         "domain_norm": "encoders"},
                                    "train": {"epochs": 7}, "data": {"single_domain": False}})
    assert given.train.epochs == 7 and given.data.single_domain is False
    assert build_config_from_dict(given.to_dict()) == given
    shared = build_config_from_dict({**MINIMAL, "model": {"model": "cvqvae", "modalities": ["RNA", "ATAC"],
                                                          "domain_norm": "none"}})
    assert shared.data.single_domain is False


@pytest.mark.parametrize("given, use_gpu, uri, expected", [
    (None, True, "/data/store/versions/v000003", True),     # GPUs and a local store: the snapshot
    (None, False, "/data/store/versions/v000003", False),   # CPU training: the model is the bound
    (None, True, "s3://bucket/store/versions/v000003", False),  # no default place for it
    (None, True, "/data/some_experiment", False),           # not an atlas store's version
    (True, False, "/data/store/versions/v000003", True),    # given: kept
    (False, True, "/data/store/versions/v000003", False),
])
def test_the_training_snapshot_is_on_by_default_only_for_gpu_builds_of_local_stores(given, use_gpu, uri, expected):
    from atlas.build import resolve_snapshot

    assert resolve_snapshot(given, use_gpu=use_gpu, uri=uri) is expected
