"""Sentence vectors: the SimCSE objective (its loss, its negatives gathered across processes with gradients, a
run through the CLI that learns), `ptm embed`, and headline retrieval on real BBC News text."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptmcli.architectures import BertArch
from ptmcli.models.bert import build_encoder
from ptmcli.models.heads import SentenceEncoder
from ptmcli.objectives.contrastive import Contrastive
from ptmcli.retrieval import rank_metrics
from tests.conftest import TINY, comparable, fails_with, read_metrics, rewound, run_ptm

ARCH = BertArch(
    family="bert", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=16, dropout=0.0,
    attention_dropout=0.0,
)  # fmt: skip


def sentence_model(seed: int = 0) -> SentenceEncoder:
    torch.manual_seed(seed)
    encoder = build_encoder(ARCH, 50, with_pooler=False)
    return SentenceEncoder(encoder, "cls", projection=True)


def sentence_batch(rows: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (rows, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1::3, 7:] = 0  # some padding
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


def test_contrastive_loss_is_in_batch_cross_entropy_of_two_views():
    model, batch = sentence_model(), sentence_batch(6)
    torch.manual_seed(3)
    sums, stats = Contrastive(0.05)(model, batch)
    torch.manual_seed(3)  # the same dropout draws (none here: both views are equal, so each finds itself)
    z = F.normalize(model(*(torch.cat([batch[k]] * 2) for k in batch)), dim=-1)
    a, b = z.chunk(2)
    expected = F.cross_entropy(a @ b.t() / 0.05, torch.arange(6), reduction="sum")
    assert torch.allclose(sums["contrastive"], expected, atol=1e-5)
    assert int(stats["contrastive_correct"]) == 6
    sums["contrastive"].backward()
    assert model.encoder.embeddings.word.weight.grad.abs().sum() > 0
    model.eval()  # validation: one view, nothing gathered
    sums, _ = Contrastive(0.05)(model, batch)
    assert torch.isfinite(sums["contrastive"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_gradients(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, batch = sentence_model(), sentence_batch(8)
    rows = slice(rank * 4, rank * 4 + 4)
    sums, _ = Contrastive(0.1)(model, {k: v[rows] for k, v in batch.items()})
    # as the loop does it: the global mean times the world size, and DDP's average of the gradients
    (sums["contrastive"] / 8 * world).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    dist.barrier()  # neither process tears gloo down while the other still uses it
    dist.destroy_process_group()


def test_negatives_are_gathered_across_processes_with_their_gradients(tmp_path):
    """Two processes with 4 texts each give the gradients of one process with all 8: every text is contrasted
    with the other process's texts too, and the gradient reaches them through the gather."""
    out = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(_rank_gradients, args=(2, _free_port(), out), nprocs=2)
    model, batch = sentence_model(), sentence_batch(8)
    sums, _ = Contrastive(0.1)(model, batch)
    (sums["contrastive"] / 8).backward()
    two = torch.load(out, weights_only=True)
    for name, p in model.named_parameters():
        assert torch.allclose(two[name], p.grad, atol=1e-5), name


def test_rank_metrics_count_ties_against_the_query():
    eye = np.eye(4, dtype=np.float32)
    assert rank_metrics(eye, eye) == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0, "median_rank": 1.0}
    swapped = eye[[1, 0, 2, 3]] + 0.1 * eye  # queries 0 and 1 find each other's documents first, then their own
    metrics = rank_metrics(swapped, eye)
    assert metrics["recall@1"] == 0.5 and metrics["mrr"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    same = np.ones((4, 2), dtype=np.float32) / np.sqrt(2)  # one vector for everything: nothing is found
    assert rank_metrics(same, same)["recall@1"] == 0.0


SIMCSE = [
    "pretrain",
    *TINY,
    "objective=simcse",
    "data.max_seq_len=32",
    "trainer.batch_size=16",
    "trainer.max_steps=16",
    "trainer.log_every=4",
    "trainer.eval_every=16",
    "trainer.save_every=8",
    "trainer.keep_last=0",
    "model.dropout=0.1",  # SimCSE's two views differ only by dropout
    "objective.pooling=mean",  # a random tiny encoder's first-token states barely differ between texts
]


@pytest.fixture(scope="module")
def simcse_run(cache_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("simcse") / "run"
    run_ptm([*SIMCSE, f"hydra.run.dir={run}"], cache_env)
    return run


def test_simcse_learns_and_its_vectors_are_embedded_retrieved_and_exported(simcse_run, cache_env, tmp_path):
    rows = [r for r in read_metrics(simcse_run) if r["split"] == "train"]
    # chance is ln(16) = 2.77 (16 texts a batch): it learns to find each text's other view
    assert rows[-1]["contrastive_loss"] < min(0.5, rows[0]["contrastive_loss"] / 2), rows
    texts = tmp_path / "texts.txt"
    texts.write_text('Oil prices rise as supply falls\n\n{"text": "The team won the cup final"}\nShares fell\n')
    run_ptm(["embed", f"run={simcse_run}", f"input={texts}", f"output={tmp_path / 'v.npy'}"], cache_env)
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (3, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    jsonl = tmp_path / "v.jsonl"
    run_ptm(["embed", f"run={simcse_run}", f"input={texts}", f"output={jsonl}", "batch_size=2"], cache_env)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    texts_read = ["Oil prices rise as supply falls", "The team won the cup final", "Shares fell"]
    assert [r["text"] for r in lines] == texts_read
    assert np.allclose(np.array([r["vector"] for r in lines]), vectors, atol=1e-5)  # batching changes nothing
    proc = run_ptm(["evaluate", "task=headline-retrieval", f"run={simcse_run}"], cache_env)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == 188 and metrics["pooling"] == "mean"  # the run's own pooling
    assert metrics["mrr"] > 5 / 188  # far above a random ranking (~0.03): a tiny run already retrieves
    assert json.loads((simcse_run / "headline-retrieval_test.json").read_text())["mrr"] == metrics["mrr"]
    run_ptm(["export", f"run={simcse_run}", f"output={tmp_path / 'hf'}"], cache_env)
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        mean = model(**tokenizer(["Oil prices rise as supply falls"], return_tensors="pt")).last_hidden_state.mean(1)
    assert np.allclose(F.normalize(mean, dim=-1)[0].numpy(), vectors[0], atol=1e-4)  # same vector in transformers


def test_simcse_resumes_exactly(simcse_run, cache_env, tmp_path):
    """From its step-8 checkpoint, the run continues to the same rows: same texts, same dropout draws."""
    resumed = rewound(simcse_run, tmp_path / "resumed", 16, 8)
    run_ptm([*SIMCSE, f"resume={resumed}", f"hydra.run.dir={resumed}"], cache_env)
    assert comparable(read_metrics(resumed)) == comparable(read_metrics(simcse_run))


def test_supervised_simcse_learns_from_labelled_pairs_and_serves_its_vectors(simcse_run, cache_env, tmp_path):
    """objective=simcse-supervised on pair-cls: each headline must pick its own body out of the batch's bodies and
    hard negatives (another article's body). The run embeds, retrieves, predicts similarities and exports."""
    run = tmp_path / "supervised"
    steps = [
        "trainer.epochs=null",
        "trainer.max_steps=12",
        "trainer.batch_size=16",
        "trainer.log_every=3",
        "optimizer.lr=1e-3",
    ]
    args = ["task=pair-cls", "objective=simcse-supervised", f"init={simcse_run}", "task.max_seq_len=32"]
    evals = ["trainer.eval_every=6", "trainer.eval_batches=4", "task.pooling=mean", "trainer.curves=false"]
    run_ptm(["finetune", *args, *steps, *evals, f"hydra.run.dir={run}"], cache_env)
    rows = [r for r in read_metrics(run) if r["split"] == "train"]
    # chance is ln(32): 16 headlines, each against 16 bodies and 16 hard negatives
    assert rows[-1]["contrastive_loss"] < min(np.log(32), rows[0]["contrastive_loss"] - 0.4), rows
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["accuracy"] > 4 / 32, test
    proc = run_ptm(["evaluate", "task=headline-retrieval", f"run={run}"], cache_env)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["pooling"] == "mean" and metrics["mrr"] > 5 / 188
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "Oil prices rise", "text_pair": "The price of oil rose on Monday."}\n')
    out = run_ptm(["predict", f"run={run}", f"input={pairs}"], cache_env).stdout
    assert -1 <= json.loads(out)["similarity"] <= 1
    run_ptm(["export", f"run={run}", f"output={tmp_path / 'hf'}"], cache_env)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BertModel"]
    fails_with(["finetune", "task=news-cls", "objective=simcse-supervised"], cache_env, "use a pair-cls task")
    fails_with(
        ["finetune", "task=pair-cls", "objective=simcse-supervised", "task.positive_label=same"], cache_env,
        "task.positive_label='same' is not a label",
    )  # fmt: skip


@pytest.mark.slow
def test_simcse_starts_from_a_masked_lm_run_of_its_family(cache_env, tmp_path):
    """init= an MLM run: its encoder is taken, SimCSE's projection starts fresh and the MLM head is left (both
    said at start)."""
    mlm = tmp_path / "mlm"
    run_ptm(["pretrain", *TINY, "objective=mlm", "trainer.max_steps=2", f"hydra.run.dir={mlm}"], cache_env)
    run = tmp_path / "simcse"
    proc = run_ptm([*SIMCSE, "trainer.max_steps=2", f"init={mlm}", f"hydra.run.dir={run}"], cache_env)
    said = " ".join(proc.stderr.split())
    assert "initialised fresh: projection" in said and "not used by objective=simcse: mlm_head" in said, said
    assert (run / "checkpoints" / "step-2").exists()


def test_sentence_commands_refuse_bad_input_in_one_sentence(simcse_run, cache_env, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("one\n")
    fails_with(["embed", f"run={simcse_run}", f"input={texts}", "output=v.txt"], cache_env, "name a .npy file")
    fails_with(["embed", f"run={simcse_run}", f"input={texts}"], cache_env, "ptm embed needs output=FILE")
    fails_with(
        ["embed", f"run={simcse_run}", f"input={texts}", "output=v.npy", "pooling=max"], cache_env, "choose mean or cls"
    )
    fails_with(["evaluate", "task=news-retrieval", f"run={simcse_run}"], cache_env, "headline-retrieval")
    fails_with(["evaluate", "task=headline-retrieval"], cache_env, "needs run=PATH")
    fails_with(["evaluate", "task=headline-retrieval", f"run={simcse_run}", "batch_size=0"], cache_env, "at least 1")
    fails_with(["pretrain", "conf=gpt-mini", "objective=simcse"], cache_env, "does not train a gpt model")
