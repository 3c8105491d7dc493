"""Training objectives: given a model and a batch, the summed loss of each term and summable statistics.

An objective returns sums, not means: the loop divides by the number of targets in the whole step
(all micro-batches, all processes), so gradient accumulation and data parallelism give the same
update as one big batch. An objective may weight its terms (`term_weights`, default 1).
"""

from ptmcli.objectives.clm import CausalLM
from ptmcli.objectives.contrastive import Contrastive
from ptmcli.objectives.mlm import MaskedLM
from ptmcli.objectives.plm import PermutationLM
from ptmcli.objectives.rtd import ReplacedTokenDetection
from ptmcli.objectives.seq2seq import Seq2SeqLM

OBJECTIVES = {
    "mlm": lambda cfg: MaskedLM(nsp=False),
    "mlm-nsp": lambda cfg: MaskedLM(nsp=True),
    "clm": lambda cfg: CausalLM(),
    "plm": lambda cfg: PermutationLM(),
    "rtd": lambda cfg: ReplacedTokenDetection(cfg.rtd_weight),
    "span-corruption": lambda cfg: Seq2SeqLM("span", "full") if cfg.full_target_fraction > 0 else Seq2SeqLM("span"),
    "denoise": lambda cfg: Seq2SeqLM("denoise"),
    "simcse": lambda cfg: Contrastive(cfg.temperature),
}
