"""Model families, picked by the short name in `model.family`. Each family is one file; none imports another."""

from ptmcli.models import bart, bert, electra, gpt, roberta, t5, xlnet

FAMILIES = {"bert": bert, "roberta": roberta, "gpt": gpt, "xlnet": xlnet, "electra": electra, "t5": t5, "bart": bart}
# family -> builder(arch, vocab_size, objective config) of the pretraining model
PRETRAINING_MODELS = {name: module.build_pretraining for name, module in FAMILIES.items()}
# family -> builder(arch, vocab_size) of the bare encoder that task heads sit on
ENCODERS = {name: module.build_encoder for name, module in FAMILIES.items()}
# family -> builder(arch, vocab_size) of the encoder-decoder that text-to-text tasks train
SEQ2SEQ_MODELS = {"t5": t5.build_seq2seq, "bart": bart.build_seq2seq}
