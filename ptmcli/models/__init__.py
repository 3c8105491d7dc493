"""Model families, picked by the short name in `model.family`."""
from ptmcli.models import bert

# family -> builder(arch, vocab_size, nsp) of the pretraining model
PRETRAINING_MODELS = {"bert": bert.build_pretraining}
