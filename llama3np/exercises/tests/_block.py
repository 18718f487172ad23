"""Shared by ex09 and ex14: the tiny block of the fixtures, and the ops it calls replayed from the fixture."""
import json

from llama3np import backend, model, ops
from llama3np.args import ModelArgs
from llama3np.exercises.testing import unflatten


def args_of(fx):
    cfg = {k: v for k, v in fx.meta["config"].items() if k in ModelArgs.__dataclass_fields__}
    return ModelArgs(**cfg)


def block_cache(fx):
    return unflatten(json.loads(str(fx["bc.tree"])), fx, {"BlockCache": model.BlockCache})


BACKWARD_OPS = [(ops, "rmsnorm_backward"), (ops, "rope_backward"), (ops, "swiglu_backward"),
                (backend, "attention_backward"), (backend, "linear_backward"), (backend, "linear_backward_input"),
                (backend, "linear_backward_weight")]
FORWARD_OPS = [(ops, "rmsnorm_forward"), (ops, "rope_forward"), (ops, "swiglu_forward"),
               (backend, "attention_forward"), (backend, "linear_forward")]
