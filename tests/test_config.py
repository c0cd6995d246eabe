import json
from pathlib import Path

import pytest

from securefed.config import JobConfig, LoraConfig, load_job
from securefed.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

VALID = """
name = "t"
[data]
train = "data/train.csv"
dev = "data/dev.csv"
[federation]
rounds = 2
clients = 3
local_steps = 4
learning_rate = 0.001
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(write(tmp_path, text))
    return str(info.value)


def test_defaults_are_filled_and_paths_resolve_against_the_toml_folder(tmp_path):
    job = load_job(write(tmp_path, VALID))
    assert job.data.train == (tmp_path / "data" / "train.csv").resolve()
    assert job.model.name == "minilm"
    assert isinstance(job.peft, LoraConfig) and job.peft.r == 8
    assert job.partition.method == "iid"
    assert job.federation.batch_size == 32 and job.federation.cohort_size == 3


def test_model_paths_resolve_but_registered_names_stay(tmp_path):
    job = load_job(write(tmp_path, VALID + '[model]\nname = "./my-model"\n'))
    assert job.model.name == str((tmp_path / "my-model").resolve())


def test_every_shipped_example_is_valid():
    examples = sorted(EXAMPLES.glob("*.toml"))
    assert examples, "no examples found"
    for path in examples:
        assert isinstance(load_job(path), JobConfig)


@pytest.mark.parametrize("extra", ["[partition]\nmethod = \"dirichlet\"\nalpha = 0.3\n", "[watermark]\n",
                                   "[watermark]\nkeys = [\"k/a.wmkey\", \"k/b.wmkey\", \"k/c.wmkey\"]\n"])
def test_resolved_toml_reads_back_to_the_same_job(tmp_path, extra):
    job = load_job(write(tmp_path, VALID + extra))
    again = tmp_path / "sub"
    again.mkdir()
    (again / "job.toml").write_text(job.to_toml(), encoding="utf-8")
    assert load_job(again / "job.toml").fingerprint() == job.fingerprint()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[zo]\nseeds = 4096\n", "zo: unknown setting"),
        ("[watermark]\nbit = 64\n", "watermark.bit: unknown setting"),
        ("[watermark]\nkeys = [\"a.wmkey\"]\nbits = 64\n", "watermark: bits is a property of the key files"),
        ("[watermark]\nbits = 8\n", "watermark.bits: Input should be greater than or equal to 16"),
        ("[privacy]\nepsilon = 8\nnoise = 1.0\n", "privacy.noise: unknown setting"),
        ("[peft]\nmethod = \"lora\"\nrank = 4\n", "peft.rank: unknown setting"),
        ("[peft]\nmethod = \"adalora\"\n", "peft"),
        ("[partition]\nmethod = \"dirichlet\"\nalpha = -1\n", "partition.alpha: Input should be greater than 0"),
        ("[partition]\nmethod = \"dirichlet\"\n", "partition.alpha: required setting is missing"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, extra, expected):
    message = error_of(tmp_path, VALID + extra)
    assert message.startswith(str(tmp_path / "job.toml"))
    assert expected in message
    assert "\n" not in message


def test_out_of_range_values_are_refused(tmp_path):
    assert "federation.rounds" in error_of(tmp_path, VALID.replace("rounds = 2", "rounds = 0"))
    assert "clients_per_round (5) exceeds clients (3)" in error_of(
        tmp_path, VALID.replace("clients = 3", "clients = 3\nclients_per_round = 5"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("rounds = 2", 'rounds = "2"'), "federation.rounds: Input should be a valid integer"),
        (("rounds = 2", "rounds = 2.0"), "federation.rounds: Input should be a valid integer"),
        (("learning_rate = 0.001", "learning_rate = nan"), "federation.learning_rate: Input should be a finite"),
        (('train = "data/train.csv"', 'train = "data/tr\\u0000ain.csv"'), "data.train: not a usable path"),
    ],
)
def test_values_must_have_their_type(tmp_path, change, expected):
    assert expected in error_of(tmp_path, VALID.replace(*change))


def test_any_text_survives_the_resolved_toml(tmp_path):
    odd = "tëxt 🙂 \\u007f\\t\\\"q\\\""
    job = load_job(write(tmp_path, VALID.replace('[data]', f'[data]\ntext_field = "{odd}"')))
    (tmp_path / "again.toml").write_text(job.to_toml(), encoding="utf-8")
    assert load_job(tmp_path / "again.toml").data.text_field == job.data.text_field == "tëxt 🙂 \x7f\t\"q\""


def test_missing_sections_and_conflicting_data_sources(tmp_path):
    assert "federation: required setting is missing" in error_of(tmp_path, 'name = "t"\n[data]\ndataset = "sst2"\n')
    both = VALID.replace('[data]\n', '[data]\ndataset = "sst2"\n')
    assert "either dataset or train/dev files" in error_of(tmp_path, both)


def test_unreadable_files_are_config_errors(tmp_path):
    assert "invalid TOML" in error_of(tmp_path, "name = \n")
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "absent.toml")


def test_secure_aggregation_is_on_by_default_with_a_complete_graph_for_small_jobs(tmp_path):
    job = load_job(write(tmp_path, VALID))
    assert job.secagg.mode == "secaggplus"
    assert (job.secagg_degree, job.secagg_threshold) == (2, 2)
    big = load_job(write(tmp_path, VALID.replace("clients = 3", "clients = 1000")))
    assert (big.secagg_degree, big.secagg_threshold) == (60, 31)


@pytest.mark.parametrize(("section", "message"), [
    ('[secagg]\nmode = "none"\n', 'secagg: mode = "none" shows every client\'s update to the server: set insecure'),
    ('[secagg]\nmode = "paillier"\n', "secagg: Input tag 'paillier' found using 'mode' does not match"),
    ('[secagg]\nmode = "ckks"\nscale = 40\n', "secagg.scale: unknown setting"),
    ('[secagg]\nmode = "secaggplus"\nhardened = true\n', "hardened mode needs identities"),
    ('[secagg]\nmode = "secaggplus"\nhardened = false\npublic_keys = ["' + "ab" * 32 + '"]\n',
     "identities sign hardened SecAgg+ only"),
    ('[secagg]\nmode = "secaggplus"\npublic_keys = ["' + "ab" * 32 + '"]\n',
     "secagg.public_keys: 1 keys for 3 clients"),
    ('[secagg]\nmode = "ckks"\npublic_keys = ["xyz"]\n', "secagg.public_keys.0: String should match pattern"),
    ('[secagg]\nmode = "ckks"\npublic_keys = ["' + "ab" * 32 + '", "' + "cd" * 32 + '", "' + "ab" * 32 + '"]\n',
     "a key is listed for two clients"),
    ('[secagg]\nmode = "secaggplus"\nneighbours = 3\n', "exceeds the other clients"),
    ('[secagg]\nmode = "secaggplus"\nthreshold = 4\n',
     "secagg.threshold: 4 must be a majority of the k+1 share holders and at most k+1 (k = 2): between 2 and 3"),
    ('[secagg]\nmode = "secaggplus"\nthreshold = 1\n', "secagg.threshold: Input should be greater than or equal to 2"),
    ('[secagg]\nmode = "secaggplus"\nclip = -1.0\n', "secagg.clip: Input should be greater than 0"),
    ('[secagg]\nmode = "secaggplus"\nshares = 2\n', "secagg.shares: unknown setting"),
])
def test_secure_aggregation_settings_are_checked(tmp_path, section, message):
    assert message in error_of(tmp_path, VALID + section)


def test_identities_make_secaggplus_hardened_and_travel_as_public_keys(tmp_path):
    from securefed.secagg.identity import generate

    publics = [key.hex() for key in generate(tmp_path / "ids", 3)]
    job = load_job(write(tmp_path, VALID + '[secagg]\nmode = "secaggplus"\nidentities = "ids"\n'))
    assert job.secagg.hardened and job.secagg.public_keys == publics
    inline = load_job(write(tmp_path, VALID + '[secagg]\nmode = "secaggplus"\npublic_keys = ' + json.dumps(publics)))
    assert inline.secagg.hardened and inline.fingerprint() == job.fingerprint()  # the folder is only where they lie
    other = list(reversed(publics))
    assert "not the public keys in" in error_of(tmp_path, VALID + '[secagg]\nmode = "secaggplus"\nidentities = "ids"\n'
                                                f"public_keys = {json.dumps(other)}\n")
    (tmp_path / "ids" / "client-2.pub").write_text(publics[0] + "\n")  # one party, two client ids
    assert "a key is listed for two clients (read from" in error_of(
        tmp_path, VALID + '[secagg]\nmode = "secaggplus"\nidentities = "ids"\n')


def test_secaggplus_refuses_sampled_cohorts_and_odd_ring_degrees(tmp_path):
    many = VALID.replace("clients = 3", "clients = 20")
    assert "needs every client in every round" in error_of(tmp_path, many + "clients_per_round = 5\n")
    assert "must be even" in error_of(tmp_path, many + '[secagg]\nmode = "secaggplus"\nneighbours = 7\n')


def test_plaintext_sum_needs_an_explicit_insecure_flag(tmp_path):
    job = load_job(write(tmp_path, VALID + '[secagg]\nmode = "none"\ninsecure = true\n'))
    assert job.secagg.mode == "none"


def test_settings_added_later_leave_older_jobs_fingerprints_alone():
    """A private run's ledgers are chained from the fingerprint: a new setting at its default must not change it.
    The values are those of securefed before [task] and the generation settings existed."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    assert load_job(examples / "quickstart.toml").fingerprint() == \
        "9d822b4907f8d132da14effe7dd3bd52aac32cd0ae0d35d5c347841a33c68bf4"
    assert load_job(examples / "sst2-lora-private.toml").fingerprint() == \
        "eaa905a2cc1e05d0b90a42eca8ecfbb1a08e0d39797db387a4d4665750e44613"
    generation = load_job(examples / "dolly-smollm2.toml")
    assert generation.fingerprint() != generation.model_copy(
        update={"task": generation.task.model_copy(update={"max_new_tokens": 65})}).fingerprint()


def test_every_secagg_mode_has_one_secure_sum():
    from typing import get_args

    from securefed.config import SecAggConfig
    from securefed.sums import SECURE_SUMS

    union = get_args(SecAggConfig)[0]
    modes = {get_args(section.model_fields["mode"].annotation)[0] for section in get_args(union)}
    assert modes == set(SECURE_SUMS)


def test_every_privacy_mechanism_has_one_training_wrapper_and_naming_the_default_changes_nothing(tmp_path):
    from typing import get_args

    from securefed.config import PrivacyConfig
    from securefed.interfaces import TrainingWrapper
    from securefed.privacy.mechanisms import MECHANISMS, mechanism

    assert set(get_args(PrivacyConfig.model_fields["mechanism"].annotation)) == set(MECHANISMS)
    assert all(issubclass(kind, TrainingWrapper) for kind in MECHANISMS.values())
    private = load_job(write(tmp_path, VALID + "[privacy]\nepsilon = 8.0\n"))
    named = load_job(write(tmp_path, VALID + '[privacy]\nmechanism = "dp-sgd"\nepsilon = 8.0\n'))
    assert named.fingerprint() == private.fingerprint() and mechanism(private) is MECHANISMS["dp-sgd"]
    assert mechanism(load_job(write(tmp_path, VALID))) is None
    with pytest.raises(ConfigError, match="mechanism"):
        load_job(write(tmp_path, VALID + '[privacy]\nmechanism = "dp-zo"\nepsilon = 8.0\n'))
