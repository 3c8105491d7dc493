"""Model families, picked by the short name in `model.family`."""

from ptmcli.models import bert

# family -> builder(arch, vocab_size, nsp) of the pretraining model
PRETRAINING_MODELS = {"bert": bert.build_pretraining}
# family -> builder(arch, vocab_size) of the bare encoder that task heads sit on
ENCODERS = {"bert": bert.build_encoder}
# Hugging Face `model_type` -> (family, config.json -> arch, HF state dict -> encoder state dict)
HF_FAMILIES = {"bert": ("bert", bert.arch_from_hf, bert.encoder_state_from_hf)}
# family -> our encoder module name (+ slice) -> Hugging Face module name, for exporting adapters
HF_MODULE_NAMES = {"bert": bert.hf_module_name}
