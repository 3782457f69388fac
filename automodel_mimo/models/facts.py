"""What the CLI checks of the LLM before any rank starts (layers over pipeline stages, heads over tp, the
vocabulary against the tokenizer), and the facts it needs, read without importing torch or transformers when the
config holds them: model.config's own keys with the built-in tokenizer, or a local model.pretrained's
config.json. Anything else (a hub model, a tokenizer file to load, MIMO) goes through transformers
(models/build.build_hf_config), which costs seconds of imports on a busy machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from automodel_mimo.errors import UserInputError
from automodel_mimo.models.local_paths import is_local

MOE_TYPES = ("qwen3_moe",)  # model types built with nemo's MoE layer (models/moe.py)
FACTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "num_experts")


def quick_facts(model) -> SimpleNamespace | None:
    """The LLM's layer, head and vocabulary sizes from model.config (random init) or a local model.pretrained's
    config.json; None when they are not all there (the slow path then asks transformers)."""
    if model.pretrained:
        path = Path(model.pretrained).expanduser() / "config.json"
        if not is_local(model.pretrained) or not path.is_file():
            return None
        data = json.loads(path.read_text())
    else:
        data = dict(model.config)
    if data.get("num_hidden_layers") is None or data.get("num_attention_heads") is None:
        return None
    return SimpleNamespace(**{k: data.get(k) for k in FACTS})


def check_pipeline_split(num_layers: int, pp: int, schedule: str, layers_per_stage: int | None) -> None:
    """The layer split AutoPipeline will make must exist; raised identically on every rank (and in the CLI)."""
    if pp == 1:
        return
    from nemo_automodel.components.distributed.pipelining.functional import calculate_virtual_stages

    single = schedule == "1f1b"
    try:
        stages, _ = calculate_virtual_stages(num_layers, layers_per_stage, pp, single)
    except ValueError as e:
        raise UserInputError(f"parallel.layers_per_stage={layers_per_stage} with parallel.pp={pp}: {e}") from None
    if layers_per_stage is None and num_layers % stages:
        raise UserInputError(
            f"the model's {num_layers} layers do not divide over {stages} pipeline stages "
            f"(parallel.pp={pp}, parallel.pp_schedule={schedule}); change parallel.pp or set parallel.layers_per_stage")


def check_tp_divisibility(hf_config, tp: int) -> None:
    """Every head count of the model (an HF config or `quick_facts`) divides over tp."""
    for name in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(hf_config, name, None)
        if tp > 1 and value is not None and value % tp:
            raise UserInputError(f"parallel.tp={tp} must divide the model's {name}={value}; choose a tp that divides it")


def check_expert_split(hf_config, ep: int) -> None:
    """Expert parallelism needs an MoE model whose routed experts divide over ep."""
    if ep == 1:
        return
    experts = getattr(hf_config, "num_experts", None)
    if experts is None and isinstance(hf_config, SimpleNamespace):
        return  # model.config leaves it to the model type's default: checked on the HF config at build time
    if not experts:
        raise UserInputError(f"parallel.ep={ep} needs a mixture-of-experts model (model.config.num_experts, e.g. "
                             "model_type qwen3_moe); this model has no routed experts: set parallel.ep=1")
    if experts % ep:
        raise UserInputError(f"parallel.ep={ep} must divide the model's num_experts={experts}; choose an ep that divides it")
