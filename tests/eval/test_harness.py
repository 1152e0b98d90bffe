"""`globe eval --tasks` through lm-evaluation-harness on a tiny local multiple-choice task (no network): the
harness's accuracy equals the argmax of our own choice log-likelihoods (with its stderr), a patched model scores
like its dense equivalent, git stays silent, and a task that needs a hub download is refused before any network
access. Skipped when lm-eval (the `eval` extra) is not installed."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket

import pytest
import torch

pytest.importorskip("lm_eval")

import globe.cli.main as cli  # noqa: E402
from globe.errors import ConfigError  # noqa: E402
from globe.eval.harness import hub_download, metric_lines, prepare_tasks, run_tasks  # noqa: E402
from globe.runtime import apply_globe  # noqa: E402
from tests.helpers.fits import char_tokenizer, exact_result  # noqa: E402

DOCS = [{"question": "the cat sat on the", "choices": [" mat", " dog", " sky"], "answer": 0},
        {"question": "a quick brown", "choices": [" fox", " zzz"], "answer": 0},
        {"question": "over the lazy", "choices": [" cat", " dog"], "answer": 1},
        {"question": "one two", "choices": [" three", " q"], "answer": 0}]


def write_task(task_dir, name: str = "tiny_mc"):
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (task_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {task_dir / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return task_dir


@torch.no_grad()
def own_accuracy(model, tokenizer) -> float:
    hits = 0
    for doc in DOCS:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tokenizer(doc["question"] + choice, add_special_tokens=False)["input_ids"][len(context):]
            ids = torch.tensor([context + cont])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            scores.append(float(logp[len(context) - 1:].gather(1, torch.tensor(cont)[:, None]).sum()))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return hits / len(DOCS)


def test_harness_accuracy_matches_our_loglikelihoods_and_patched_equals_dense(tiny_model, tmp_path, monkeypatch,
                                                                             capfd):
    from huggingface_hub import constants
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(char_tokenizer(tmp_path / "tok"))
    model = tiny_model("qwen2_moe")
    tasks = write_task(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)                                   # not a git repository: lm-eval asks git anyway
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_before = constants.HF_HUB_OFFLINE
    report = run_tasks(model, tokenizer, ["tiny_mc"], task_dir=tasks)
    assert "not a git repository" not in capfd.readouterr().err
    assert constants.HF_HUB_OFFLINE == offline_before and "HF_HUB_OFFLINE" not in os.environ   # restored
    acc = report["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(own_accuracy(model, tokenizer))
    n = len(DOCS)                                                 # closed-form stderr of a mean of 0/1 hits
    assert report["results"]["tiny_mc"]["acc_stderr,none"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert report["n_samples"]["tiny_mc"]["effective"] == len(DOCS)
    patched = apply_globe(copy.deepcopy(model), exact_result(model), mode="dense")
    assert run_tasks(patched, tokenizer, ["tiny_mc"], task_dir=tasks)["results"]["tiny_mc"]["acc,none"] == acc


def test_cli_eval_tasks_on_a_patched_checkpoint(tmp_path, tiny_checkpoint, capsys):
    import globe
    from tests.helpers.fits import quick_fit
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    globe.save(quick_fit(tiny_checkpoint("qwen2_moe")), tmp_path / "art")
    tasks = write_task(tmp_path / "tasks")
    args = ["eval", str(model_dir), "--globe", str(tmp_path / "art"), "--tasks", "tiny_mc", "--task-dir", str(tasks)]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = report["results"]["tiny_mc"]
    assert 0 <= metrics["acc,none"] <= 1 and report["model"]["artifact"] and metrics["acc_stderr,none"] >= 0
    assert cli.main(args) == 0                                    # the table shows acc ± stderr
    assert f"acc {metrics['acc,none']:.4f} ± {metrics['acc_stderr,none']:.4f}" in capsys.readouterr().out
    assert cli.main(["eval", str(model_dir), "--tasks", "nope", "--task-dir", str(tasks)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err


def test_metric_lines_pair_each_metric_with_its_stderr():
    assert metric_lines({"alias": "t", "acc,none": 0.75, "acc_stderr,none": 0.25, "f1,none": 0.5}) == \
        ["acc 0.7500 ± 0.2500", "f1 0.5000"]


def _empty_caches(monkeypatch, tmp_path):
    from datasets import config as ds_config
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_hub_download_tells_local_from_remote_data(tmp_path, monkeypatch):
    _empty_caches(monkeypatch, tmp_path)
    local = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "t.jsonl")}}}
    assert hub_download(local) is None and hub_download({"dataset_path": str(tmp_path)}) is None
    remote = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": ["hf://datasets/o/n/t.jsonl"]}}}
    assert hub_download(remote) == "hf://datasets/o/n/t.jsonl"
    assert hub_download({"dataset_path": "Rowan/hellaswag"}) == "Rowan/hellaswag"
    (tmp_path / "hub" / "datasets--Rowan--hellaswag").mkdir(parents=True)      # downloaded before: offline is fine
    assert hub_download({"dataset_path": "Rowan/hellaswag"}) is None


def _forbid_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network attempt: {args[:2]}")
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_a_group_with_a_hub_task_is_refused_before_lm_eval_runs(tmp_path, monkeypatch):
    _forbid_network(monkeypatch)
    _empty_caches(monkeypatch, tmp_path)
    tasks = write_task(tmp_path / "tasks")
    (tasks / "hub_mc.yaml").write_text((tasks / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: hub_mc")
                                       .replace("dataset_path: json", "dataset_path: nobody/hub_mc"))
    (tasks / "both.yaml").write_text("group: both\ntask:\n  - tiny_mc\n  - hub_mc\n")
    assert "tiny_mc" in prepare_tasks(["tiny_mc"], tasks).all_tasks
    with pytest.raises(ConfigError, match=r"'hub_mc' \(in 'both'\) needs a dataset download \(nobody/hub_mc\)"):
        prepare_tasks(["tiny_mc", "both"], tasks)


def test_cli_builtin_hub_task_is_a_clear_error_without_network(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    model = tiny_checkpoint("qwen2_moe")
    _forbid_network(monkeypatch)
    _empty_caches(monkeypatch, tmp_path)
    assert cli.main(["eval", str(model), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'hellaswag' needs a dataset download (Rowan/hellaswag)" in err
    assert "--task-dir" in err and "dataset_path: json" in err
