"""`globe eval --tasks` through lm-evaluation-harness on a tiny local multiple-choice task (no network): the
harness's accuracy equals the argmax of our own choice log-likelihoods, and a patched model scores like its
dense equivalent. Skipped when lm-eval (the `eval` extra) is not installed."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

pytest.importorskip("lm_eval")

import globe.cli.main as cli  # noqa: E402
from globe.eval.harness import run_tasks  # noqa: E402
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


def test_harness_accuracy_matches_our_loglikelihoods_and_patched_equals_dense(tiny_model, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(char_tokenizer(tmp_path / "tok"))
    model = tiny_model("qwen2_moe")
    tasks = write_task(tmp_path / "tasks")
    report = run_tasks(model, tokenizer, ["tiny_mc"], task_dir=tasks)
    acc = report["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(own_accuracy(model, tokenizer))
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
    assert 0 <= report["results"]["tiny_mc"]["acc,none"] <= 1 and report["model"]["artifact"]
    assert cli.main(["eval", str(model_dir), "--tasks", "nope", "--task-dir", str(tasks)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
