"""Watermarks: keys, the FedIPR bits under DP-SGD and SecAgg+, triggers, verification and its statistics."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_bert, write_job

from securefed.config import load_job
from securefed.errors import ConfigError, WatermarkError
from securefed.job import load_task
from securefed.models.saved import load_merged, merge_adapter
from securefed.runtime.local import execute, prepare, run
from securefed.watermark import attacks
from securefed.watermark.feature import base_carrier, matched_bits
from securefed.watermark.keys import WatermarkKey
from securefed.watermark.reference import Reference, read, scale_vector
from securefed.watermark.trigger import TriggerLoss, trigger_set
from securefed.watermark.verify import verify
from securefed.weighting import Weighting

BITS = 48  # 4 clients × 48 bits in the 256 scales of the tiny model's 4 normalization layers


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """64 wide: 256 normalization scales in its two blocks."""
    return tiny_bert(tmp_path_factory.mktemp("wide-bert"), 64)


def watermarked_job(folder, model, sample, secure: dict | None = None, **watermark):
    """SGD, as the private example trains; DP-SGD unless `secure` names another setting."""
    return write_job(folder, model, *sample, federation={
        "rounds": 6, "clients": 4, "local_steps": 3, "batch_size": 32, "optimizer": "sgd", "momentum": 0.0,
        "learning_rate": 0.3}, **(secure or {"privacy": {"epsilon": 8.0, "max_grad_norm": 1.0}}),
        watermark={"bits": BITS, "triggers": 8, **watermark})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wide_model, sst2_sample):
    """4 clients, each with its own key made into the run's keys/, under DP-SGD and SecAgg+ (the default). The
    trigger term runs with Opacus's hooks off: were they on, its backward would fail for want of recorded
    activations."""
    folder = tmp_path_factory.mktemp("watermarked")
    prepared = prepare(load_job(watermarked_job(folder, wide_model, sst2_sample)), out=folder / "run")
    # Fixed keys and DP secret, where the run would draw its own: the margin is then the same on every machine
    # (with fresh draws one owner in a few runs matched 44 of 48 bits, p = 1.5e-9, just short of "owned").
    for c in range(4):
        WatermarkKey(f"client {c} of tiny", bytes([c + 1]) * 32, bytes([c + 101]) * 32, BITS, prepared.task.carrier,
                     8, 4).save(prepared.run_dir.keys_dir / f"client-{c}.wmkey")
    (prepared.run_dir.path / "secrets").mkdir(mode=0o700)
    (prepared.run_dir.path / "secrets" / "dp").write_text("0123456789abcdef" * 4 + "\n", encoding="ascii")
    result = execute(prepared)
    keys = [WatermarkKey.load(folder / "run" / "keys" / f"client-{c}.wmkey") for c in range(4)]
    return result.run, keys


def check(model_dir, key):
    model, tokenizer = load_merged(model_dir)
    return verify(model, tokenizer, key, Reference.load(key))


def test_every_owner_verifies_after_private_secure_training(trained):
    run_dir, keys = trained
    assert len({k.seed for k in keys}) == 4 and len({k.public for k in keys}) == 4
    for key in keys:
        verdict = check(run_dir.model_dir, key)
        assert verdict.owned, verdict
        assert verdict.matched_bits >= BITS - 2 and verdict.bits_p <= 1e-11
    report = run_dir.report_file.read_text()
    assert report.count("| owned |") == 4


def test_under_ckks_every_owner_verifies_too(tmp_path, wide_model, sst2_sample):
    """The carrier's per-client mean travels through CKKS's count slot; no DP here."""
    job = watermarked_job(tmp_path, wide_model, sst2_sample, {"secagg": {"mode": "ckks"}}, triggers=0)
    result = run(load_job(job), out=tmp_path / "run")
    assert [v["verdict"] for v in result.watermarks] == ["owned"] * 4
    # CKKS sums approximately, with fresh encryption noise each run: a bit near the margin may flip
    assert min(v["matched_bits"] for v in result.watermarks) >= BITS - 4


def test_keys_stay_apart_from_the_model(trained):
    run_dir, _ = trained
    assert not [p for p in run_dir.model_dir.rglob("*") if p.suffix == ".wmkey"]
    for path in (run_dir.keys_dir).iterdir():
        assert path.stat().st_mode & 0o077 == 0  # readable by the owner only


def test_fresh_keys_and_the_base_model_do_not_verify(trained, wide_model):
    run_dir, keys = trained
    model, tokenizer = load_merged(run_dir.model_dir)
    carrier = keys[0].carrier
    reference = Reference.load(keys[0])
    for _ in range(20):
        fresh = WatermarkKey.generate("someone else", carrier, bits=BITS, triggers=8)
        assert not verify(model, tokenizer, fresh, reference).owned
    base, _ = load_merged(wide_model)
    scales_only = replace(carrier, weights=())
    attacks.reset(model, base, scales_only)
    for key in keys:  # the scales reset to the base's: their bits are gone, the adapter's remain
        verdict = verify(model, tokenizer, key, reference)
        assert verdict.matched_bits == 0 and verdict.adapter_p <= 1e-9 and verdict.owned
    attacks.reset(model, base, carrier)
    for key in keys:  # the adapter's change reset too: nothing to find (and the fine-tuning is gone)
        verdict = verify(model, tokenizer, key, reference)
        assert verdict.matched_bits == verdict.adapter_bits == 0 and not verdict.owned


def test_a_key_forged_after_seeing_the_model_fails(trained):
    """The thief picks, among many seeds, the projection that best fits the model; the bits still come from the
    hash of his seed, so the best fit is chance."""
    run_dir, keys = trained
    model, _ = load_merged(run_dir.model_dir)
    values = scale_vector(read(model, [n for n, _ in keys[0].carrier.parameters]), keys[0].carrier)
    base = Reference.load(keys[0]).scales
    best = max(matched_bits(WatermarkKey.generate("thief", keys[0].carrier, bits=BITS), values, base)
               for _ in range(300))
    # 300 tries reach about 33 of 48 by chance, and once 39 (about 1 run in 400); 43 would take about one run
    # in 500,000. Owners match 46 or more
    assert best <= BITS - 6


def test_an_altered_key_is_refused(trained, tmp_path):
    _, keys = trained
    path = tmp_path / "k.wmkey"
    keys[0].save(path)
    document = json.loads(path.read_text())
    for field, value in (("owner", "the thief"), ("seed", "00" * 32), ("bits", 16)):
        path.unlink()
        path.write_text(json.dumps({**document, field: value}))
        with pytest.raises(WatermarkError, match="altered"):
            WatermarkKey.load(path)
    path.write_text("{not json")
    with pytest.raises(WatermarkError, match="not a watermark key"):
        WatermarkKey.load(path)
    with pytest.raises(WatermarkError, match="never overwritten"):
        keys[0].save(path)


def test_merged_model_verifies_as_the_adapter_does(trained, tmp_path):
    run_dir, keys = trained
    merge_adapter(run_dir.model_dir, tmp_path / "merged")
    for key in keys:
        adapter, merged = check(run_dir.model_dir, key), check(tmp_path / "merged", key)
        assert (merged.matched_bits, merged.matched_triggers) == (adapter.matched_bits, adapter.matched_triggers)
        assert merged.owned == adapter.owned


def test_bits_come_from_the_seed_and_the_owner_identity(trained):
    _, keys = trained
    a = keys[0]
    other_owner = WatermarkKey(a.owner, keys[1].private, a.seed, a.bits, a.carrier, a.triggers, a.trigger_length)
    assert not np.array_equal(a.message(), other_owner.message())
    assert np.array_equal(a.projection(), other_owner.projection())
    assert np.abs(a.message()).tolist() == [1.0] * BITS


def test_trigger_sets_are_the_keys_own(trained, wide_model):
    _, keys = trained
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(wide_model)
    a, again, b = trigger_set(keys[0], tokenizer, 2), trigger_set(keys[0], tokenizer, 2), trigger_set(keys[1],
                                                                                                        tokenizer, 2)
    assert a.texts == again.texts and np.array_equal(a.labels, again.labels) and a.texts != b.texts
    data = a.encoded(tokenizer, 64)
    assert all(len(ids) == 4 + 2 for ids in data.input_ids)  # 4 whole words, each one token, and [CLS] [SEP]
    # chance: a model that predicts one class for everything matches about half of the random labels
    assert a.p_value(a.matched(np.zeros(8, dtype=np.int64))) > 0.01


def test_the_trigger_loss_teaches_the_keys_labels(tmp_path, wide_model, sst2_sample):
    """Trained on the trigger term alone, the model comes to give the key's labels, and verification counts them.
    The term weighs K·rate/(1 − rate) (a client's update reaches the average divided by K); it runs without
    dropout but hands the model back in training mode."""
    in_clear = {"secagg": {"mode": "none", "insecure": True}}
    task = load_task(load_job(watermarked_job(tmp_path, wide_model, sst2_sample, in_clear)))
    key = WatermarkKey("org", bytes([7]) * 32, bytes([9]) * 32, BITS, task.carrier, 8, 4)  # fixed: same every run
    triggers = trigger_set(key, task.bundle.tokenizer, 2)
    encoded = triggers.encoded(task.bundle.tokenizer, 32)
    batch = task.collator.batch(encoded, range(len(encoded)))
    term = TriggerLoss(task.bundle.model, batch, rate=0.2, clients=4)
    assert term.weight == pytest.approx(4 * 0.2 / 0.8)
    model = task.bundle.model
    model.train()
    assert term().item() == term().item()  # no dropout inside the term, though the model trains
    optimizer = torch.optim.Adam(task.bundle.view.parameters, lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        term().backward()
        optimizer.step()
        assert model.training
    verdict = verify(model, task.bundle.tokenizer, key, task.reference)
    assert verdict.matched_triggers == 8 and verdict.triggers_p == pytest.approx(2**-8)


def test_each_registered_term_writes_what_the_key_calls_for(tmp_path, wide_model, sst2_sample):
    from securefed.job import watermark_terms
    from securefed.watermark.terms import LOSS_TERMS

    in_clear = {"secagg": {"mode": "none", "insecure": True}}
    task = load_task(load_job(watermarked_job(tmp_path, wide_model, sst2_sample, in_clear, trigger_rate=0.2)))
    with_triggers = WatermarkKey("org", bytes([7]) * 32, bytes([9]) * 32, BITS, task.carrier, 8, 4)
    without = WatermarkKey("org", bytes([7]) * 32, bytes([9]) * 32, BITS, task.carrier, 0, 4)
    terms = watermark_terms(task, with_triggers)
    assert len(terms) == len(LOSS_TERMS)
    assert [t.name for t in terms] == ["feature watermark", "adapter watermark", "trigger set"]
    assert terms[2].weight == pytest.approx(4 * 0.2 / 0.8)  # the job's rate, over the cohort of 4
    assert [t.name for t in watermark_terms(task, without)] == ["feature watermark", "adapter watermark"]
    assert all(t().item() >= 0 for t in terms)


def test_capacity_and_key_settings_are_checked_before_anything_is_written(tmp_path, wide_model, sst2_sample):
    job = watermarked_job(tmp_path, wide_model, sst2_sample, bits=65)
    with pytest.raises(WatermarkError, match="need 260 bits in all, but the carrier holds 256 scales"):
        run(load_job(job), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    job = watermarked_job(tmp_path, wide_model, sst2_sample, keys=["a.wmkey"] * 4)
    with pytest.raises(ConfigError, match="watermark: bits is a property of the key files"):
        load_job(job)


def test_named_keys_must_fit_the_job(tmp_path, wide_model, tiny_model, sst2_sample):
    keys = []
    for c in range(4):
        key = WatermarkKey.generate(f"org {c}", base_carrier(str(wide_model), 2), bits=32)
        key.save(tmp_path / f"org-{c}.wmkey")
        keys.append(str(tmp_path / f"org-{c}.wmkey"))
    job = write_job(tmp_path, wide_model, *sst2_sample, federation={"clients": 4}, watermark={"keys": keys})
    assert len(load_task(load_job(job)).watermark_keys) == 4
    job = write_job(tmp_path, wide_model, *sst2_sample, federation={"clients": 3}, watermark={"keys": keys})
    with pytest.raises(ConfigError, match="4 key files for 3 clients"):
        load_job(job)
    other = write_job(tmp_path, tiny_model, *sst2_sample, federation={"clients": 4}, watermark={"keys": keys})
    with pytest.raises(WatermarkError, match="org-0.wmkey: the key was made for another base model"):
        load_task(load_job(other))
    # a key for an adapter on `query` alone, in a job whose LoRA adapts peft's default (query and value)
    adapter_key = WatermarkKey.generate("org q", base_carrier(str(wide_model), 2, ["query"]), bits=32)
    assert [name.split(".")[-2] for name, _, _ in adapter_key.carrier.weights] == ["query", "query"]
    adapter_key.save(tmp_path / "org-q.wmkey")
    job = write_job(tmp_path, wide_model, *sst2_sample, federation={"clients": 4},
                    watermark={"keys": [str(tmp_path / "org-q.wmkey"), *keys[1:]]})
    with pytest.raises(WatermarkError, match="org-q.wmkey: the key marks 2 adapted weights that differ from the 4"):
        load_task(load_job(job))


def test_only_the_hinge_moves_the_scales_under_dp(tmp_path, wide_model, sst2_sample):
    """The carrier's scales carry no example: the task's gradient does not reach them and DP-SGD neither clips nor
    noises them. Two clients with other data and the same key move them alike; a client without a key leaves
    them be. (When the task trained them too, a client holding 313 of 67,349 examples moved them, its DP noise
    included, as far as the largest client: they average per client.)"""
    from securefed.job import client_datasets, make_client

    prepared = prepare(load_job(watermarked_job(tmp_path, wide_model, sst2_sample)), out=tmp_path / "run")
    task, start = prepared.task, prepared.task.bundle.view.get()
    key = WatermarkKey("org", bytes([7]) * 32, bytes([9]) * 32, BITS, task.carrier, 0, 4)
    scales, datasets, moves = task.bundle.carrier_mask, client_datasets(task), []
    for cid, owner in ((0, key), (1, key), (2, None)):
        task.bundle.view.set(start)
        make_client(task, cid, datasets[cid], run=prepared.run_dir, key=owner)._train_locally(1)
        moves.append(task.bundle.view.get() - start)
    assert np.abs(moves[0][scales]).max() > 1e-3  # the hinge wrote the bits
    np.testing.assert_allclose(moves[0][scales], moves[1][scales], atol=1e-6)
    assert np.abs(moves[0][~scales] - moves[1][~scales]).max() > 1e-3  # the adapter learnt from each one's data
    assert not moves[2][scales].any()


def test_per_client_entries_average_over_clients():
    weighting = Weighting(np.array([False, True]))
    updates, sizes = [np.array([1.0, 1.0]), np.array([3.0, 5.0])], [1, 9]
    total = sum(weighting.contribution(u, n).astype(np.float64) for u, n in zip(updates, sizes))
    mean = weighting.mean(total[:-1], total[-1], len(sizes))
    assert mean.tolist() == pytest.approx([(1 * 1 + 9 * 3) / 10, (1 + 5) / 2])


def _scales(model, carrier):
    from securefed.watermark.feature import scale_parameters

    return scale_parameters(model, carrier)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`securefed ARGS` in this process (the installed entry point's code path), its exit code and output."""
    from securefed.cli import main

    monkeypatch.setattr("sys.argv", ["securefed", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_the_verify_command_gives_a_verdict_or_one_line_error(trained, wide_model, tiny_model, tmp_path, monkeypatch,
                                                              capsys):
    run_dir, _ = trained
    model = str(run_dir.model_dir)
    code, out, _ = cli(monkeypatch, capsys, "watermark", "verify", "--model", model, "--key",
                       str(run_dir.keys_dir / "client-3.wmkey"), "--json")
    verdict = json.loads(out)
    assert code == 0 and verdict["verdict"] == "owned" and verdict["p_value"] <= 1e-9
    code, out, _ = cli(monkeypatch, capsys, "watermark", "keygen", "--owner", "Org Z", "--out", str(tmp_path),
                       "--model", str(wide_model), "--bits", "48")
    assert code in (0, None) and (tmp_path / "org-z.wmkey").exists() and 'keys = ["' in out
    code, out, _ = cli(monkeypatch, capsys, "watermark", "verify", "--model", model, "--key",
                       str(tmp_path / "org-z.wmkey"))
    assert code == 1 and "verdict: not owned" in out
    code, _, err = cli(monkeypatch, capsys, "watermark", "keygen", "--owner", "Org Z", "--out", str(tmp_path),
                       "--model", str(tiny_model), "--bits", "48")
    assert code == 2 and "never overwritten" in err
    cli(monkeypatch, capsys, "watermark", "keygen", "--owner", "Org Y", "--out", str(tmp_path), "--model",
        str(tiny_model), "--bits", "48")
    code, out, err = cli(monkeypatch, capsys, "watermark", "verify", "--model", model, "--key",
                         str(tmp_path / "org-y.wmkey"))
    assert code == 2 and out == "" and err.count("\n") == 1 and "the key was made for another model" in err
    # a blank owner is refused before any model loads (this one does not exist)
    code, _, err = cli(monkeypatch, capsys, "watermark", "keygen", "--owner", " ", "--out", str(tmp_path),
                       "--model", str(tmp_path / "no-such-model"))
    assert code == 2 and "needs an owner name" in err
